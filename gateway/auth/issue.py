"""Issuing HS256 tokens: ``issue_token``, for ``slotengine token``, the bench and the tests.

This module owns making a token the verifier accepts. It must never issue a
token the verifier would refuse (a short secret, an unknown role, a bad
subject, a lifetime past ``TOKEN_TTL_MAX_S``), and never be called by a
request handler: the server verifies tokens, it does not mint them.
"""

import secrets
import time
from typing import Any

import jwt

from engine.core import limits
from gateway.auth.principal import ROLES, Role
from gateway.auth.settings import HMAC_SECRET_BYTES_MIN, TOKEN_TTL_MAX_S


def issue_token(
    secret: str,
    sub: str,
    role: Role,
    ttl_s: int,
    *,
    issuer: str | None = None,
    audience: str | None = None,
    now_s: int | None = None,
    email: str | None = None,
) -> str:
    """An HS256 token for ``sub`` in ``role``, valid ``ttl_s`` seconds from ``now_s``
    (with ``email`` as its ``email`` claim, when given).

    Raises ``ValueError`` on arguments the verifier would refuse (a secret
    shorter than 32 bytes, an unknown role, an empty subject, a TTL outside
    1..``TOKEN_TTL_MAX_S``).
    """
    secret_bytes = secret.encode("utf-8")
    needed = HMAC_SECRET_BYTES_MIN["HS256"]
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
    if email is not None:
        claims["email"] = email
    return jwt.encode(claims, secret_bytes, algorithm="HS256")
