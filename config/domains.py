"""Domain configuration files, and their resolution into the engine's policies.

This module owns the schema of a domain file (``config/domains/<name>.toml``,
camelCase keys after the specification's ``DomainConfig``), decoding it with
msgspec (unknown keys and out-of-range values are errors, bounds from
``engine.core.limits``), and resolving it with the process ``Settings`` into
an ``engine.core.policy.DomainPolicy`` in milliseconds. The file's stem is
the domain's name; a slot's ``domain`` field picks it.

A built-in ``default`` domain always exists, even with no ``default.toml``:
its rules are a ``DomainConfig`` with every field left at its default (TTLs,
queue size and inactivity from the environment, queue enabled, cancellation
until the slot starts with a full refund, booking up to 365 days ahead,
holds extended by 60 s at most twice).

Any bad file raises ``ConfigError`` naming the file and the field path
(``at `$.queueSettings.maxSize```). It must never be read per request: the
server loads the policies once, at start.
"""

import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

import msgspec

from config.settings import ConfigError, Settings
from engine.core import limits
from engine.core.policy import DomainPolicy, PolicyBook

DEFAULT_DOMAIN: Final = "default"
DOMAIN_FILE_SUFFIX: Final = ".toml"
# Domain names travel in slot records and URLs: keep them plain.
DOMAIN_NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]*")
ENTITY_NAME_CHARS_MAX: Final = 64
# A hold's limits bound the claim TTL too: an offer to a queued user is a hold.
TtlSeconds = Annotated[int, msgspec.Meta(ge=limits.HOLD_TTL_MIN_S, le=limits.HOLD_TTL_MAX_S)]

DomainType = Literal["appointment", "seat", "resource", "service"]
# Where a slot's events reach people: the live connections (websocket, sse),
# email (engine/notify/mail.py) and the webhook endpoints. sms and push are in
# the specification's schema and accepted, but nothing delivers them yet. Any
# other name is refused when the file is loaded, naming the file.
NotificationChannel = Literal["websocket", "sse", "email", "webhook", "sms", "push"]
NOTIFICATION_CHANNELS: Final[tuple[str, ...]] = get_args(NotificationChannel)

_MS_PER_SECOND: Final = 1_000
_MS_PER_HOUR: Final = 3_600_000
_MS_PER_DAY: Final = 86_400_000


class _Section(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="camel"
):
    """A table of a domain file: camelCase keys, nothing unknown."""


class CancellationPolicy(_Section, frozen=True):
    # Hours before the slot starts after which users may no longer cancel
    # (0: until it starts). Fractions are allowed: 0.5 is 30 minutes.
    allowed_until: Annotated[float, msgspec.Meta(ge=0, le=limits.ADVANCE_BOOKING_DAYS_MAX * 24)] = 0
    refund_percentage: Annotated[int, msgspec.Meta(ge=0, le=100)] = 100


class QueueSettings(_Section, frozen=True):
    enabled: bool = True
    # None: SLOTENGINE_QUEUE_MAX.
    max_size: Annotated[int, msgspec.Meta(ge=1, le=limits.QUEUE_SIZE_MAX)] | None = None
    notification_channels: Annotated[
        tuple[NotificationChannel, ...], msgspec.Meta(max_length=8)
    ] = ("websocket", "webhook")
    # None: SLOTENGINE_QUEUE_INACTIVITY_SECONDS.
    inactivity_seconds: (
        Annotated[int, msgspec.Meta(ge=1, le=limits.QUEUE_INACTIVITY_MAX_S)] | None
    ) = None


class DomainConfig(_Section, frozen=True):
    """One domain file as written. Every field is optional; see the module doc."""

    domain_type: DomainType = "resource"
    entity_name: Annotated[str, msgspec.Meta(min_length=1, max_length=ENTITY_NAME_CHARS_MAX)] = (
        "Resource"
    )
    # Minutes: the usual length of a slot in this domain (informative).
    slot_duration: (
        Annotated[int, msgspec.Meta(ge=1, le=limits.SLOT_DURATION_MAX_MS // 60_000)] | None
    ) = None
    advance_booking_days: Annotated[int, msgspec.Meta(ge=1, le=limits.ADVANCE_BOOKING_DAYS_MAX)] = (
        limits.ADVANCE_BOOKING_DAYS_DEFAULT
    )
    cancellation_policy: CancellationPolicy = CancellationPolicy()
    queue_settings: QueueSettings = QueueSettings()
    # Free-form data for clients (form fields, labels); the engine ignores it.
    custom_fields: dict[str, Any] = {}
    # None: SLOTENGINE_HOLD_TTL_SECONDS / SLOTENGINE_CLAIM_TTL_SECONDS.
    hold_ttl_seconds: TtlSeconds | None = None
    claim_ttl_seconds: TtlSeconds | None = None
    # What one extension of a hold adds (POST /api/bookings/{id}/extend), and how
    # many a hold may have; 0 extensions: holds are never extended.
    hold_extension_seconds: Annotated[int, msgspec.Meta(ge=1, le=limits.HOLD_EXTENSION_MAX_S)] = (
        limits.HOLD_EXTENSION_DEFAULT_S
    )
    hold_extensions_max: Annotated[int, msgspec.Meta(ge=0, le=limits.HOLD_EXTENSIONS_MAX)] = (
        limits.HOLD_EXTENSIONS_DEFAULT
    )


def load_domain_file(path: Path) -> DomainConfig:
    """Decode and check one domain file, or raise ``ConfigError`` naming it."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"domain file {path}: cannot read it ({error.strerror})") from None
    try:
        # Checked before decoding: msgspec's own message for bad UTF-8 varies by version.
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"domain file {path}: not UTF-8 text") from None
    try:
        return msgspec.toml.decode(raw, type=DomainConfig)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        # ValidationError carries the field path: "... - at `$.queueSettings.maxSize`".
        raise ConfigError(f"domain file {path}: {error}") from None


def load_domain_configs(settings: Settings) -> dict[str, DomainConfig]:
    """Every domain in ``settings.domains_dir``, plus the built-in ``default``.

    A ``default.toml`` replaces the built-in default. Other files in the
    directory are ignored.
    """
    directory = settings.domains_dir
    if not directory.is_dir():
        raise ConfigError(
            f"SLOTENGINE_DOMAINS_DIR: expected a directory of domain files, got {str(directory)!r}"
        )
    configs = {DEFAULT_DOMAIN: DomainConfig()}
    for path in sorted(directory.glob(f"*{DOMAIN_FILE_SUFFIX}")):
        name = path.name.removesuffix(DOMAIN_FILE_SUFFIX)
        if len(name) > limits.ID_CHARS_MAX or not DOMAIN_NAME_PATTERN.fullmatch(name):
            raise ConfigError(
                f"domain file {path}: the file name is the domain name and must be "
                f"lower-case letters, digits, '-' or '_' (at most {limits.ID_CHARS_MAX})"
            )
        configs[name] = load_domain_file(path)
    return configs


def resolve_policy(name: str, config: DomainConfig, settings: Settings) -> DomainPolicy:
    """The engine's view of a domain: milliseconds, with gaps filled from settings."""
    queue = config.queue_settings
    hold_ttl_s = _or_setting(config.hold_ttl_seconds, settings.hold_ttl_seconds)
    claim_ttl_s = _or_setting(config.claim_ttl_seconds, settings.claim_ttl_seconds)
    inactivity_s = _or_setting(queue.inactivity_seconds, settings.queue_inactivity_seconds)
    return DomainPolicy(
        name=name,
        hold_ttl_ms=hold_ttl_s * _MS_PER_SECOND,
        claim_ttl_ms=claim_ttl_s * _MS_PER_SECOND,
        queue_enabled=queue.enabled,
        queue_size_max=_or_setting(queue.max_size, settings.queue_max),
        queue_inactivity_ms=inactivity_s * _MS_PER_SECOND,
        advance_booking_ms=config.advance_booking_days * _MS_PER_DAY,
        cancel_allowed_until_ms=round(config.cancellation_policy.allowed_until * _MS_PER_HOUR),
        refund_percentage=config.cancellation_policy.refund_percentage,
        domain_type=config.domain_type,
        entity_name=config.entity_name,
        slot_duration_minutes=config.slot_duration,
        hold_extension_ms=config.hold_extension_seconds * _MS_PER_SECOND,
        hold_extensions_max=config.hold_extensions_max,
    )


def _or_setting(value: int | None, setting: int) -> int:
    return setting if value is None else value


def notification_channels(settings: Settings) -> dict[str, frozenset[str]]:
    """Each domain's ``queueSettings.notificationChannels``: which channels its
    slots' events use (``"email"``, ``"webhook"``, ...); ``default`` is always
    present. For the delivery workers, which need no policy and no gateway."""
    return {
        name: frozenset(config.queue_settings.notification_channels)
        for name, config in load_domain_configs(settings).items()
    }


def load_policies(settings: Settings) -> PolicyBook:
    """Every domain's policy by name; ``default`` is always present."""
    return {
        name: resolve_policy(name, config, settings)
        for name, config in load_domain_configs(settings).items()
    }
