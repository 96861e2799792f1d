"""Bearer tokens: who is calling, and in which role (docs/api.md, "Authentication").

The package is split along its seams; each module says what it owns:

- ``principal``: the verified caller (``Principal``), the roles, the errors the
  gateway maps to 401 and 403 (``AuthError``, ``Forbidden``), and the role
  rules (``bearer_token``, ``require_role``, ``acting_user``).
- ``settings``: the ``SLOTENGINE_JWT_*`` names, the algorithm tables and
  ``AuthSettings``: values only, no I/O.
- ``environment``: ``auth_settings_from_env``, the settings read from the
  environment and checked once at start.
- ``secret``: the HS256 secret kept in the data dir (``load_or_create_secret``).
- ``keys``: the key ring loaded from the secret, a PEM key or a JWKS, and why
  key confusion cannot happen.
- ``verify``: the ``Verifier``, per request, and what makes it fast.
- ``issue``: ``issue_token``, for ``slotengine token``, the bench and the tests.

None of it knows aiohttp: the gateway hands it the raw ``Authorization``
header value or the ``?token=`` query value and maps ``AuthError`` to 401 and
``Forbidden`` to 403. Its messages are safe to send back: they never echo a
token or a secret. Import names from their module; this file re-exports
nothing, so each name has one home.
"""
