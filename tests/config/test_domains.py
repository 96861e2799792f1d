"""Domain files: the shipped ones, the built-in default, resolution and bad files."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import config
from config.domains import (
    NOTIFICATION_CHANNELS,
    DomainConfig,
    load_domain_configs,
    load_domain_file,
    load_policies,
    notification_channels,
    resolve_policy,
)
from config.settings import ConfigError, Settings, load_settings
from engine.core import limits
from engine.core.policy import DomainPolicy
from tests.support.domain import DAY_MS, HOUR_MS

SHIPPED_DIR = Path(config.__file__).resolve().parent / "domains"
SHIPPED_DOMAINS = {"default", "medical", "restaurant", "seats", "technicians"}


def settings_for(directory: Path, **environ: str) -> Settings:
    return load_settings({"SLOTENGINE_DOMAINS_DIR": str(directory), **environ})


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def builtin_default(settings: Settings) -> DomainPolicy:
    return DomainPolicy(
        name="default",
        hold_ttl_ms=settings.hold_ttl_seconds * 1_000,
        claim_ttl_ms=settings.claim_ttl_seconds * 1_000,
        queue_enabled=True,
        queue_size_max=settings.queue_max,
        queue_inactivity_ms=settings.queue_inactivity_seconds * 1_000,
        advance_booking_ms=365 * DAY_MS,
        cancel_allowed_until_ms=0,
        refund_percentage=100,
        domain_type="resource",
        entity_name="Resource",
        slot_duration_minutes=None,
    )


# -- the shipped files ---------------------------------------------------------


def test_every_shipped_file_loads() -> None:
    policies = load_policies(load_settings({}))
    assert set(policies) == SHIPPED_DOMAINS
    assert {p.stem for p in SHIPPED_DIR.glob("*.toml")} == SHIPPED_DOMAINS
    for name, policy in policies.items():
        assert policy.name == name
        assert policy.hold_ttl_ms >= limits.HOLD_TTL_MIN_S * 1_000
        assert policy.claim_ttl_ms <= limits.HOLD_TTL_MAX_S * 1_000
        assert 1 <= policy.queue_size_max <= limits.QUEUE_SIZE_MAX
        assert 0 <= policy.refund_percentage <= 100
        assert policy.cancel_allowed_until_ms < policy.advance_booking_ms


def test_medical_follows_the_specification_example() -> None:
    medical = load_policies(load_settings({}))["medical"]
    assert medical.domain_type == "appointment"
    assert medical.entity_name == "Doctor"
    assert medical.slot_duration_minutes == 30
    assert medical.advance_booking_ms == 60 * DAY_MS
    assert medical.cancel_allowed_until_ms == 24 * HOUR_MS
    assert medical.refund_percentage == 100


def test_restaurant_follows_the_specification_example() -> None:
    restaurant = load_policies(load_settings({}))["restaurant"]
    assert restaurant.domain_type == "seat"
    assert restaurant.entity_name == "Table"
    assert restaurant.slot_duration_minutes == 120
    assert restaurant.advance_booking_ms == 14 * DAY_MS
    assert restaurant.queue_enabled is True
    assert restaurant.queue_size_max == 50


def test_shipped_overrides_win_over_the_environment() -> None:
    policies = load_policies(
        load_settings({"SLOTENGINE_HOLD_TTL_SECONDS": "10", "SLOTENGINE_CLAIM_TTL_SECONDS": "20"})
    )
    assert policies["seats"].hold_ttl_ms == 300_000
    assert policies["seats"].claim_ttl_ms == 180_000
    assert policies["technicians"].hold_ttl_ms == 10_000
    assert policies["technicians"].claim_ttl_ms == 900_000
    assert policies["medical"].hold_ttl_ms == 10_000


def test_holds_are_extended_by_a_minute_twice_unless_a_domain_says_otherwise() -> None:
    policies = load_policies(load_settings({}))
    assert (policies["default"].hold_extension_ms, policies["default"].hold_extensions_max) == (
        60_000,
        2,
    )
    assert (policies["seats"].hold_extension_ms, policies["seats"].hold_extensions_max) == (
        120_000,
        1,
    )


def test_shipped_default_file_matches_the_builtin_default() -> None:
    assert load_domain_file(SHIPPED_DIR / "default.toml") == DomainConfig()
    settings = load_settings({"SLOTENGINE_QUEUE_MAX": "9", "SLOTENGINE_HOLD_TTL_SECONDS": "33"})
    assert load_policies(settings)["default"] == builtin_default(settings)


def test_the_default_domains_dir_works_from_any_working_directory(tmp_path: Path) -> None:
    # A fresh interpreter started elsewhere, with no SLOTENGINE_DOMAINS_DIR:
    # the shipped files are found through the package, not the cwd.
    repo_root = Path(config.__file__).resolve().parent.parent
    environ = {k: v for k, v in os.environ.items() if k != "SLOTENGINE_DOMAINS_DIR"}
    search_path = [str(repo_root), environ.get("PYTHONPATH", "")]
    environ["PYTHONPATH"] = os.pathsep.join(p for p in search_path if p)
    script = (
        "import config; s = config.load_settings();"
        "print(s.domains_dir); print(','.join(sorted(config.load_policies(s))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    directory, names = result.stdout.splitlines()
    assert Path(directory) == SHIPPED_DIR
    assert set(names.split(",")) == SHIPPED_DOMAINS


# -- the built-in default ------------------------------------------------------


def test_builtin_default_exists_without_any_file(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert load_policies(settings) == {"default": builtin_default(settings)}


def test_builtin_default_takes_ttls_and_queue_size_from_the_environment(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        SLOTENGINE_HOLD_TTL_SECONDS="15",
        SLOTENGINE_CLAIM_TTL_SECONDS="25",
        SLOTENGINE_QUEUE_MAX="3",
        SLOTENGINE_QUEUE_INACTIVITY_SECONDS="600",
    )
    default = load_policies(settings)["default"]
    assert default == builtin_default(settings)
    assert (default.hold_ttl_ms, default.claim_ttl_ms) == (15_000, 25_000)
    assert default.queue_size_max == 3
    assert default.queue_inactivity_ms == 600_000


def test_builtin_default_stays_next_to_other_domains(tmp_path: Path) -> None:
    write(tmp_path, "gym.toml", 'entityName = "Trainer"\n')
    assert set(load_policies(settings_for(tmp_path))) == {"default", "gym"}


def test_a_default_file_replaces_the_builtin_default(tmp_path: Path) -> None:
    write(tmp_path, "default.toml", "advanceBookingDays = 7\n[queueSettings]\nenabled = false\n")
    default = load_policies(settings_for(tmp_path))["default"]
    assert default.advance_booking_ms == 7 * DAY_MS
    assert default.queue_enabled is False


# -- resolution ----------------------------------------------------------------


def test_resolution_converts_to_milliseconds_and_fills_gaps(tmp_path: Path) -> None:
    write(
        tmp_path,
        "clinic.toml",
        """\
        domainType = "appointment"
        entityName = "Nurse"
        slotDuration = 15
        advanceBookingDays = 3
        holdTtlSeconds = 45
        holdExtensionSeconds = 20
        holdExtensionsMax = 0

        [cancellationPolicy]
        allowedUntil = 1.5
        refundPercentage = 80

        [queueSettings]
        enabled = false
        inactivitySeconds = 900
        """,
    )
    settings = settings_for(tmp_path, SLOTENGINE_CLAIM_TTL_SECONDS="50", SLOTENGINE_QUEUE_MAX="8")
    assert load_policies(settings)["clinic"] == DomainPolicy(
        name="clinic",
        hold_ttl_ms=45_000,
        claim_ttl_ms=50_000,
        queue_enabled=False,
        queue_size_max=8,
        queue_inactivity_ms=900_000,
        advance_booking_ms=3 * DAY_MS,
        cancel_allowed_until_ms=90 * 60_000,
        refund_percentage=80,
        domain_type="appointment",
        entity_name="Nurse",
        slot_duration_minutes=15,
        hold_extension_ms=20_000,
        hold_extensions_max=0,
    )


def test_an_empty_file_is_the_default_rules_under_its_own_name(tmp_path: Path) -> None:
    write(tmp_path, "plain.toml", "")
    settings = settings_for(tmp_path)
    plain = load_policies(settings)["plain"]
    assert plain == resolve_policy("plain", DomainConfig(), settings)
    assert plain == DomainPolicy(**{**_fields(builtin_default(settings)), "name": "plain"})


def test_custom_fields_are_free_form(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.toml",
        """\
        [customFields]
        label = "Room"
        [customFields.floor]
        type = "integer"
        required = true
        """,
    )
    assert load_domain_file(path).custom_fields == {
        "label": "Room",
        "floor": {"type": "integer", "required": True},
    }


def test_other_files_in_the_directory_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, "README.md", "not a domain")
    write(tmp_path, "medical.toml.bak", "garbage = [")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "nested.toml", "garbage = [")
    assert set(load_policies(settings_for(tmp_path))) == {"default"}


# -- bad files -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field_path"),
    [
        ("[queueSettings]\nmaxSize = 100001\n", "`$.queueSettings.maxSize`"),
        ("[queueSettings]\nmaxSize = 0\n", "`$.queueSettings.maxSize`"),
        ("[queueSettings]\nmaxSize = 'ten'\n", "`$.queueSettings.maxSize`"),
        ("[queueSettings]\nenabled = 'yes'\n", "`$.queueSettings.enabled`"),
        (
            "[queueSettings]\nnotificationChannels = ['pigeon']\n",
            "`$.queueSettings.notificationChannels[0]`",
        ),
        ("[queueSettings]\ninactivitySeconds = 0\n", "`$.queueSettings.inactivitySeconds`"),
        (
            "[cancellationPolicy]\nrefundPercentage = 101\n",
            "`$.cancellationPolicy.refundPercentage`",
        ),
        ("[cancellationPolicy]\nallowedUntil = -1\n", "`$.cancellationPolicy.allowedUntil`"),
        ("holdTtlSeconds = 0\n", "`$.holdTtlSeconds`"),
        ("holdExtensionSeconds = 0\n", "`$.holdExtensionSeconds`"),
        (
            f"holdExtensionSeconds = {limits.HOLD_EXTENSION_MAX_S + 1}\n",
            "`$.holdExtensionSeconds`",
        ),
        ("holdExtensionsMax = -1\n", "`$.holdExtensionsMax`"),
        (f"holdExtensionsMax = {limits.HOLD_EXTENSIONS_MAX + 1}\n", "`$.holdExtensionsMax`"),
        ("holdExtensionsMax = 1.5\n", "`$.holdExtensionsMax`"),
        ("[queueSettings]\nholdExtensionsMax = 1\n", "`$.queueSettings`"),
        (f"holdTtlSeconds = {limits.HOLD_TTL_MAX_S + 1}\n", "`$.holdTtlSeconds`"),
        (f"claimTtlSeconds = {limits.HOLD_TTL_MAX_S + 1}\n", "`$.claimTtlSeconds`"),
        (f"advanceBookingDays = {limits.ADVANCE_BOOKING_DAYS_MAX + 1}\n", "`$.advanceBookingDays`"),
        ("advanceBookingDays = 0\n", "`$.advanceBookingDays`"),
        ("slotDuration = 0\n", "`$.slotDuration`"),
        ("domainType = 'spaceship'\n", "`$.domainType`"),
        ("entityName = ''\n", "`$.entityName`"),
        ("cancellationPolicy = 5\n", "`$.cancellationPolicy`"),
    ],
)
def test_a_bad_value_names_the_file_and_the_field(
    tmp_path: Path, text: str, field_path: str
) -> None:
    path = write(tmp_path, "broken.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_policies(settings_for(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"domain file {path}: ")
    assert f"at {field_path}" in message
    assert "\n" not in message


def test_values_at_the_limits_are_accepted(tmp_path: Path) -> None:
    write(
        tmp_path,
        "edge.toml",
        f"""\
        holdTtlSeconds = {limits.HOLD_TTL_MAX_S}
        claimTtlSeconds = {limits.HOLD_TTL_MIN_S}
        advanceBookingDays = {limits.ADVANCE_BOOKING_DAYS_MAX}
        [queueSettings]
        maxSize = {limits.QUEUE_SIZE_MAX}
        inactivitySeconds = {limits.QUEUE_INACTIVITY_MAX_S}
        [cancellationPolicy]
        refundPercentage = 0
        """,
    )
    edge = load_policies(settings_for(tmp_path))["edge"]
    assert edge.hold_ttl_ms == limits.HOLD_TTL_MAX_S * 1_000
    assert edge.claim_ttl_ms == limits.HOLD_TTL_MIN_S * 1_000
    assert edge.queue_size_max == limits.QUEUE_SIZE_MAX
    assert edge.queue_inactivity_ms == limits.QUEUE_INACTIVITY_MAX_S * 1_000
    assert edge.refund_percentage == 0


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("maxSize = 50\n", "Object contains unknown field `maxSize`"),
        (
            "[queueSettings]\nmaxsize = 50\n",
            "Object contains unknown field `maxsize` - at `$.queueSettings`",
        ),
        (
            "[cancellationPolicy]\nallowed_until = 2\n",
            "Object contains unknown field `allowed_until` - at `$.cancellationPolicy`",
        ),
    ],
)
def test_an_unknown_field_is_an_error(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, "typo.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_policies(settings_for(tmp_path))
    assert str(caught.value) == f"domain file {path}: {where}"


def test_a_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "syntax.toml", "[queueSettings\nmaxSize = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_policies(settings_for(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"domain file {path}: ")
    assert "line 1" in message
    assert "\n" not in message


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(b'entityName = "M\xe9decin"\n')
    with pytest.raises(ConfigError) as caught:
        load_policies(settings_for(tmp_path))
    assert str(caught.value) == f"domain file {path}: not UTF-8 text"


def test_an_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ghost.toml"
    with pytest.raises(ConfigError, match=r"^domain file .*ghost\.toml: cannot read it"):
        load_domain_file(path)


@pytest.mark.parametrize("stem", ["Medical", "with space", "dots.in.name", "_hidden", "x" * 129])
def test_the_file_name_must_be_a_plain_domain_name(tmp_path: Path, stem: str) -> None:
    path = write(tmp_path, f"{stem}.toml", "")
    with pytest.raises(ConfigError) as caught:
        load_policies(settings_for(tmp_path))
    assert str(caught.value).startswith(f"domain file {path}: the file name is the domain name")


def test_a_missing_domains_dir_names_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as caught:
        load_domain_configs(settings_for(missing))
    assert str(caught.value) == (
        f"SLOTENGINE_DOMAINS_DIR: expected a directory of domain files, got {str(missing)!r}"
    )


def _fields(policy: DomainPolicy) -> dict[str, object]:
    return {name: getattr(policy, name) for name in policy.__struct_fields__}


# -- notification channels --------------------------------------------------------------


def test_each_domain_names_its_notification_channels() -> None:
    channels = notification_channels(load_settings({}))
    assert set(channels) == SHIPPED_DOMAINS
    assert channels["default"] == frozenset({"websocket", "webhook"})
    assert channels["medical"] == frozenset({"websocket", "email", "webhook"})
    assert all(names <= set(NOTIFICATION_CHANNELS) for names in channels.values())


def test_a_domain_without_channels_has_the_websocket_and_webhooks(tmp_path: Path) -> None:
    """Webhooks go only to endpoints an admin registered; email is asked for by name."""
    write(tmp_path, "plain.toml", "entityName = 'Room'\n")
    assert notification_channels(settings_for(tmp_path)) == {
        "default": frozenset({"websocket", "webhook"}),
        "plain": frozenset({"websocket", "webhook"}),
    }


@pytest.mark.parametrize("channel", ["carrier-pigeon", "Email", "webhooks", ""])
def test_an_unknown_channel_stops_the_start_naming_the_file(tmp_path: Path, channel: str) -> None:
    path = write(
        tmp_path, "clinic.toml", f"[queueSettings]\nnotificationChannels = ['email', {channel!r}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        notification_channels(settings_for(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"domain file {path}: ")
    assert "`$.queueSettings.notificationChannels[1]`" in message
