"""The verification keys of one configuration, loaded and checked once.

This module owns the key ring: the HMAC secret, a PEM public key or
certificate, or the signing keys of a JWKS file, each with the algorithms it
may verify, and the choice of key for a token's ``alg`` and ``kid``. It reads
the key files when the ring is loaded (at start) and raises ``ConfigError``
on a bad configuration. It must never be loaded per request, never let a key
verify an algorithm outside its own fixed list, and never accept a private
or symmetric key where a public one belongs.

Theory of operation, and why key confusion cannot happen:

- Every key the verifier holds carries the algorithms it may verify, fixed
  at start from the configured allow-list and the key's own type: the HMAC
  secret only HS*, an RSA key only RS*/PS*, an EC key only the ES* of its
  curve, an Ed25519/Ed448 key only EdDSA. ``Key`` refuses any other
  pairing, so a public key is never used as an HMAC secret.
- A token's (unverified) ``alg`` header only routes it: HS* to the secret,
  anything else to a public key (by ``kid``). PyJWT then checks the
  signature with that key and that key's fixed algorithm list, never with a
  list derived from the token. ``none`` is never in any list.
"""

import json
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from config.settings import ConfigError
from gateway.auth.principal import AuthError
from gateway.auth.settings import (
    DEFAULT_PUBLIC_KEY_ALGORITHMS,
    DEFAULT_SECRET_ALGORITHMS,
    EC_ALGORITHM_BY_CURVE,
    EDDSA_ALGORITHMS,
    ENV_ALGORITHMS,
    ENV_JWKS_FILE,
    ENV_LEEWAY_SECONDS,
    ENV_LIFETIME_MAX_SECONDS,
    ENV_PUBLIC_KEY_FILE,
    ENV_SECRET,
    HMAC_ALGORITHMS,
    HMAC_SECRET_BYTES_MIN,
    LEEWAY_MAX_S,
    RSA_ALGORITHMS,
    TOKEN_TTL_MAX_S,
    AuthSettings,
    canonical_algorithms,
)

# -- limits (unit last) ----------------------------------------------------------
# A PEM key is a few KiB and a JWKS a few dozen keys: anything far larger is
# the wrong file.
KEY_FILE_BYTES_MAX: Final = 1_048_576
JWKS_KEYS_MAX: Final = 64
# NIST SP 800-131A: RSA keys below 2,048 bits are no longer acceptable.
RSA_KEY_BITS_MIN: Final = 2_048

_PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
# JWK members that only a private or symmetric key has (RFC 7518, section 6).
_PRIVATE_JWK_MEMBERS: Final = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


# -- keys --------------------------------------------------------------------------
class Key:
    """One verification key and the algorithms it may verify (fixed at start)."""

    __slots__ = ("algorithms", "kid", "material")

    def __init__(
        self, material: bytes | _PublicKey, algorithms: tuple[str, ...], kid: str | None
    ) -> None:
        # The whole defence against key confusion: HMAC algorithms go with the
        # secret's bytes and nothing else, and the secret with nothing but them.
        is_secret = isinstance(material, bytes)
        if not algorithms or any((a in HMAC_ALGORITHMS) != is_secret for a in algorithms):
            raise RuntimeError(f"a key may not verify {', '.join(algorithms) or 'nothing'}")
        self.material = material
        self.algorithms = algorithms
        self.kid = kid


class KeyRing:
    """Every key of one configuration, loaded and checked once."""

    __slots__ = ("algorithms", "by_kid", "only_public", "secret", "use_kid")

    def __init__(
        self,
        algorithms: tuple[str, ...],
        secret: Key | None,
        public: list[Key],
        *,
        use_kid: bool,
    ) -> None:
        self.algorithms = algorithms
        self.secret = secret
        # A JWKS picks its key by kid; a single PEM key ignores the kid.
        self.use_kid = use_kid
        self.by_kid = {key.kid: key for key in public if key.kid is not None}
        # The key for a token without kid: only when there is exactly one.
        self.only_public = public[0] if len(public) == 1 else None

    @classmethod
    def load(cls, settings: AuthSettings) -> "KeyRing":
        """Read the key files and check the settings; raises ``ConfigError``."""
        if not 0 <= settings.leeway_s <= LEEWAY_MAX_S:
            raise ConfigError(
                f"{ENV_LEEWAY_SECONDS}: expected an integer between 0 and {LEEWAY_MAX_S}, "
                f"got {settings.leeway_s}"
            )
        if not 1 <= settings.lifetime_max_s <= TOKEN_TTL_MAX_S:
            raise ConfigError(
                f"{ENV_LIFETIME_MAX_SECONDS}: expected an integer between 1 and "
                f"{TOKEN_TTL_MAX_S}, got {settings.lifetime_max_s}"
            )
        if settings.public_key_file is not None and settings.jwks_file is not None:
            raise ConfigError(f"{ENV_JWKS_FILE}: set it or {ENV_PUBLIC_KEY_FILE}, not both")
        has_public = settings.public_key_file is not None or settings.jwks_file is not None
        if settings.secret is None and not has_public:
            raise ConfigError(f"{ENV_SECRET}: no secret, public key or JWKS file is configured")
        explicit = bool(settings.algorithms)
        if explicit:
            requested = canonical_algorithms(settings.algorithms)
        else:
            requested = (DEFAULT_SECRET_ALGORITHMS if settings.secret is not None else ()) + (
                DEFAULT_PUBLIC_KEY_ALGORITHMS if has_public else ()
            )
        requested_hmac = tuple(a for a in requested if a in HMAC_ALGORITHMS)
        requested_public = tuple(a for a in requested if a not in HMAC_ALGORITHMS)

        secret_key: Key | None = None
        if requested_hmac:
            if settings.secret is None:
                raise ConfigError(
                    f"{ENV_ALGORITHMS}: {', '.join(requested_hmac)} needs {ENV_SECRET} "
                    "(a public key never verifies an HMAC algorithm)"
                )
            secret_bytes = settings.secret.encode("utf-8")
            for algorithm in requested_hmac:
                needed = HMAC_SECRET_BYTES_MIN[algorithm]
                if len(secret_bytes) < needed:
                    raise ConfigError(
                        f"{ENV_SECRET}: {algorithm} needs a secret of at least {needed} bytes "
                        f"(RFC 7518, section 3.2), got {len(secret_bytes)}"
                    )
            secret_key = Key(secret_bytes, requested_hmac, None)

        public: list[Key] = []
        if settings.public_key_file is not None:
            key, key_algorithms = _load_public_key_file(settings.public_key_file)
            allowed = tuple(a for a in key_algorithms if a in requested_public)
            if not allowed:
                raise ConfigError(
                    f"{ENV_PUBLIC_KEY_FILE}: this key verifies only {', '.join(key_algorithms)}, "
                    f"none of the allowed {', '.join(requested_public) or 'algorithms'}; "
                    f"set {ENV_ALGORITHMS}"
                )
            public.append(Key(key, allowed, None))
        elif settings.jwks_file is not None:
            public = _load_jwks_file(settings.jwks_file, requested_public)

        served = {a for key in public for a in key.algorithms}
        if explicit:
            unserved = [a for a in requested_public if a not in served]
            if unserved:
                raise ConfigError(
                    f"{ENV_ALGORITHMS}: no configured public key verifies {', '.join(unserved)}"
                )
            algorithms = requested
        else:
            algorithms = requested_hmac + tuple(a for a in requested_public if a in served)
        return cls(algorithms, secret_key, public, use_kid=settings.jwks_file is not None)

    def key_for(self, algorithm: str, kid: object) -> Key:
        """The key that must verify a token with this (allowed) ``alg`` and ``kid``."""
        key: Key | None
        if algorithm in HMAC_ALGORITHMS:
            key = self.secret
        elif self.use_kid and kid is not None:
            key = self.by_kid.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise AuthError("token is signed with an unknown key (kid)")
        else:
            key = self.only_public
            if key is None:
                raise AuthError("token names no signing key (kid)")
        if key is None or algorithm not in key.algorithms:
            raise AuthError("token algorithm does not match its key")
        return key


def _read_key_file(variable: str, path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(KEY_FILE_BYTES_MAX + 1)
    except OSError as error:
        raise ConfigError(f"{variable}: cannot read {path}: {error.strerror or error}") from None
    if len(data) > KEY_FILE_BYTES_MAX:
        raise ConfigError(f"{variable}: {path} is larger than {KEY_FILE_BYTES_MAX} bytes")
    return data


def _load_public_key_file(path: Path) -> tuple[_PublicKey, tuple[str, ...]]:
    """A PEM public key (or a certificate's key) and every algorithm its type may verify."""
    data = _read_key_file(ENV_PUBLIC_KEY_FILE, path)
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(f"{ENV_PUBLIC_KEY_FILE}: {path} holds a private key; give the public key")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            loaded: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            loaded = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{ENV_PUBLIC_KEY_FILE}: {path}: expected a PEM public key or certificate"
        ) from None
    try:
        return _public_key_algorithms(loaded)
    except ValueError as error:
        raise ConfigError(f"{ENV_PUBLIC_KEY_FILE}: {path}: {error}") from None


def _load_jwks_file(path: Path, requested: tuple[str, ...]) -> list[Key]:
    """The signing keys of a JWKS file that verify at least one ``requested`` algorithm.

    Keys for encryption (``use`` other than ``sig``) and keys for algorithms
    outside the allow-list are left out; keys that cannot be parsed, private
    or symmetric keys, and duplicate kids are configuration errors.
    """
    data = _read_key_file(ENV_JWKS_FILE, path)
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise ConfigError(f"{ENV_JWKS_FILE}: {path} is not valid JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{ENV_JWKS_FILE}: {path}: expected an object with a non-empty 'keys'")
    if len(entries) > JWKS_KEYS_MAX:
        raise ConfigError(f"{ENV_JWKS_FILE}: {path} holds more than {JWKS_KEYS_MAX} keys")
    keys: list[Key] = []
    for index, entry in enumerate(entries):
        where = f"{ENV_JWKS_FILE}: {path}, key {index}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ConfigError(f"{where}: 'kid' must be a string")
        if entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            raise ConfigError(f"{where}: a symmetric key; an HMAC secret goes in {ENV_SECRET}")
        if any(member in entry for member in _PRIVATE_JWK_MEMBERS):
            raise ConfigError(f"{where}: holds private key material; publish public keys only")
        try:
            key, key_algorithms = _public_key_algorithms(_key_from_jwk(entry))
        except (ValueError, TypeError, KeyError, jwt.PyJWTError) as error:
            raise ConfigError(f"{where}: {_reason(error)}") from None
        declared = entry.get("alg")
        if declared is not None:
            if declared not in key_algorithms:
                raise ConfigError(f"{where}: 'alg' {declared!r} does not fit the key's type")
            key_algorithms = (declared,)
        allowed = tuple(a for a in key_algorithms if a in requested)
        if allowed:
            keys.append(Key(key, allowed, kid))
    if not keys:
        raise ConfigError(
            f"{ENV_JWKS_FILE}: no signing key in {path} verifies any of "
            f"{', '.join(requested) or 'the allowed algorithms'}; set {ENV_ALGORITHMS}"
        )
    kids = [key.kid for key in keys]
    if len(keys) > 1 and None in kids:
        raise ConfigError(f"{ENV_JWKS_FILE}: {path}: with several keys, each needs a 'kid'")
    duplicates = sorted({kid for kid in kids if kid is not None and kids.count(kid) > 1})
    if duplicates:
        raise ConfigError(f"{ENV_JWKS_FILE}: {path}: duplicate kid {duplicates[0]!r}")
    return keys


def _key_from_jwk(entry: dict[str, Any]) -> object:
    kty = entry.get("kty")
    if kty == "RSA":
        return RSAAlgorithm.from_jwk(entry)
    if kty == "EC":
        return ECAlgorithm.from_jwk(entry)
    if kty == "OKP":
        return OKPAlgorithm.from_jwk(entry)
    raise ValueError(f"unsupported key type {kty!r} (expected RSA, EC or OKP)")


def _public_key_algorithms(key: object) -> tuple[_PublicKey, tuple[str, ...]]:
    """The key, if it is a usable public key, and every algorithm its type may verify."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < RSA_KEY_BITS_MIN:
            raise ValueError(f"an RSA key of {key.key_size} bits, fewer than {RSA_KEY_BITS_MIN}")
        return key, RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        if algorithm is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return key, (algorithm,)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return key, EDDSA_ALGORITHMS
    raise ValueError("not a public RSA, EC, Ed25519 or Ed448 key")


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__
