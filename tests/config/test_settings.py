"""Settings from the environment: names, defaults, bounds and one-line errors."""

from pathlib import Path

import pytest

import config
from config.settings import (
    BODY_TIMEOUT_DEFAULT_S,
    DOMAINS_DIR_DEFAULT,
    HEADER_TIMEOUT_DEFAULT_S,
    READ_TIMEOUT_MAX_S,
    SHARDS_DEFAULT,
    SHARDS_MAX,
    ConfigError,
    Settings,
    SmtpTarget,
    load_settings,
    parse_smtp_url,
)
from engine.core import limits

PACKAGE_DOMAINS_DIR = Path(config.__file__).resolve().parent / "domains"


def test_defaults_follow_the_api_contract() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.ray_address is None
    assert settings.jwt_secret is None
    assert settings.hold_ttl_seconds == 120
    assert settings.claim_ttl_seconds == 120
    assert settings.queue_max == 100
    assert settings.shards == SHARDS_DEFAULT
    assert settings.durability == "commit"
    assert settings.queue_inactivity_seconds == 14_400
    assert settings.domains_dir == PACKAGE_DOMAINS_DIR == DOMAINS_DIR_DEFAULT
    assert settings.domains_dir.is_absolute()
    assert settings.data_dir == Path(".slotengine")
    assert settings.cors_origins == ()
    assert settings.log_level == "info"
    assert settings.header_timeout_seconds == HEADER_TIMEOUT_DEFAULT_S == 10
    assert settings.body_timeout_seconds == BODY_TIMEOUT_DEFAULT_S == 10


def test_any_origin_is_a_lone_star() -> None:
    assert load_settings({"SLOTENGINE_CORS_ORIGINS": "*"}).cors_origins == ("*",)


@pytest.mark.parametrize(
    "origins", ["app.example.com", "https://a.example/path", "*, https://a.example", "ftp://x"]
)
def test_an_origin_that_is_not_an_origin_is_refused(origins: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"SLOTENGINE_CORS_ORIGINS": origins})
    assert str(caught.value).startswith("SLOTENGINE_CORS_ORIGINS: ")


def test_an_unknown_log_level_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^SLOTENGINE_LOG_LEVEL: expected one of"):
        load_settings({"SLOTENGINE_LOG_LEVEL": "verbose"})


def test_every_variable_overrides_its_default() -> None:
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test",
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "RAY_ADDRESS": "ray://head:10001",
            "SLOTENGINE_JWT_SECRET": "s3cret-value",
            "SLOTENGINE_HOLD_TTL_SECONDS": "30",
            "SLOTENGINE_CLAIM_TTL_SECONDS": "45",
            "SLOTENGINE_QUEUE_MAX": "7",
            "SLOTENGINE_SHARDS": "16",
            "SLOTENGINE_DURABILITY": "relaxed",
            "SLOTENGINE_QUEUE_INACTIVITY_SECONDS": "60",
            "SLOTENGINE_DOMAINS_DIR": "/etc/slotengine/domains",
            "SLOTENGINE_DATA_DIR": "/var/lib/slotengine",
            "SLOTENGINE_CORS_ORIGINS": "https://app.example.com, http://localhost:3000/",
            "SLOTENGINE_LOG_LEVEL": "WARNING",
            "SLOTENGINE_HEADER_TIMEOUT_SECONDS": "5",
            "SLOTENGINE_BODY_TIMEOUT_SECONDS": "20",
            "SLOTENGINE_NOTIFICATIONS": "false",
            "SLOTENGINE_DELIVERY_RETRY_SECONDS": "1, 2,3",
            "SLOTENGINE_OUTBOX_RETENTION_HOURS": "12",
            "SLOTENGINE_DELIVERY_LEASE_SECONDS": "30",
            "SLOTENGINE_OUTAGE_HOLD_GRACE_SECONDS": "90",
            "SLOTENGINE_SMTP_URL": "smtp://mail.example.com:2525",
            "SLOTENGINE_MAIL_FROM": "bookings@example.com",
            "SLOTENGINE_TRUSTED_PROXY_HEADER": "X-Forwarded-For",
            "SLOTENGINE_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7,2001:db8::/32",
            "UNRELATED": "ignored",
        }
    )
    assert settings == Settings(
        database_url="postgresql://postgres@127.0.0.1:5432/test",
        redis_url="redis://127.0.0.1:6379/0",
        ray_address="ray://head:10001",
        jwt_secret="s3cret-value",
        hold_ttl_seconds=30,
        claim_ttl_seconds=45,
        queue_max=7,
        shards=16,
        durability="relaxed",
        queue_inactivity_seconds=60,
        domains_dir=Path("/etc/slotengine/domains"),
        data_dir=Path("/var/lib/slotengine"),
        cors_origins=("https://app.example.com", "http://localhost:3000"),
        log_level="warning",
        header_timeout_seconds=5,
        body_timeout_seconds=20,
        notifications=False,
        delivery_retry_seconds=(1, 2, 3),
        outbox_retention_hours=12,
        delivery_lease_seconds=30,
        outage_hold_grace_seconds=90,
        smtp_url="smtp://mail.example.com:2525",
        mail_from="bookings@example.com",
        trusted_proxy_header="X-Forwarded-For",
        trusted_proxies=("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"),
    )


def test_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOTENGINE_SHARDS", "3")
    monkeypatch.delenv("SLOTENGINE_HOLD_TTL_SECONDS", raising=False)
    settings = load_settings()
    assert settings.shards == 3
    assert settings.hold_ttl_seconds == 120


def test_blank_values_count_as_unset() -> None:
    settings = load_settings(
        {"DATABASE_URL": "", "REDIS_URL": "  ", "SLOTENGINE_SHARDS": "", "SLOTENGINE_DATA_DIR": ""}
    )
    assert settings == Settings()


@pytest.mark.parametrize("mode", ["commit", "relaxed"])
def test_both_durability_modes(mode: str) -> None:
    assert load_settings({"SLOTENGINE_DURABILITY": mode}).durability == mode


@pytest.mark.parametrize(
    ("raw", "expected"), [("true", True), ("On", True), ("1", True), ("false", False), ("0", False)]
)
def test_automatic_rebalance_is_a_switch(raw: str, expected: bool) -> None:
    assert load_settings({"SLOTENGINE_AUTO_REBALANCE": raw}).auto_rebalance is expected
    assert load_settings({}).auto_rebalance is False


def test_values_are_trimmed_and_durability_ignores_case() -> None:
    settings = load_settings({"SLOTENGINE_QUEUE_MAX": " 42 ", "SLOTENGINE_DURABILITY": "Relaxed"})
    assert settings.queue_max == 42
    assert settings.durability == "relaxed"


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("SLOTENGINE_HOLD_TTL_SECONDS", limits.HOLD_TTL_MIN_S, limits.HOLD_TTL_MAX_S),
        ("SLOTENGINE_CLAIM_TTL_SECONDS", limits.HOLD_TTL_MIN_S, limits.HOLD_TTL_MAX_S),
        ("SLOTENGINE_QUEUE_MAX", 1, limits.QUEUE_SIZE_MAX),
        ("SLOTENGINE_SHARDS", 1, SHARDS_MAX),
        ("SLOTENGINE_QUEUE_INACTIVITY_SECONDS", 1, limits.QUEUE_INACTIVITY_MAX_S),
    ],
)
def test_integer_bounds_come_from_the_engine_limits(name: str, low: int, high: int) -> None:
    field = {
        "SLOTENGINE_HOLD_TTL_SECONDS": "hold_ttl_seconds",
        "SLOTENGINE_CLAIM_TTL_SECONDS": "claim_ttl_seconds",
        "SLOTENGINE_QUEUE_MAX": "queue_max",
        "SLOTENGINE_SHARDS": "shards",
        "SLOTENGINE_QUEUE_INACTIVITY_SECONDS": "queue_inactivity_seconds",
    }[name]
    assert getattr(load_settings({name: str(low)}), field) == low
    assert getattr(load_settings({name: str(high)}), field) == high
    expected = f"expected an integer between {low} and {high}"
    for bad in (str(low - 1), str(high + 1), "abc", "1.5", "12s", "0x10"):
        with pytest.raises(ConfigError) as caught:
            load_settings({name: bad})
        assert str(caught.value) == f"{name}: {expected}, got {bad!r}"


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("SLOTENGINE_HEADER_TIMEOUT_SECONDS", "header_timeout_seconds"),
        ("SLOTENGINE_BODY_TIMEOUT_SECONDS", "body_timeout_seconds"),
    ],
)
def test_read_timeouts_are_whole_seconds_up_to_a_minute(name: str, field: str) -> None:
    assert getattr(load_settings({name: "1"}), field) == 1
    assert (
        getattr(load_settings({name: str(READ_TIMEOUT_MAX_S)}), field) == READ_TIMEOUT_MAX_S == 60
    )
    for bad in ("0", "61", "-1", "0.5", "10s", "never"):
        with pytest.raises(ConfigError) as caught:
            load_settings({name: bad})
        assert str(caught.value) == f"{name}: expected an integer between 1 and 60, got {bad!r}"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"SLOTENGINE_SHARDS": "abc"},
            "SLOTENGINE_SHARDS: expected an integer between 1 and 1024, got 'abc'",
        ),
        (
            {"SLOTENGINE_HOLD_TTL_SECONDS": "0"},
            "SLOTENGINE_HOLD_TTL_SECONDS: expected an integer between 1 and 86400, got '0'",
        ),
        (
            {"SLOTENGINE_CLAIM_TTL_SECONDS": "-5"},
            "SLOTENGINE_CLAIM_TTL_SECONDS: expected an integer between 1 and 86400, got '-5'",
        ),
        (
            {"SLOTENGINE_QUEUE_MAX": "100001"},
            "SLOTENGINE_QUEUE_MAX: expected an integer between 1 and 100000, got '100001'",
        ),
        (
            {"SLOTENGINE_QUEUE_INACTIVITY_SECONDS": "forever"},
            "SLOTENGINE_QUEUE_INACTIVITY_SECONDS: expected an integer between 1 and 2592000,"
            " got 'forever'",
        ),
        (
            {"SLOTENGINE_DURABILITY": "async"},
            "SLOTENGINE_DURABILITY: expected one of 'commit', 'relaxed', got 'async'",
        ),
        (
            {"SLOTENGINE_AUTO_REBALANCE": "maybe"},
            "SLOTENGINE_AUTO_REBALANCE: expected true or false, got 'maybe'",
        ),
        (
            {"DATABASE_URL": "mysql://root@localhost/test"},
            "DATABASE_URL: expected a URL starting with postgresql:// or postgres://,"
            " got 'mysql://root@localhost/test'",
        ),
        (
            {"DATABASE_URL": "localhost:5432"},
            "DATABASE_URL: expected a URL starting with postgresql:// or postgres://,"
            " got 'localhost:5432'",
        ),
        (
            {"REDIS_URL": "127.0.0.1:6379"},
            "REDIS_URL: expected a URL starting with redis:// or rediss:// or unix://"
            " or redis+sentinel://, got '127.0.0.1:6379'",
        ),
        (
            {"REDIS_URL": "redis://[::1:6379/0"},
            "REDIS_URL: expected a valid URL (Invalid IPv6 URL), got 'redis://[::1:6379/0'",
        ),
    ],
)
def test_a_bad_value_fails_with_one_line_naming_the_setting(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_the_first_bad_setting_is_reported_even_among_good_ones() -> None:
    with pytest.raises(ConfigError, match=r"^SLOTENGINE_SHARDS: "):
        load_settings({"SLOTENGINE_QUEUE_MAX": "10", "SLOTENGINE_SHARDS": "0"})


def test_a_value_with_a_newline_still_gives_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"SLOTENGINE_SHARDS": "4\n5"})
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("SLOTENGINE_SHARDS: ")


def test_config_error_is_a_value_error_with_one_line() -> None:
    error = ConfigError("first line\n  second line")
    assert isinstance(error, ValueError)
    assert str(error) == "first line second line"


def test_all_accepted_url_schemes() -> None:
    for url in ("postgresql://a@h/db", "postgres://a@h/db", "postgresql://a:@/db?host=/tmp"):
        assert load_settings({"DATABASE_URL": url}).database_url == url
    for url in ("redis://h:6379/0", "rediss://h:6380/1", "unix:///tmp/redis.sock?db=0"):
        assert load_settings({"REDIS_URL": url}).redis_url == url


def test_passwords_never_reach_messages_or_logs() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATABASE_URL": "mysql://root:hunter2@db/test"})
    assert "hunter2" not in str(caught.value)
    assert "mysql://root:***@db/test" in str(caught.value)

    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://app:hunter2@db:5432/test",
            "REDIS_URL": "redis://:hunter3@cache:6379/0",
            "SLOTENGINE_JWT_SECRET": "hunter4",
            "SLOTENGINE_DATA_KEY": "k1:hunter5",
        }
    )
    shown = repr(settings)
    for secret in ("hunter2", "hunter3", "hunter4", "hunter5"):
        assert secret not in shown
    assert settings.data_key == "k1:hunter5" and "data_key=None" in repr(Settings())
    assert "postgresql://app:***@db:5432/test" in shown
    assert settings.database_url == "postgresql://app:hunter2@db:5432/test"
    assert settings.jwt_secret == "hunter4"
    assert "jwt_secret=None" in repr(Settings())


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.shards = 9  # type: ignore[misc]


def test_live_connections_per_user_default_to_a_cap_and_zero_turns_it_off() -> None:
    name = "SLOTENGINE_LIVE_CONNECTIONS_PER_USER_MAX"
    assert load_settings({}).live_connections_per_user_max == 32
    assert load_settings({name: "0"}).live_connections_per_user_max == 0
    assert load_settings({name: " 5 "}).live_connections_per_user_max == 5
    assert load_settings({name: "100000"}).live_connections_per_user_max == 100_000
    for bad in ("-1", "100001", "many", "2.5"):
        with pytest.raises(ConfigError) as caught:
            load_settings({name: bad})
        assert str(caught.value) == f"{name}: expected an integer between 0 and 100000, got {bad!r}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("5,30,120,600,3600", (5, 30, 120, 600, 3600)), ("none", ()), (" 60 ", (60,))],
)
def test_the_retry_schedule_is_seconds_before_each_retry(
    raw: str, expected: tuple[int, ...]
) -> None:
    assert load_settings({"SLOTENGINE_DELIVERY_RETRY_SECONDS": raw}).delivery_retry_seconds == (
        expected
    )


@pytest.mark.parametrize("raw", ["0", "5,,30", "5,x", "86401", ",".join(["1"] * 21)])
def test_a_bad_retry_schedule_is_refused_naming_the_setting(raw: str) -> None:
    with pytest.raises(ConfigError, match="SLOTENGINE_DELIVERY_RETRY_SECONDS"):
        load_settings({"SLOTENGINE_DELIVERY_RETRY_SECONDS": raw})


# -- email ------------------------------------------------------------------------------


def test_email_is_off_unless_an_smtp_url_is_set() -> None:
    settings = load_settings({})
    assert settings.smtp_url is None
    assert settings.mail_from == "slotengine@localhost"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "smtp://mail.example.com:2525",
            SmtpTarget(
                host="mail.example.com", port=2525, implicit_tls=False, starttls=False,
                username=None, password=None,
            ),
        ),
        (
            "smtp://app%40example.com:p%40ss%3Aw0rd@mail.example.com?starttls=true",
            SmtpTarget(
                host="mail.example.com", port=587, implicit_tls=False, starttls=True,
                username="app@example.com", password="p@ss:w0rd",
            ),
        ),
        (
            "smtps://app:secret@mail.example.com",
            SmtpTarget(
                host="mail.example.com", port=465, implicit_tls=True, starttls=False,
                username="app", password="secret",
            ),
        ),
        (
            "smtp://relay",
            SmtpTarget(
                host="relay", port=25, implicit_tls=False, starttls=False,
                username=None, password=None,
            ),
        ),
    ],
)  # fmt: skip
def test_smtp_urls(url: str, expected: SmtpTarget) -> None:
    assert parse_smtp_url(url) == expected
    assert load_settings({"SLOTENGINE_SMTP_URL": url}).smtp_url == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://mail.example.com", "expected a URL starting with smtp:// or smtps://"),
        ("smtp://:2525", "expected a host"),
        ("smtp://mail.example.com:99999", "expected a port"),
        ("smtp://mail.example.com/inbox", "expected no path"),
        ("smtp://mail.example.com?tls=1", "unknown parameter 'tls'"),
        ("smtp://mail.example.com?starttls=maybe", "expected true or false"),
        ("smtps://mail.example.com?starttls=true", "starttls is for smtp://"),
    ],
)
def test_a_bad_smtp_url_stops_the_start(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"SLOTENGINE_SMTP_URL": url})
    assert str(caught.value).startswith(f"SLOTENGINE_SMTP_URL: {problem}")


def test_the_smtp_password_is_never_shown() -> None:
    url = "smtp://app:hunter5@mail.example.com:2525?starttls=maybe"
    with pytest.raises(ConfigError) as caught:
        load_settings({"SLOTENGINE_SMTP_URL": url})
    assert "hunter5" not in str(caught.value)
    settings = load_settings({"SLOTENGINE_SMTP_URL": url.replace("maybe", "true")})
    assert "hunter5" not in repr(settings)
    assert "hunter5" not in repr(parse_smtp_url(settings.smtp_url or ""))


@pytest.mark.parametrize(
    "address", ["nobody", "a b@example.com", "Bob <bob@example.com>", "x@y\nBcc: z@w"]
)
def test_a_bad_sender_address_stops_the_start(address: str) -> None:
    with pytest.raises(ConfigError, match=r"^SLOTENGINE_MAIL_FROM: expected an address"):
        load_settings({"SLOTENGINE_MAIL_FROM": address})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SLOTENGINE_TRUSTED_PROXY_HEADER": "X-Forwarded-For"}, "SLOTENGINE_TRUSTED_PROXIES"),
        ({"SLOTENGINE_TRUSTED_PROXIES": "10.0.0.0/8"}, "SLOTENGINE_TRUSTED_PROXY_HEADER"),
        (
            {"SLOTENGINE_TRUSTED_PROXY_HEADER": "X Forwarded", "SLOTENGINE_TRUSTED_PROXIES": "::1"},
            "SLOTENGINE_TRUSTED_PROXY_HEADER: expected a header name",
        ),
        (
            {"SLOTENGINE_TRUSTED_PROXY_HEADER": "X-Real-IP", "SLOTENGINE_TRUSTED_PROXIES": "10/33"},
            "SLOTENGINE_TRUSTED_PROXIES: expected CIDR networks",
        ),
    ],
)
def test_a_trusted_proxy_header_needs_its_proxies_and_both_are_checked(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_settings(environ)


def test_no_proxy_is_trusted_by_default() -> None:
    settings = load_settings({})
    assert (settings.trusted_proxy_header, settings.trusted_proxies) == (None, ())
