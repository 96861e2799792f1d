"""How tokens are verified, as values: ``AuthSettings`` and the tables it draws on.

This module owns the ``SLOTENGINE_JWT_*`` variable names (docs/api.md,
"Settings"), the algorithm tables (which names exist, the defaults, the
shortest HMAC secret for each), the limits on the settings, ``AuthSettings``
and the canonical spelling of an allow-list. It must never read the
environment, a file or a key (``environment`` and ``keys`` do), and never
show the secret (``AuthSettings.__repr__`` hides it).
"""

import hashlib
from pathlib import Path
from typing import Final

import msgspec

from config.settings import ConfigError

# -- the environment (docs/api.md, "Settings") -----------------------------------
ENV_SECRET: Final = "SLOTENGINE_JWT_SECRET"
ENV_PUBLIC_KEY_FILE: Final = "SLOTENGINE_JWT_PUBLIC_KEY_FILE"
ENV_JWKS_FILE: Final = "SLOTENGINE_JWT_JWKS_FILE"
ENV_ALGORITHMS: Final = "SLOTENGINE_JWT_ALGORITHMS"
ENV_ISSUER: Final = "SLOTENGINE_JWT_ISSUER"
ENV_AUDIENCE: Final = "SLOTENGINE_JWT_AUDIENCE"
ENV_LEEWAY_SECONDS: Final = "SLOTENGINE_JWT_LEEWAY_SECONDS"
ENV_LIFETIME_MAX_SECONDS: Final = "SLOTENGINE_JWT_LIFETIME_MAX_SECONDS"

# -- algorithms ------------------------------------------------------------------
HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# JWS names an EC algorithm by its curve: a key verifies exactly one of them.
EC_ALGORITHM_BY_CURVE: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
EDDSA_ALGORITHMS: Final = ("EdDSA",)
SUPPORTED_ALGORITHMS: Final = (
    *HMAC_ALGORITHMS,
    *RSA_ALGORITHMS,
    *EC_ALGORITHM_BY_CURVE.values(),
    *EDDSA_ALGORITHMS,
)
_CANONICAL_ALGORITHM: Final = {name.lower(): name for name in SUPPORTED_ALGORITHMS}
# The allow-list when none is configured: HS256 for the secret, and for a
# public key or JWKS the two algorithms identity providers sign with.
DEFAULT_SECRET_ALGORITHMS: Final = ("HS256",)
DEFAULT_PUBLIC_KEY_ALGORITHMS: Final = ("RS256", "ES256")
# RFC 7518, section 3.2: an HMAC key at least as long as the hash output.
HMAC_SECRET_BYTES_MIN: Final = {
    "HS256": hashlib.sha256().digest_size,
    "HS384": hashlib.sha384().digest_size,
    "HS512": hashlib.sha512().digest_size,
}

# -- limits (unit last) ----------------------------------------------------------
# A development token valid for more than a year is a leaked credential
# waiting to happen.
TOKEN_TTL_MAX_S: Final = 366 * 86_400
# Clock skew between us and an identity provider; past five minutes it is
# not skew but a broken clock.
LEEWAY_MAX_S: Final = 300


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How tokens are verified; ``auth_settings_from_env`` reads it from the environment.

    ``algorithms`` is the allow-list. Empty means the defaults for the
    configured keys: ``DEFAULT_SECRET_ALGORITHMS`` when there is a secret, plus
    those of ``DEFAULT_PUBLIC_KEY_ALGORITHMS`` the public key or JWKS can
    verify. ``auth_settings_from_env`` always fills it in, so settings read
    from the environment show the exact list; ``Verifier.algorithms`` has the
    effective one either way. HS* always needs ``secret``: a public key never
    verifies an HMAC algorithm. At most one of ``public_key_file`` and
    ``jwks_file`` may be set.
    """

    secret: str | None = None
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    algorithms: tuple[str, ...] = ()
    issuer: str | None = None
    audience: str | None = None
    leeway_s: int = 0
    # The longest a token may still be valid when it is presented: a token
    # whose ``exp`` lies further ahead is refused, however it was signed.
    lifetime_max_s: int = TOKEN_TTL_MAX_S

    def __repr__(self) -> str:
        # Settings end up in start-up logs: never print the secret.
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "secret" and value is not None:
                value = "***"
            parts.append(f"{name}={value!r}")
        return f"AuthSettings({', '.join(parts)})"


def canonical_algorithms(names: tuple[str, ...]) -> tuple[str, ...]:
    """The allow-list with JWS spelling, duplicates dropped; ``none`` and unknowns refused."""
    canonical: list[str] = []
    for name in names:
        if name.strip().lower() == "none":
            raise ConfigError(f"{ENV_ALGORITHMS}: 'none' is never accepted (unsigned tokens)")
        algorithm = _CANONICAL_ALGORITHM.get(name.strip().lower())
        if algorithm is None:
            raise ConfigError(
                f"{ENV_ALGORITHMS}: unknown algorithm {name!r}, "
                f"expected some of {', '.join(SUPPORTED_ALGORITHMS)}"
            )
        if algorithm not in canonical:
            canonical.append(algorithm)
    return tuple(canonical)
