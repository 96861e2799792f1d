"""The verified caller of a request and the rules on its role.

This module owns ``Principal``, the roles (``Role``, ``ROLES``), the errors
the gateway turns into 401 and 403 (``AccessDenied``, ``AuthError``,
``Forbidden``), turning verified claims into a ``Principal``, reading a
``Bearer`` header value, and the role rules (``require_role``,
``acting_user``). It must never verify a signature, read a key or a file,
or know aiohttp: it is what every route may import without pulling in the
verifier. Its messages are safe to send back: they never echo a token.
"""

from typing import Any, ClassVar, Final, Literal, get_args

import msgspec

from engine.core import limits
from persistence.contacts import plausible_email

Role = Literal["user", "admin", "service"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
ROLE_DEFAULT: Final[Role] = "user"
_ROLE_BY_NAME: Final[dict[str, Role]] = {role: role for role in ROLES}


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
    # The token's ``email`` claim, when it is a plausible address (else None: a
    # claim the server cannot use refuses no token). Personal data: never logged.
    email: str | None = msgspec.field(default=None)

    def __repr__(self) -> str:  # never the address
        return f"Principal(subject={self.subject!r}, role={self.role!r})"


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The caller named by a token's claims, once its signature and times are verified.

    Raises ``AuthError`` on a subject or role this server does not accept.
    """
    subject = claims["sub"]  # a string: PyJWT required and checked it
    if not subject or len(subject) > limits.ID_CHARS_MAX or not subject.isprintable():
        raise AuthError(f"token subject must be 1 to {limits.ID_CHARS_MAX} printable characters")
    role_claim = claims.get("role", ROLE_DEFAULT)
    role = _ROLE_BY_NAME.get(role_claim) if isinstance(role_claim, str) else None
    if role is None:
        raise AuthError(f"token role must be one of {', '.join(ROLES)}")
    token_id = claims.get("jti")  # a string when present: PyJWT checked it
    email = claims.get("email")
    return Principal(
        subject=subject,
        role=role,
        token_id=token_id if isinstance(token_id, str) else None,
        expires_at_s=int(claims["exp"]),
        email=email if isinstance(email, str) and plausible_email(email) else None,
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
