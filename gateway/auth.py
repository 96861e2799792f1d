"""Bearer tokens: who is calling, and in which role (docs/api.md, "Authentication").

This module owns JWT verification, the signing secret kept in the data dir,
the ``SLOTENGINE_JWT_*`` settings, and the role rules (``require_role``,
``acting_user``). It knows nothing of aiohttp: the gateway hands it the raw
``Authorization`` header value or the ``?token=`` query value and maps
``AuthError`` to 401 and ``Forbidden`` to 403. Its messages are safe to send
back: they never echo a token or a secret.

Keys are loaded once, when the ``Verifier`` is built; ``verify`` runs per
request and never touches a file.

Theory of operation, and why key confusion cannot happen:

- Every key the verifier holds carries the algorithms it may verify, fixed
  at start from the configured allow-list and the key's own type: the HMAC
  secret only HS*, an RSA key only RS*/PS*, an EC key only the ES* of its
  curve, an Ed25519/Ed448 key only EdDSA. ``_Key`` refuses any other
  pairing, so a public key is never used as an HMAC secret.
- A token's (unverified) ``alg`` header only routes it: HS* to the secret,
  anything else to a public key (by ``kid``). PyJWT then checks the
  signature with that key and that key's fixed algorithm list, never with a
  list derived from the token. ``none`` is never in any list.
"""

import binascii
import hashlib
import json
import logging
import math
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, NamedTuple, get_args

import jwt
import msgspec
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import base64url_decode, base64url_encode

from config.settings import ConfigError
from engine.core import limits

_log = logging.getLogger("slotengine.auth")

Role = Literal["user", "admin", "service"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
ROLE_DEFAULT: Final[Role] = "user"
_ROLE_BY_NAME: Final[dict[str, Role]] = {role: role for role in ROLES}

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
_EC_ALGORITHM_BY_CURVE: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
EDDSA_ALGORITHMS: Final = ("EdDSA",)
SUPPORTED_ALGORITHMS: Final = (
    *HMAC_ALGORITHMS,
    *RSA_ALGORITHMS,
    *_EC_ALGORITHM_BY_CURVE.values(),
    *EDDSA_ALGORITHMS,
)
_CANONICAL_ALGORITHM: Final = {name.lower(): name for name in SUPPORTED_ALGORITHMS}
# The allow-list when none is configured: HS256 for the secret, and for a
# public key or JWKS the two algorithms identity providers sign with.
DEFAULT_SECRET_ALGORITHMS: Final = ("HS256",)
DEFAULT_PUBLIC_KEY_ALGORITHMS: Final = ("RS256", "ES256")
# RFC 7518, section 3.2: an HMAC key at least as long as the hash output.
_HMAC_SECRET_BYTES_MIN: Final = {
    "HS256": hashlib.sha256().digest_size,
    "HS384": hashlib.sha384().digest_size,
    "HS512": hashlib.sha512().digest_size,
}

# -- limits (unit last) ----------------------------------------------------------
# aiohttp refuses header lines past 8,190 bytes anyway; a longer ``?token=`` is
# not a token we issued or an IdP would, so it is refused before any parsing.
TOKEN_CHARS_MAX: Final = 8_192
# Tokens remembered as verified, until they expire (a few hundred bytes each).
VERIFIED_TOKENS_MAX: Final = 100_000
# Distinct token headers remembered (an issuer's tokens share one per key).
TOKEN_HEADERS_MAX: Final = 64
# Secrets whose HMAC key checks are remembered (the configured ones).
PREPARED_SECRETS_MAX: Final = 8
# A development token valid for more than a year is a leaked credential
# waiting to happen.
TOKEN_TTL_MAX_S: Final = 366 * 86_400
# Clock skew between us and an identity provider; past five minutes it is
# not skew but a broken clock.
LEEWAY_MAX_S: Final = 300
# The claims PyJWT reads as ``int(value)``: a numeric string or a boolean would
# pass there, so they must be JSON numbers (RFC 7519, section 2: NumericDate).
_TIME_CLAIMS: Final = ("exp", "nbf", "iat")
# A PEM key is a few KiB and a JWKS a few dozen keys: anything far larger is
# the wrong file.
KEY_FILE_BYTES_MAX: Final = 1_048_576
JWKS_KEYS_MAX: Final = 64
# NIST SP 800-131A: RSA keys below 2,048 bits are no longer acceptable.
RSA_KEY_BITS_MIN: Final = 2_048

# -- the generated secret ----------------------------------------------------------
SECRET_FILE_NAME: Final = "jwt_secret"
# 256 bits, the HS256 minimum (RFC 7518, section 3.2).
SECRET_GENERATED_BYTES: Final = 32
SECRET_FILE_BYTES_MAX: Final = 4_096
_SECRET_FILE_MODE: Final = 0o600

_PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
# JWK members that only a private or symmetric key has (RFC 7518, section 6).
_PRIVATE_JWK_MEMBERS: Final = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


# -- errors ------------------------------------------------------------------------
class AccessDenied(Exception):
    """The request may not proceed. ``message`` is safe to send to the client."""

    status: ClassVar[int]
    code: ClassVar[str]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AuthError(AccessDenied):
    """No valid token: missing, malformed, expired, badly signed or unacceptable (401)."""

    status = 401
    code = "Unauthorized"


class Forbidden(AccessDenied):
    """A valid token whose role does not allow the operation (403)."""

    status = 403
    code = "Forbidden"


# -- values ------------------------------------------------------------------------
class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The verified caller of one request."""

    subject: str
    role: Role
    # The token's ``jti``, when it has one.
    token_id: str | None
    expires_at_s: int


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


# -- the secret kept in the data dir ----------------------------------------------
class SecretFile(NamedTuple):
    secret: str
    path: Path
    created: bool  # generated by this call: tokens signed before cannot verify with it


def load_or_create_secret(data_dir: Path) -> str:
    """The HS256 secret kept in ``data_dir/jwt_secret``, created on first use
    (``load_or_create_secret_file`` says which file, and whether it was created)."""
    return load_or_create_secret_file(data_dir).secret


def load_or_create_secret_file(data_dir: Path) -> SecretFile:
    """The HS256 secret kept in ``data_dir/jwt_secret``, created on first use.

    The server (when ``SLOTENGINE_JWT_SECRET`` is unset) and ``slotengine
    token`` both call this, so the tokens the command prints verify on a
    server using the same data dir. The file holds a random 256-bit url-safe
    secret, mode 0600; it is published with a hard link, so two processes
    starting at once agree on one secret. A file other users can read, or
    one too short for HS256, is refused with a ``ConfigError``.
    """
    path = data_dir.resolve() / SECRET_FILE_NAME
    try:
        return SecretFile(_read_secret_file(path), path, created=False)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise _secret_file_error(path, error.strerror or str(error)) from None
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = _publish_secret_file(path, secrets.token_urlsafe(SECRET_GENERATED_BYTES))
        return SecretFile(_read_secret_file(path), path, created)
    except OSError as error:
        raise _secret_file_error(path, error.strerror or str(error)) from None


def _read_secret_file(path: Path) -> str:
    with path.open("rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise _secret_file_error(
                path, f"other users may read it (mode {stat.S_IMODE(mode):o}); chmod 600 it"
            )
        data = file.read(SECRET_FILE_BYTES_MAX + 1)
    if len(data) > SECRET_FILE_BYTES_MAX:
        raise _secret_file_error(path, f"larger than {SECRET_FILE_BYTES_MAX} bytes")
    try:
        secret = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _secret_file_error(path, "not UTF-8 text") from None
    needed = _HMAC_SECRET_BYTES_MIN["HS256"]
    if len(secret.encode("utf-8")) < needed:
        raise _secret_file_error(path, f"holds fewer than {needed} bytes")
    return secret


def _publish_secret_file(path: Path, secret: str) -> bool:
    """Write ``secret`` to ``path`` unless it exists, never exposing a partial file;
    False if it existed."""
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    temporary = Path(temporary_name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), _SECRET_FILE_MODE)
            file.write(secret.encode("ascii") + b"\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False  # another process won the race: its secret stands
        _fsync_directory(path.parent)
        return True
    finally:
        temporary.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _secret_file_error(path: Path, reason: str) -> ConfigError:
    return ConfigError(f"{ENV_SECRET} is unset and the secret file {path} is unusable: {reason}")


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
    keys = _KeyRing.load(settings)
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
    return _canonical_algorithms(names)


def _canonical_algorithms(names: tuple[str, ...]) -> tuple[str, ...]:
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


# -- keys --------------------------------------------------------------------------
class _Key:
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


class _KeyRing:
    """Every key of one configuration, loaded and checked once."""

    __slots__ = ("algorithms", "by_kid", "only_public", "secret", "use_kid")

    def __init__(
        self,
        algorithms: tuple[str, ...],
        secret: _Key | None,
        public: list[_Key],
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
    def load(cls, settings: AuthSettings) -> "_KeyRing":
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
            requested = _canonical_algorithms(settings.algorithms)
        else:
            requested = (DEFAULT_SECRET_ALGORITHMS if settings.secret is not None else ()) + (
                DEFAULT_PUBLIC_KEY_ALGORITHMS if has_public else ()
            )
        requested_hmac = tuple(a for a in requested if a in HMAC_ALGORITHMS)
        requested_public = tuple(a for a in requested if a not in HMAC_ALGORITHMS)

        secret_key: _Key | None = None
        if requested_hmac:
            if settings.secret is None:
                raise ConfigError(
                    f"{ENV_ALGORITHMS}: {', '.join(requested_hmac)} needs {ENV_SECRET} "
                    "(a public key never verifies an HMAC algorithm)"
                )
            secret_bytes = settings.secret.encode("utf-8")
            for algorithm in requested_hmac:
                needed = _HMAC_SECRET_BYTES_MIN[algorithm]
                if len(secret_bytes) < needed:
                    raise ConfigError(
                        f"{ENV_SECRET}: {algorithm} needs a secret of at least {needed} bytes "
                        f"(RFC 7518, section 3.2), got {len(secret_bytes)}"
                    )
            secret_key = _Key(secret_bytes, requested_hmac, None)

        public: list[_Key] = []
        if settings.public_key_file is not None:
            key, key_algorithms = _load_public_key_file(settings.public_key_file)
            allowed = tuple(a for a in key_algorithms if a in requested_public)
            if not allowed:
                raise ConfigError(
                    f"{ENV_PUBLIC_KEY_FILE}: this key verifies only {', '.join(key_algorithms)}, "
                    f"none of the allowed {', '.join(requested_public) or 'algorithms'}; "
                    f"set {ENV_ALGORITHMS}"
                )
            public.append(_Key(key, allowed, None))
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

    def key_for(self, algorithm: str, kid: object) -> _Key:
        """The key that must verify a token with this (allowed) ``alg`` and ``kid``."""
        key: _Key | None
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


def _load_jwks_file(path: Path, requested: tuple[str, ...]) -> list[_Key]:
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
    keys: list[_Key] = []
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
            keys.append(_Key(key, allowed, kid))
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
        algorithm = _EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        if algorithm is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return key, (algorithm,)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return key, EDDSA_ALGORITHMS
    raise ValueError("not a public RSA, EC, Ed25519 or Ed448 key")


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__


# -- verification --------------------------------------------------------------------
class Verifier:
    """Checks bearer tokens against keys loaded once from ``AuthSettings``.

    Building one reads the key files and raises ``ConfigError`` on a bad
    configuration; ``verify`` is then pure CPU (no I/O), safe to call per
    request from the event loop.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self._keys = _KeyRing.load(settings)
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._leeway_s = settings.leeway_s
        self._lifetime_max_s = settings.lifetime_max_s
        self._verified: dict[str, Principal] = {}
        self._decoder = jwt.PyJWT(
            options={
                "require": ["exp", "sub"],
                "verify_signature": True,
                "verify_exp": True,
                "verify_iss": settings.issuer is not None,
                "verify_aud": settings.audience is not None,
                "enforce_minimum_key_length": True,
            }
        )
        _reuse_prepared_secrets(self._decoder)
        _check_segments_at_c_speed(self._decoder)
        # Header segment -> the key it names: the tokens of one issuer share
        # their header byte for byte, so it is parsed once, not with every new token.
        self._headers: dict[str, _Key] = {}

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The effective allow-list."""
        return self._keys.algorithms

    def verify(self, token: str) -> Principal:
        """The caller a token names; ``AuthError`` unless it is valid in every respect.

        A token that passed is remembered until it expires (``VERIFIED_TOKENS_MAX``
        at most, the oldest forgotten first): a client sends the same token with
        every request, and checking its signature each time was a tenth of a
        request's cost. Only a token that verified fully is remembered, by its
        whole text, so a changed byte is a different token, checked afresh.
        """
        known = self._verified.get(token)
        if known is not None:
            if time.time() <= known.expires_at_s + self._leeway_s:
                return known
            del self._verified[token]
            raise AuthError("token has expired")
        principal = self._verify(token)
        if len(self._verified) >= VERIFIED_TOKENS_MAX:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        if not token:
            raise AuthError("missing token")
        if len(token) > TOKEN_CHARS_MAX:
            raise AuthError("token is too long")
        key = self._signer(token)
        try:
            claims = self._decoder.decode(
                token,
                key.material,
                algorithms=key.algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway_s,
            )
        except jwt.PyJWTError as error:
            raise AuthError(_describe(error)) from None
        for name in _TIME_CLAIMS:
            value = claims.get(name)
            if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
                raise AuthError(f"token {name} claim must be a number")
        if claims["exp"] - time.time() > self._lifetime_max_s:
            raise AuthError("token lives longer than this server accepts")
        return _principal(claims)

    def _signer(self, token: str) -> _Key:
        """The key a token's header names, for an allowed algorithm (the header only)."""
        segment = token.partition(".")[0]
        known = self._headers.get(segment)
        if known is not None:
            return known
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("token is malformed") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._keys.algorithms:
            raise AuthError("token algorithm is not allowed")
        signer = self._keys.key_for(algorithm, header.get("kid"))
        if len(self._headers) >= TOKEN_HEADERS_MAX:
            del self._headers[next(iter(self._headers))]
        self._headers[segment] = signer
        return signer


class _PreparedSecretHMAC(HMACAlgorithm):
    """PyJWT's HMAC, with each secret's checks made once instead of per token.

    ``HMACAlgorithm.prepare_key`` refuses secrets that look like asymmetric
    keys by trying to parse them as PEM, SSH, DER and JWK: a tenth of a
    first-seen token's cost. The configured secrets pass those checks at their
    first use and never change; the result is kept per secret.
    """

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._prepared: dict[bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        raw = key.encode() if isinstance(key, str) else key
        prepared = self._prepared.get(raw)
        if prepared is None:
            prepared = super().prepare_key(raw)
            if len(self._prepared) < PREPARED_SECRETS_MAX:
                self._prepared[raw] = prepared
        return prepared


def _reuse_prepared_secrets(decoder: jwt.PyJWT) -> None:
    """Give ``decoder`` the HMAC algorithms that prepare each secret once.

    PyJWT keeps a JWS object per decoder (``_jws``) with a public algorithm
    registry; when a release no longer has it, decoding stays correct, only
    without the saving.
    """
    jws = getattr(decoder, "_jws", None)
    if not isinstance(jws, jwt.PyJWS):
        return
    for name, hash_alg in (
        ("HS256", HMACAlgorithm.SHA256),
        ("HS384", HMACAlgorithm.SHA384),
        ("HS512", HMACAlgorithm.SHA512),
    ):
        jws.unregister_algorithm(name)
        jws.register_algorithm(name, _PreparedSecretHMAC(hash_alg))


_BASE64URL_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def decode_base64url_segment(segment: bytes, name: str) -> bytes:
    """PyJWT's strict decoding of a token segment, with its alphabet test in C.

    The same checks in the same order, with the same errors, as PyJWT's
    ``PyJWS._decode_base64url_segment`` (2.15): at most two '=' of padding,
    and only on a whole number of quads; no character outside the base64url
    alphabet; a canonical encoding. PyJWT tests the alphabet one character at
    a time in a generator, which was most of what checking a new token cost
    (27 µs of CPU, 60% of it there); ``bytes.translate`` deletes the alphabet
    in one C call and leaves nothing for a valid segment.
    ``tests/gateway/test_auth.py`` checks it against PyJWT's on any input.
    """
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    if padding > 2:
        raise jwt.DecodeError(f"Invalid {name} padding")
    if padding and len(segment) % 4 != 0:
        raise jwt.DecodeError(f"Invalid {name} padding")
    if len(stripped) % 4 == 1 or stripped.translate(None, _BASE64URL_ALPHABET):
        raise jwt.DecodeError(f"Invalid {name} padding")
    try:
        decoded = base64url_decode(stripped)
    except (TypeError, binascii.Error) as err:
        raise jwt.DecodeError(f"Invalid {name} padding") from err
    if base64url_encode(decoded) != stripped:
        raise jwt.DecodeError(f"Invalid {name} padding")
    return decoded


def _check_segments_at_c_speed(decoder: jwt.PyJWT) -> None:
    """Give ``decoder`` ``decode_base64url_segment`` in place of PyJWT's own.

    Only where the release has the method this replaces (``PyJWS``'s, called
    on the instance); otherwise PyJWT's own decoding stays, only slower.
    """
    jws = getattr(decoder, "_jws", None)
    if isinstance(jws, jwt.PyJWS) and callable(
        getattr(jwt.PyJWS, "_decode_base64url_segment", None)
    ):
        jws._decode_base64url_segment = decode_base64url_segment  # type: ignore[method-assign]


def _describe(error: jwt.PyJWTError) -> str:
    """A message for the client: the failure's kind, never the token's content."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return "token has expired"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "token is not valid yet"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"token lacks the {error.claim} claim"
    if isinstance(error, jwt.InvalidIssuerError):
        return "token issuer is not accepted"
    if isinstance(error, jwt.InvalidAudienceError):
        return "token audience is not accepted"
    if isinstance(error, jwt.InvalidSignatureError):
        return "token signature is invalid"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return "token algorithm is not allowed"
    if isinstance(error, jwt.DecodeError):
        return "token is malformed"
    return "token is invalid"


def _principal(claims: dict[str, Any]) -> Principal:
    subject = claims["sub"]  # a string: PyJWT required and checked it
    if not subject or len(subject) > limits.ID_CHARS_MAX or not subject.isprintable():
        raise AuthError(f"token subject must be 1 to {limits.ID_CHARS_MAX} printable characters")
    role_claim = claims.get("role", ROLE_DEFAULT)
    role = _ROLE_BY_NAME.get(role_claim) if isinstance(role_claim, str) else None
    if role is None:
        raise AuthError(f"token role must be one of {', '.join(ROLES)}")
    token_id = claims.get("jti")  # a string when present: PyJWT checked it
    return Principal(
        subject=subject,
        role=role,
        token_id=token_id if isinstance(token_id, str) else None,
        expires_at_s=int(claims["exp"]),
    )


def bearer_token(header_value: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    parts = header_value.split() if header_value else []
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise AuthError("missing or malformed Authorization header")
    return parts[1]


# -- roles ----------------------------------------------------------------------------
def require_role(principal: Principal, *allowed: Role) -> None:
    """Raise ``Forbidden`` unless the caller has one of the ``allowed`` roles."""
    if not allowed:
        raise ValueError("require_role needs at least one role")
    if principal.role not in allowed:
        raise Forbidden(f"this operation needs the role {' or '.join(allowed)}")


def acting_user(principal: Principal, body_user_id: str | None) -> str:
    """The user a request acts for.

    A ``service`` acts for the ``userId`` in the body, which it must give.
    Users and admins act as themselves: a ``userId`` in their body must be
    their own subject.
    """
    if principal.role == "service":
        if not body_user_id:
            raise Forbidden("a service must name the userId it acts for")
        return body_user_id
    if body_user_id is not None and body_user_id != principal.subject:
        raise Forbidden("only a service may act for another user")
    return principal.subject


# -- issuing (``slotengine token`` and tests) -----------------------------------------
def issue_token(
    secret: str,
    sub: str,
    role: Role,
    ttl_s: int,
    *,
    issuer: str | None = None,
    audience: str | None = None,
    now_s: int | None = None,
) -> str:
    """An HS256 token for ``sub`` in ``role``, valid ``ttl_s`` seconds from ``now_s``.

    Raises ``ValueError`` on arguments the verifier would refuse (a secret
    shorter than 32 bytes, an unknown role, an empty subject, a TTL outside
    1..``TOKEN_TTL_MAX_S``).
    """
    secret_bytes = secret.encode("utf-8")
    needed = _HMAC_SECRET_BYTES_MIN["HS256"]
    if len(secret_bytes) < needed:
        raise ValueError(f"the secret must be at least {needed} bytes (RFC 7518, section 3.2)")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not sub or len(sub) > limits.ID_CHARS_MAX or not sub.isprintable():
        raise ValueError(f"sub must be 1 to {limits.ID_CHARS_MAX} printable characters")
    if not 1 <= ttl_s <= TOKEN_TTL_MAX_S:
        raise ValueError(f"ttl_s must be between 1 and {TOKEN_TTL_MAX_S}, got {ttl_s}")
    issued_at_s = int(time.time()) if now_s is None else now_s
    claims: dict[str, Any] = {
        "sub": sub,
        "role": role,
        "iat": issued_at_s,
        "exp": issued_at_s + ttl_s,
        "jti": secrets.token_urlsafe(16),
    }
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, secret_bytes, algorithm="HS256")
