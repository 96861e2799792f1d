"""Process settings, read once from the environment (12-factor).

This module owns the names, defaults and bounds of every environment
variable the server reads (docs/api.md, "Settings"). The bounds of a
domain rule come from ``engine.core.limits``, the deployment's own (the shard
count, timeouts) are here; a bad value raises ``ConfigError`` with one line
naming the variable, so a misconfigured server refuses to start instead of
failing deep inside a request. It never touches the network and never reads
the domain files (``config.domains`` does).

An empty or blank variable counts as unset: ``DATABASE_URL=`` in an env file
means "no database configured", not "a database whose URL is empty".
"""

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import msgspec

from engine.core import limits
from engine.core.routing import PARTITIONS_MAX

Durability = Literal["commit", "relaxed"]
DURABILITY_MODES: Final[tuple[str, ...]] = get_args(Durability)
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: Final[tuple[str, ...]] = get_args(LogLevel)
# Shards of a deployment: the default, and at most (each is an actor or an
# owner with its own lease, connection and writer).
SHARDS_DEFAULT: Final = 4
SHARDS_MAX: Final = 1_024
# Browser origins allowed to call the API, at most this many.
CORS_ORIGINS_MAX: Final = 64
# Networks of trusted proxies (SLOTENGINE_TRUSTED_PROXIES), at most this many:
# each request from a new peer is checked against every one.
TRUSTED_PROXIES_MAX: Final = 64
# Live connections (WebSocket and SSE) one user may hold across the deployment:
# a dozen browser tabs, each watching its bookings and a queue or two, fit; a
# token opening thousands to exhaust a gateway does not. 0 turns the cap off.
LIVE_CONNECTIONS_PER_USER_MAX_DEFAULT: Final = 32
# A cap above what several gateways hold together is no cap: refused as a typo.
LIVE_CONNECTIONS_PER_USER_MAX_BOUND: Final = 100_000

# The domain files shipped inside this package; found through the package's
# own location so the default holds whatever directory the server starts in.
DOMAINS_DIR_DEFAULT: Final = Path(__file__).resolve().parent / "domains"
DATA_DIR_DEFAULT: Final = Path(".slotengine")

# Slow clients: a request's headers must arrive within the first from their first
# byte, its body within the second once the handler reads it. Both are small
# (headers a few hundred bytes, bodies at most 16 KB) and any client sends them
# at once: 10 s leaves room for three lost packets resent on TCP's backoff
# (1 + 2 + 4 s) on a poor link, and bounds what a trickling client holds to 10 s.
HEADER_TIMEOUT_DEFAULT_S: Final = 10
BODY_TIMEOUT_DEFAULT_S: Final = 10
# Longer would not matter: a connection idle between requests, half-sent headers
# included, is closed silently after the 75 s keep-alive timeout.
READ_TIMEOUT_MAX_S: Final = 60

# Notifications: seconds before each retry of a failed delivery (the 2nd, 3rd...
# attempt); after the last a delivery is dead. At most this many retries, each
# at most a day later.
DELIVERY_RETRY_SECONDS_DEFAULT: Final = (5, 30, 120, 600, 3600)
DELIVERY_RETRIES_MAX: Final = 20
DELIVERY_RETRY_DELAY_MAX_S: Final = 86_400
# Delivered deliveries and dispatched outbox batches are kept this long (dead
# deliveries stay until redelivered or purged by hand).
# A worker's claim on the deliveries it attempts: a worker killed mid-delivery
# leaves them to another once it lapses. Each attempt's timeout is at most half
# of it, so two workers never send one attempt at once.
DELIVERY_LEASE_SECONDS_DEFAULT: Final = 60
DELIVERY_LEASE_SECONDS_MIN: Final = 2
DELIVERY_LEASE_SECONDS_MAX: Final = 3_600
OUTBOX_RETENTION_HOURS_DEFAULT: Final = 72
# After PostgreSQL was unreachable, every hold whose deadline fell after the
# shard's last commit lasts at least this long after the recovery: its owner
# could not confirm it meanwhile. 0: no grace (they expire at the recovery).
OUTAGE_HOLD_GRACE_SECONDS_DEFAULT: Final = 60
OUTAGE_HOLD_GRACE_SECONDS_MAX: Final = 86_400
OUTBOX_RETENTION_HOURS_MAX: Final = 24 * 365

DATABASE_URL_SCHEMES: Final = ("postgresql", "postgres")
REDIS_URL_SCHEMES: Final = ("redis", "rediss", "unix", "redis+sentinel")
# Redis through Sentinel: the port of a sentinel named without one (Sentinel's own).
SENTINEL_PORT_DEFAULT: Final = 26_379
# A Redis database number is at most this (the server's default `databases 16`
# allows 0-15; a larger setting is rare, a larger number a typo).
REDIS_DB_MAX: Final = 1_000
# smtp: plain (STARTTLS with ?starttls=true), smtps: TLS from the first byte.
SMTP_URL_SCHEMES: Final = ("smtp", "smtps")
# The ports an SMTP URL without one means: relay, implicit TLS, submission with
# STARTTLS (RFC 5321, RFC 8314, RFC 6409).
SMTP_PORT: Final = 25
SMTPS_PORT: Final = 465
SUBMISSION_PORT: Final = 587
# The sender of notification email when SLOTENGINE_MAIL_FROM is unset.
MAIL_FROM_DEFAULT: Final = "slotengine@localhost"
# An address as the From header takes it: local part, "@", domain; no spaces or
# angle brackets (a display name is not taken).
_MAIL_ADDRESS: Final = re.compile(r"^[^@\s<>\",]+@[^@\s<>\",]+$")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """The configuration is unusable. The message is one line naming the culprit."""

    def __init__(self, message: str) -> None:
        # One line whatever the cause: a wrapped parser message may carry newlines.
        super().__init__(" ".join(message.split()))


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the process reads from its environment, parsed and checked.

    ``None`` for a URL means "not configured": the server then starts the
    embedded service (or a local Ray) instead.
    """

    database_url: str | None = None
    redis_url: str | None = None
    ray_address: str | None = None
    # None: the server keeps a random secret per data dir (see docs/api.md).
    jwt_secret: str | None = None
    # The data keys sealing contact details and webhook secrets (``id:base64``,
    # the primary first); None: the key kept in the data dir
    # (persistence/sealing.py, ``load_key_ring``).
    data_key: str | None = None
    hold_ttl_seconds: int = limits.HOLD_TTL_DEFAULT_S
    claim_ttl_seconds: int = limits.CLAIM_TTL_DEFAULT_S
    queue_max: int = limits.QUEUE_SIZE_DEFAULT
    shards: int = SHARDS_DEFAULT
    # P, the number of partitions, for a database created by this start; None:
    # PARTITIONS_DEFAULT. A database keeps the P it was created with, and a start
    # that asks for another is refused (persistence/partitioning.py).
    partitions: int | None = None
    durability: Durability = "commit"
    # On Ray: when a node joins, shard actors are restarted on it until every node
    # holds its share (engine/shell/scaling.py, the same as `cluster rebalance`).
    auto_rebalance: bool = False
    queue_inactivity_seconds: int = limits.QUEUE_INACTIVITY_DEFAULT_S
    domains_dir: Path = DOMAINS_DIR_DEFAULT
    data_dir: Path = DATA_DIR_DEFAULT
    # Origins (scheme://host[:port]) whose browser pages may call the API; () none.
    cors_origins: tuple[str, ...] = ()
    log_level: LogLevel = "info"
    # Live connections one user may hold across every gateway; 0 means no cap.
    live_connections_per_user_max: int = LIVE_CONNECTIONS_PER_USER_MAX_DEFAULT
    header_timeout_seconds: int = HEADER_TIMEOUT_DEFAULT_S
    body_timeout_seconds: int = BODY_TIMEOUT_DEFAULT_S
    # The transactional outbox and its deliveries (engine/notify); off, changes
    # leave the engine only over live connections.
    notifications: bool = True
    delivery_retry_seconds: tuple[int, ...] = DELIVERY_RETRY_SECONDS_DEFAULT
    delivery_lease_seconds: int = DELIVERY_LEASE_SECONDS_DEFAULT
    outbox_retention_hours: int = OUTBOX_RETENTION_HOURS_DEFAULT
    outage_hold_grace_seconds: int = OUTAGE_HOLD_GRACE_SECONDS_DEFAULT
    # None: no notification email is sent (engine/notify/mail.py's Mailer).
    smtp_url: str | None = None
    mail_from: str = MAIL_FROM_DEFAULT
    # Webhook endpoints may be private, loopback or link-local addresses: for
    # local setups and tests only (the guard against request forgery is off).
    webhook_allow_private: bool = False
    # The header naming the client behind a proxy (X-Forwarded-For), believed only
    # from a peer in trusted_proxies (CIDR networks); None: the socket's peer is
    # the client. Set both or neither.
    trusted_proxy_header: str | None = None
    trusted_proxies: tuple[str, ...] = ()

    def __repr__(self) -> str:
        # Settings end up in start-up logs: never print a secret or a password.
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in ("jwt_secret", "data_key") and value is not None:
                value = "***"
            elif name in ("database_url", "redis_url", "smtp_url") and value is not None:
                value = _redact_url(value)
            parts.append(f"{name}={value!r}")
        return f"Settings({', '.join(parts)})"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting from ``environ`` (default: ``os.environ``).

    Raises ``ConfigError`` on the first bad value.
    """
    if environ is None:
        environ = os.environ
    env = _Environment(environ)
    proxy_header, proxies = _trusted_proxies(env)
    return Settings(
        database_url=env.read("DATABASE_URL", _url(DATABASE_URL_SCHEMES), shown=_redact_url),
        redis_url=_redis_url(env),
        ray_address=env.read("RAY_ADDRESS", str),
        jwt_secret=env.read("SLOTENGINE_JWT_SECRET", str),
        data_key=env.read("SLOTENGINE_DATA_KEY", str),
        hold_ttl_seconds=env.read_or(
            "SLOTENGINE_HOLD_TTL_SECONDS",
            _integer(limits.HOLD_TTL_MIN_S, limits.HOLD_TTL_MAX_S),
            limits.HOLD_TTL_DEFAULT_S,
        ),
        claim_ttl_seconds=env.read_or(
            "SLOTENGINE_CLAIM_TTL_SECONDS",
            _integer(limits.HOLD_TTL_MIN_S, limits.HOLD_TTL_MAX_S),
            limits.CLAIM_TTL_DEFAULT_S,
        ),
        queue_max=env.read_or(
            "SLOTENGINE_QUEUE_MAX",
            _integer(1, limits.QUEUE_SIZE_MAX),
            limits.QUEUE_SIZE_DEFAULT,
        ),
        shards=env.read_or(
            "SLOTENGINE_SHARDS",
            _integer(1, SHARDS_MAX),
            SHARDS_DEFAULT,
        ),
        partitions=env.read_or("SLOTENGINE_PARTITIONS", _integer(1, PARTITIONS_MAX), None),
        durability=env.read_or("SLOTENGINE_DURABILITY", _durability, "commit"),
        auto_rebalance=env.read_or("SLOTENGINE_AUTO_REBALANCE", _boolean, False),
        queue_inactivity_seconds=env.read_or(
            "SLOTENGINE_QUEUE_INACTIVITY_SECONDS",
            _integer(1, limits.QUEUE_INACTIVITY_MAX_S),
            limits.QUEUE_INACTIVITY_DEFAULT_S,
        ),
        domains_dir=env.read_or("SLOTENGINE_DOMAINS_DIR", Path, DOMAINS_DIR_DEFAULT),
        data_dir=env.read_or("SLOTENGINE_DATA_DIR", Path, DATA_DIR_DEFAULT),
        cors_origins=env.read_or("SLOTENGINE_CORS_ORIGINS", _origins, ()),
        log_level=env.read_or("SLOTENGINE_LOG_LEVEL", _log_level, "info"),
        live_connections_per_user_max=env.read_or(
            "SLOTENGINE_LIVE_CONNECTIONS_PER_USER_MAX",
            _integer(0, LIVE_CONNECTIONS_PER_USER_MAX_BOUND),
            LIVE_CONNECTIONS_PER_USER_MAX_DEFAULT,
        ),
        header_timeout_seconds=env.read_or(
            "SLOTENGINE_HEADER_TIMEOUT_SECONDS",
            _integer(1, READ_TIMEOUT_MAX_S),
            HEADER_TIMEOUT_DEFAULT_S,
        ),
        body_timeout_seconds=env.read_or(
            "SLOTENGINE_BODY_TIMEOUT_SECONDS",
            _integer(1, READ_TIMEOUT_MAX_S),
            BODY_TIMEOUT_DEFAULT_S,
        ),
        notifications=env.read_or("SLOTENGINE_NOTIFICATIONS", _boolean, True),
        delivery_retry_seconds=env.read_or(
            "SLOTENGINE_DELIVERY_RETRY_SECONDS", _retry_schedule, DELIVERY_RETRY_SECONDS_DEFAULT
        ),
        delivery_lease_seconds=env.read_or(
            "SLOTENGINE_DELIVERY_LEASE_SECONDS",
            _integer(DELIVERY_LEASE_SECONDS_MIN, DELIVERY_LEASE_SECONDS_MAX),
            DELIVERY_LEASE_SECONDS_DEFAULT,
        ),
        outbox_retention_hours=env.read_or(
            "SLOTENGINE_OUTBOX_RETENTION_HOURS",
            _integer(1, OUTBOX_RETENTION_HOURS_MAX),
            OUTBOX_RETENTION_HOURS_DEFAULT,
        ),
        outage_hold_grace_seconds=env.read_or(
            "SLOTENGINE_OUTAGE_HOLD_GRACE_SECONDS",
            _integer(0, OUTAGE_HOLD_GRACE_SECONDS_MAX),
            OUTAGE_HOLD_GRACE_SECONDS_DEFAULT,
        ),
        smtp_url=env.read("SLOTENGINE_SMTP_URL", _smtp_url, shown=_redact_url),
        mail_from=env.read_or("SLOTENGINE_MAIL_FROM", _mail_address, MAIL_FROM_DEFAULT),
        webhook_allow_private=env.read_or("SLOTENGINE_WEBHOOK_ALLOW_PRIVATE", _boolean, False),
        trusted_proxy_header=proxy_header,
        trusted_proxies=proxies,
    )


def _trusted_proxies(env: "_Environment") -> tuple[str | None, tuple[str, ...]]:
    header = env.read("SLOTENGINE_TRUSTED_PROXY_HEADER", _header_name)
    no_proxies: tuple[str, ...] = ()
    proxies = env.read_or("SLOTENGINE_TRUSTED_PROXIES", _networks, no_proxies)
    if (header is None) != (not proxies):
        missing = (
            "SLOTENGINE_TRUSTED_PROXIES"
            if header is not None
            else ("SLOTENGINE_TRUSTED_PROXY_HEADER")
        )
        raise ConfigError(
            f"{missing}: required with the other: a proxy header is believed only from"
            " the trusted proxies' networks"
        )
    return header, proxies


# An HTTP header name (RFC 9110's token).
_HEADER_NAME: Final = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _header_name(raw: str) -> str:
    if not _HEADER_NAME.match(raw):
        raise ValueError(f"expected a header name like X-Forwarded-For, not {raw!r}")
    return raw


def _networks(raw: str) -> tuple[str, ...]:
    """A comma-separated list of CIDR networks (or single addresses)."""
    networks = []
    for part in filter(None, (piece.strip() for piece in raw.split(","))):
        try:
            networks.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"expected CIDR networks like 10.0.0.0/8, not {part!r}") from None
    if len(networks) > TRUSTED_PROXIES_MAX:
        raise ValueError(f"expected at most {TRUSTED_PROXIES_MAX} networks")
    return tuple(networks)


class _Environment:
    """Reads variables and turns a parser's ``ValueError`` into a ``ConfigError``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def read(
        self,
        name: str,
        parse: Callable[[str], _T],
        shown: Callable[[str], str] = str,
    ) -> _T | None:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return None
        try:
            return parse(raw)
        except ValueError as error:
            raise ConfigError(f"{name}: {error}, got {shown(raw)!r}") from None

    def read_or(self, name: str, parse: Callable[[str], _T], default: _T) -> _T:
        value = self.read(name, parse)
        return default if value is None else value


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        expected = f"expected an integer between {low} and {high}"
        try:
            value = int(raw, 10)
        except ValueError:
            raise ValueError(expected) from None
        if not low <= value <= high:
            raise ValueError(expected)
        return value

    return parse


def _durability(raw: str) -> Durability:
    value = raw.lower()
    if value == "commit":
        return "commit"
    if value == "relaxed":
        return "relaxed"
    raise ValueError(f"expected one of {', '.join(map(repr, DURABILITY_MODES))}")


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _retry_schedule(raw: str) -> tuple[int, ...]:
    """``5,30,120``: whole seconds before each retry, in order; ``none`` for no retry."""
    if raw.strip().lower() == "none":
        return ()
    parse = _integer(1, DELIVERY_RETRY_DELAY_MAX_S)
    delays = tuple(parse(part.strip()) for part in raw.split(","))
    if len(delays) > DELIVERY_RETRIES_MAX:
        raise ValueError(f"at most {DELIVERY_RETRIES_MAX} retries")
    return delays


def _log_level(raw: str) -> LogLevel:
    value = raw.lower()
    for level in get_args(LogLevel):
        if value == level:
            return level  # type: ignore[no-any-return]
    raise ValueError(f"expected one of {', '.join(map(repr, LOG_LEVELS))}")


_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


def _origins(raw: str) -> tuple[str, ...]:
    """A comma-separated list of exact origins, or "*" for any."""
    origins = tuple(part.strip().rstrip("/") for part in raw.split(",") if part.strip())
    if origins == ("*",):
        return origins
    if len(origins) > CORS_ORIGINS_MAX:
        raise ValueError(f"expected at most {CORS_ORIGINS_MAX} origins")
    for origin in origins:
        if not _ORIGIN.match(origin):
            raise ValueError(f"expected origins like https://app.example.com, not {origin!r}")
    return origins


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        expected = f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}"
        try:
            scheme = urlsplit(raw).scheme
        except ValueError as error:
            raise ValueError(f"expected a valid URL ({error})") from None
        if scheme.lower() not in schemes or "://" not in raw:
            raise ValueError(expected)
        return raw

    return parse


class SmtpTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Where notification email goes, from ``SLOTENGINE_SMTP_URL``.

    ``smtp://host:port`` speaks plain SMTP; ``?starttls=true`` upgrades it
    with STARTTLS before anything else is sent; ``smtps://`` is TLS from the
    first byte. A user (and password) in the URL, percent-decoded, means AUTH.
    """

    host: str
    port: int
    implicit_tls: bool
    starttls: bool
    username: str | None
    password: str | None

    def __repr__(self) -> str:
        # Never print the password: the target may end up in a log line.
        return (
            f"SmtpTarget(host={self.host!r}, port={self.port}, implicit_tls={self.implicit_tls},"
            f" starttls={self.starttls}, username={self.username!r})"
        )


def parse_smtp_url(raw: str) -> SmtpTarget:
    """``SLOTENGINE_SMTP_URL`` parsed; ``ValueError`` (without the password) if unusable."""
    _url(SMTP_URL_SCHEMES)(raw)
    parts = urlsplit(raw)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("expected a port between 1 and 65535") from None
    if not parts.hostname:
        raise ValueError("expected a host: smtp://host:port")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError("expected no path: smtp://host:port")
    implicit_tls = parts.scheme.lower() == "smtps"
    starttls = False
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name != "starttls":
            raise ValueError(f"unknown parameter {name!r} (only starttls)")
        starttls = _boolean(value)
    if starttls and implicit_tls:
        raise ValueError("starttls is for smtp://; smtps:// is TLS already")
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    return SmtpTarget(
        host=parts.hostname,
        port=port or (SMTPS_PORT if implicit_tls else SUBMISSION_PORT if starttls else SMTP_PORT),
        implicit_tls=implicit_tls,
        starttls=starttls,
        username=username or None,
        password=password,
    )


class SentinelTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Redis through Sentinel, from a ``redis+sentinel://`` URL.

    ``redis+sentinel://[:password@]host1[:port1],host2[:port2],.../service[/db]``:
    the sentinels to ask (port 26379 where none is given), the name of the
    master they watch (``sentinel monitor <service> ...``), and the database
    number (0 by default). The password, percent-decoded, is the master's
    (``requirepass``); the sentinels are asked without one.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None

    def __repr__(self) -> str:
        # Never print the password: the target may end up in a log line.
        password = None if self.password is None else "***"
        return (
            f"SentinelTarget(sentinels={self.sentinels!r}, service={self.service!r},"
            f" db={self.db!r}, password={password!r})"
        )


SENTINEL_URL_FORM: Final = "redis+sentinel://[:password@]host:port,host:port,.../service[/db]"


def parse_sentinel_url(raw: str) -> SentinelTarget:
    """The sentinels, service, database and password of a ``redis+sentinel://`` URL.

    Raises ``ValueError`` saying what is wrong.
    """
    scheme, separator, rest = raw.partition("://")
    if scheme.lower() != "redis+sentinel" or not separator:
        raise ValueError(f"expected {SENTINEL_URL_FORM}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"expected no query or fragment: {SENTINEL_URL_FORM}")
    location, slash, path = rest.partition("/")
    password = None
    if "@" in location:
        credentials, _, location = location.rpartition("@")
        user, colon, secret = credentials.partition(":")
        if not colon or user:
            raise ValueError(f"expected a password only (':password@'): {SENTINEL_URL_FORM}")
        password = unquote(secret) or None
    sentinels = tuple(_sentinel_address(part) for part in location.split(","))
    segments = path.split("/") if slash else []
    if not segments or not segments[0]:
        raise ValueError(f"expected the service name after the sentinels: {SENTINEL_URL_FORM}")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1]):
        raise ValueError(f"expected at most a database after the service: {SENTINEL_URL_FORM}")
    service = unquote(segments[0])
    db = 0
    if len(segments) == 2:
        db = _integer(0, REDIS_DB_MAX)(segments[1])
    return SentinelTarget(sentinels=sentinels, service=service, db=db, password=password)


def _sentinel_address(raw: str) -> tuple[str, int]:
    part = raw.strip()
    if not part:
        raise ValueError(f"expected at least one sentinel host: {SENTINEL_URL_FORM}")
    if part.startswith("["):  # an IPv6 address: [::1]:26379
        host, bracket, tail = part[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"expected [address]:port for an IPv6 sentinel, got {part!r}")
        port_text = tail[1:]
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise ValueError(f"expected a sentinel host, got {part!r}")
    if not port_text:
        return host, SENTINEL_PORT_DEFAULT
    try:
        port = _integer(1, 65_535)(port_text)
    except ValueError:
        raise ValueError(f"expected a port between 1 and 65535 for {host!r}") from None
    return host, port


def _redis_url(env: "_Environment") -> str | None:
    """``REDIS_URL``, or the ``redis+sentinel://`` URL ``SLOTENGINE_REDIS_SENTINELS``
    and ``SLOTENGINE_REDIS_SENTINEL_SERVICE`` stand for; never both."""

    def checked(raw: str) -> str:
        _url(REDIS_URL_SCHEMES)(raw)
        if raw.lower().startswith("redis+sentinel:"):
            parse_sentinel_url(raw)
        return raw

    url = env.read("REDIS_URL", checked, shown=_redact_url)
    sentinels = env.read("SLOTENGINE_REDIS_SENTINELS", str)
    service = env.read("SLOTENGINE_REDIS_SENTINEL_SERVICE", str)
    if sentinels is None:
        if service is not None:
            raise ConfigError(
                "SLOTENGINE_REDIS_SENTINEL_SERVICE: set only with SLOTENGINE_REDIS_SENTINELS"
            )
        return url
    if url is not None:
        raise ConfigError(
            "SLOTENGINE_REDIS_SENTINELS: set either it or REDIS_URL, not both"
            " (a password or a database goes in a redis+sentinel:// REDIS_URL)"
        )
    if service is None:
        raise ConfigError(
            "SLOTENGINE_REDIS_SENTINEL_SERVICE: expected the name of the master the"
            " sentinels watch, since SLOTENGINE_REDIS_SENTINELS is set"
        )
    hosts = ",".join(part.strip() for part in sentinels.split(","))
    composed = f"redis+sentinel://{hosts}/{quote(service.strip(), safe='')}"
    try:
        parse_sentinel_url(composed)
    except ValueError as error:
        raise ConfigError(f"SLOTENGINE_REDIS_SENTINELS: {error}, got {sentinels!r}") from None
    return composed


def _smtp_url(raw: str) -> str:
    parse_smtp_url(raw)
    return raw


def _mail_address(raw: str) -> str:
    if not _MAIL_ADDRESS.match(raw):
        raise ValueError("expected an address like bookings@example.com")
    return raw


_URL_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")


def _redact_url(raw: str) -> str:
    """The URL with its password masked, fit for an error message."""
    return _URL_PASSWORD.sub(r"\1***@", raw)
