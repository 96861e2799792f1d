"""``AuthSettings`` from the ``SLOTENGINE_JWT_*`` environment, checked once at start.

This module owns reading and checking those variables: blank counts as unset,
the first bad value is a one-line ``ConfigError`` naming the variable, and
without a secret, public key or JWKS the secret comes from the data dir
(``secret``), with a log line saying which file and whether it was just made.
It loads the keys once (``keys``) so a bad key fails the start, not a request.
It must never show the secret, and never run per request.
"""

import logging
from collections.abc import Mapping
from pathlib import Path

import msgspec

from config.settings import ConfigError
from gateway.auth.keys import KeyRing
from gateway.auth.secret import load_or_create_secret_file
from gateway.auth.settings import (
    ENV_ALGORITHMS,
    ENV_AUDIENCE,
    ENV_ISSUER,
    ENV_JWKS_FILE,
    ENV_LEEWAY_SECONDS,
    ENV_LIFETIME_MAX_SECONDS,
    ENV_PUBLIC_KEY_FILE,
    ENV_SECRET,
    LEEWAY_MAX_S,
    TOKEN_TTL_MAX_S,
    AuthSettings,
    canonical_algorithms,
)

_log = logging.getLogger("slotengine.auth")


# -- settings from the environment -------------------------------------------------
def auth_settings_from_env(environ: Mapping[str, str], data_dir: Path) -> AuthSettings:
    """Read and check the ``SLOTENGINE_JWT_*`` variables; load the keys once to check them.

    Without ``SLOTENGINE_JWT_SECRET`` and without a public key or JWKS, the
    secret comes from ``load_or_create_secret(data_dir)``. With a public key
    or JWKS and no secret, HS* tokens are not accepted at all. Blank values
    count as unset. Raises ``ConfigError`` (one line naming the variable,
    never showing the secret) on the first bad value.
    """
    secret = _text(environ, ENV_SECRET)
    public_key_file = _path(environ, ENV_PUBLIC_KEY_FILE)
    jwks_file = _path(environ, ENV_JWKS_FILE)
    raw_algorithms = _text(environ, ENV_ALGORITHMS)
    algorithms = () if raw_algorithms is None else _parse_algorithms(raw_algorithms)
    leeway_s = _leeway(environ)
    lifetime_max_s = _lifetime_max(environ)
    if secret is None and public_key_file is None and jwks_file is None:
        found = load_or_create_secret_file(data_dir)
        secret = found.secret
        if found.created:
            _log.warning(
                "%s is unset and %s held no signing secret: generated a new one there; "
                "tokens signed with any other secret are refused (`slotengine token` signs "
                "with this one when run with the same SLOTENGINE_DATA_DIR)",
                ENV_SECRET,
                found.path,
            )
        else:
            _log.info("HS256 tokens are verified with the secret in %s", found.path)
    settings = AuthSettings(
        secret=secret,
        public_key_file=public_key_file,
        jwks_file=jwks_file,
        algorithms=algorithms,
        issuer=_text(environ, ENV_ISSUER),
        audience=_text(environ, ENV_AUDIENCE),
        leeway_s=leeway_s,
        lifetime_max_s=lifetime_max_s,
    )
    keys = KeyRing.load(settings)
    return msgspec.structs.replace(settings, algorithms=keys.algorithms)


def _text(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name, "").strip()
    return raw or None


def _path(environ: Mapping[str, str], name: str) -> Path | None:
    raw = _text(environ, name)
    return None if raw is None else Path(raw)


def _leeway(environ: Mapping[str, str]) -> int:
    raw = _text(environ, ENV_LEEWAY_SECONDS)
    if raw is None:
        return 0
    try:
        value = int(raw, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= LEEWAY_MAX_S:
        raise ConfigError(
            f"{ENV_LEEWAY_SECONDS}: expected an integer between 0 and {LEEWAY_MAX_S}, got {raw!r}"
        )
    return value


def _lifetime_max(environ: Mapping[str, str]) -> int:
    raw = _text(environ, ENV_LIFETIME_MAX_SECONDS)
    if raw is None:
        return TOKEN_TTL_MAX_S
    try:
        value = int(raw, 10)
    except ValueError:
        value = 0
    if not 1 <= value <= TOKEN_TTL_MAX_S:
        raise ConfigError(
            f"{ENV_LIFETIME_MAX_SECONDS}: expected an integer between 1 and {TOKEN_TTL_MAX_S},"
            f" got {raw!r}"
        )
    return value


def _parse_algorithms(raw: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    if not names:
        raise ConfigError(f"{ENV_ALGORITHMS}: expected a comma-separated list, got {raw!r}")
    return canonical_algorithms(names)
