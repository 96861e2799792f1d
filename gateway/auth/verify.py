"""Checking a bearer token, per request: ``Verifier``.

This module owns verification and what makes it cheap: the tokens already
verified (until they expire), the header segment to key lookup, the HMAC
secrets prepared once, and the token segments' base64url check in C. Keys are
loaded once, when the ``Verifier`` is built (``keys``, which also explains
why key confusion cannot happen); ``verify`` is then pure CPU. It must never
touch a file or the network per request, never remember a token that did not
verify fully, and never put a token's content in an error message.
"""

import binascii
import math
import time
from typing import Any, Final

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.utils import base64url_decode, base64url_encode

from gateway.auth.keys import Key, KeyRing
from gateway.auth.principal import AuthError, Principal, principal_from_claims
from gateway.auth.settings import AuthSettings

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
# The claims PyJWT reads as ``int(value)``: a numeric string or a boolean would
# pass there, so they must be JSON numbers (RFC 7519, section 2: NumericDate).
_TIME_CLAIMS: Final = ("exp", "nbf", "iat")


# -- verification --------------------------------------------------------------------
class Verifier:
    """Checks bearer tokens against keys loaded once from ``AuthSettings``.

    Building one reads the key files and raises ``ConfigError`` on a bad
    configuration; ``verify`` is then pure CPU (no I/O), safe to call per
    request from the event loop.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self._keys = KeyRing.load(settings)
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
        self._headers: dict[str, Key] = {}

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
        return principal_from_claims(claims)

    def _signer(self, token: str) -> Key:
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
