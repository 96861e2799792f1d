"""The HTTP plumbing every part of the gateway builds on.

It owns the error shape of docs/api.md (``ApiError`` and its rendering, and
the mapping of every failure to it: the engine's refusals, msgspec's
validation errors, authentication, an engine that does not answer), the
application's keys, the ``request_context`` middleware (``X-Request-Id``, the
security headers, CORS and its preflights, the observer told of every answer,
the access log), the authenticated principal of a request and its rate limit.

The route modules (``gateway/routes/``), the live updates (``gateway/live/``)
and the operations endpoints (``gateway/observability/``) import it; it must
never import any of them, nor ``gateway.app`` (a layer contract in
pyproject.toml holds it so). It never decides a booking rule and never calls
the engine.
"""

import contextlib
import contextvars
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import asyncpg
import msgspec
from aiohttp import hdrs, web

from engine.core import protocol as p
from engine.core.redaction import redact_emails
from engine.core.storable import NUL_MESSAGE
from engine.shell import limits
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShellError, may_have_applied
from gateway import schemas as s
from gateway.auth.principal import AuthError, Forbidden, Principal, bearer_token
from gateway.auth.verify import Verifier
from gateway.idempotency import KeyRegistry, KeyRegistryUnavailable
from gateway.ratelimit import RateLimiter, RateLimiterUnavailable
from persistence.sealing import KeyRing
from persistence.timings import Timer, Timings

if TYPE_CHECKING:
    from engine.shell.tracing import Tracing

logger = logging.getLogger("slotengine.gateway")
access_logger = logging.getLogger("slotengine.access")

# Bodies are small JSON documents; anything larger is refused with 413.
BODY_BYTES_MAX: Final = 16 * 1024
REQUEST_ID_CHARS_MAX: Final = 128
RETRY_AFTER_UNAVAILABLE_S: Final = limits.RETRY_AFTER_S
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

# CORS: what a browser page of an allowed origin may send and read, and how long
# it may keep a preflight's answer.
CORS_METHODS: Final = "GET, POST, PUT, DELETE"
CORS_REQUEST_HEADERS: Final = "Authorization, Content-Type, Idempotency-Key, X-Request-Id"
CORS_EXPOSED_HEADERS: Final = "X-Request-Id, Retry-After"
CORS_MAX_AGE_S: Final = 600

# RFC 6750: every 401 names the scheme; one whose token was presented and
# refused says so (a client then knows to get a new token, not to add one).
BEARER_CHALLENGE: Final = "Bearer"
REFUSED_TOKEN_CHALLENGE: Final = 'Bearer error="invalid_token"'

ENGINE_KEY: Final = web.AppKey("engine", EngineClient)
VERIFIER_KEY: Final = web.AppKey("verifier", Verifier)
IDS_KEY: Final = web.AppKey("ids", RequestIds)
# The engine's transport (the in-process host or the Ray shard actors), for health and metrics.
TRANSPORT_KEY: Final = web.AppKey("transport", object)
REQUEST_ID_KEY: Final = web.RequestKey("request_id", str)
LIMITER_KEY: Final = web.AppKey("rate_limiter", RateLimiter)
KEYS_KEY: Final = web.AppKey("idempotency_keys", KeyRegistry)
CORS_ORIGINS_KEY: Final = web.AppKey("cors_origins", frozenset[str])
# Each domain's entityName ("Doctor"), which names a booking's calendar event.
ENTITIES_KEY: Final = web.AppKey("entities", dict[str, str])
# The deployment's database (an asyncpg pool), for what the gateway keeps itself
# rather than the shards: webhook endpoints, deliveries, contact details.
DATABASE_KEY: Final = web.AppKey("database", asyncpg.Pool)
# This process's Redis and database timings (/metrics), set with the metrics.
TIMINGS_KEY: Final = web.AppKey("timings", Timings)
# The data keys that seal contact details and webhook secrets at rest.
DATA_KEYS_KEY: Final = web.AppKey("data_keys", KeyRing)
# Whether a webhook endpoint may be a private, loopback or link-local address
# (SLOTENGINE_WEBHOOK_ALLOW_PRIVATE: local setups and tests only).
WEBHOOK_ALLOW_PRIVATE_KEY: Final = web.AppKey("webhook_allow_private", bool)
# This process's tracing (engine/shell/tracing.py), set only when it is on.
TRACING_KEY: Final[web.AppKey["Tracing"]] = web.AppKey("tracing")
# The error code of an answer, kept on the response for the request log.
ERROR_CODE: Final = web.ResponseKey("error_code", str)
# The document a JSON answer was encoded from, so that what reads the answer
# afterwards (the business metrics) need not decode its body again.
ANSWER: Final = web.ResponseKey("answer", object)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Told of every answer: the request, its status, the response (None when the
# answer is an exception aiohttp renders) and when the request arrived
# (``time.perf_counter()``). WebSockets and event streams are not told: their
# duration is a connection's lifetime.
class Observer(Protocol):
    def __call__(
        self, request: web.Request, status: int, response: web.StreamResponse | None, started: float
    ) -> None: ...


OBSERVER_KEY: Final = web.AppKey("observer", Observer)


class ApiError(Exception):
    """An answer other than success, in docs/api.md's error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after_s = retry_after_s


_encoder = msgspec.json.Encoder()


def json_response(body: Any, status: int = 200) -> web.Response:
    response = web.Response(
        body=_encoder.encode(body), status=status, content_type="application/json"
    )
    response[ANSWER] = body
    return response


def error_response(error: ApiError) -> web.Response:
    response = json_response(
        s.ErrorOut(
            error=error.code,
            message=error.message,
            details=error.details,
            retryAfter=error.retry_after_s,
        ),
        error.status,
    )
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = BEARER_CHALLENGE
    response[ERROR_CODE] = error.code
    return response


# The application serving the current request (set by request_context).
_serving: contextvars.ContextVar[web.Application | None] = contextvars.ContextVar(
    "slotengine_serving_app", default=None
)


def serving_app() -> web.Application | None:
    """The application whose request the calling code is serving, if any."""
    return _serving.get()


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS preflights, X-Request-Id and the security headers, every failure in
    docs/api.md's shape, the observer told of every answer, one log line a request.

    One middleware, not one per concern: every layer costs a call and a
    coroutine per request, and a layer was a measurable share of a cheap request.
    """
    started = time.perf_counter()
    app = request.app
    observer = app.get(OBSERVER_KEY)
    token = _serving.set(app)
    try:
        response = await _respond(request, handler)
    except web.HTTPException as exc:
        if observer is not None:
            observer(request, exc.status, None, started)
        raise
    except Exception:
        if observer is not None:
            observer(request, 500, None, started)
        raise
    finally:
        _serving.reset(token)
    if observer is not None and isinstance(response, web.Response):
        observer(request, response.status, response, started)
    if access_logger.isEnabledFor(logging.INFO):
        resource = request.match_info.route.resource
        access_logger.info(
            "request",
            extra={
                "event": "http.request",
                "request_id": request.get(REQUEST_ID_KEY),
                "method": request.method,
                # The route's template, never the raw path or query (a token may be in it).
                "route": resource.canonical if resource is not None else "unmatched",
                "status": response.status,
                "error": response.get(ERROR_CODE),
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
    return response


async def _respond(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        origin = request.headers.get("Origin")
        if origin is not None:
            preflight = _preflight(request, origin)
            stamp_headers(request, preflight)
            return preflight
    request_id = request.headers.get("X-Request-Id", "")
    if not request_id or len(request_id) > REQUEST_ID_CHARS_MAX or not request_id.isprintable():
        # Unique across processes and restarts (a random prefix per process), and
        # without a system call per request as uuid4 makes.
        request_id = request.app[IDS_KEY].next()
    request[REQUEST_ID_KEY] = request_id
    tracing = request.app.get(TRACING_KEY)
    if tracing is not None:
        # The HTTP server span (aiohttp's instrumentation, around this middleware).
        tracing.annotate_request(request_id, request.query_string)
    response = await _answer(request, handler, request_id)
    if not response.prepared:
        stamp_headers(request, response)
    return response


async def _answer(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    try:
        response = await handler(request)
    except ApiError as error:
        response = error_response(error)
    except msgspec.ValidationError as error:
        response = error_response(validation_error(error))
    except AuthError as error:
        response = error_response(ApiError(401, "Unauthorized", str(error)))
        if isinstance(error, TokenRefused):
            response.headers["WWW-Authenticate"] = REFUSED_TOKEN_CHALLENGE
    except Forbidden as error:
        response = error_response(ApiError(403, "Forbidden", str(error)))
    except web.HTTPRequestEntityTooLarge:
        response = error_response(
            ApiError(413, "PayloadTooLarge", f"bodies are limited to {BODY_BYTES_MAX} bytes")
        )
    except web.HTTPNotFound:
        response = error_response(ApiError(404, "NotFound", "no such route"))
    except web.HTTPMethodNotAllowed as error:
        response = error_response(ApiError(405, "MethodNotAllowed", "method not allowed"))
        # RFC 9110: a 405 lists the methods the resource does take.
        response.headers["Allow"] = ", ".join(sorted(error.allowed_methods))
    except (RateLimiterUnavailable, KeyRegistryUnavailable):
        response = error_response(
            ApiError(
                503,
                "ServiceUnavailable",
                "Redis is unreachable (rate limits, idempotency keys), try again",
                retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
            )
        )
    except ShellError as error:
        logger.warning("engine unavailable: %r", error, extra={"request_id": request_id})
        response = error_response(engine_unavailable(error))
    except web.HTTPException as error:
        if error.status >= 500:
            raise
        response = error_response(ApiError(error.status, "BadRequest", error.reason))
    except Exception:
        # A bug, not bad input: logged with its traceback, answered in the contract's shape.
        logger.exception("unexpected failure", extra={"request_id": request_id})
        response = error_response(ApiError(500, "InternalError", "unexpected server error"))
    return response


def _preflight(request: web.Request, origin: str) -> web.Response:
    """The answer to a CORS preflight: allowed for the configured origins only."""
    if not _origin_allowed(request.app[CORS_ORIGINS_KEY], origin):
        request[REQUEST_ID_KEY] = request.app[IDS_KEY].next()
        return error_response(ApiError(403, "Forbidden", "this origin may not call the API"))
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS,
            "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
        },
    )


def _origin_allowed(allowed: frozenset[str], origin: str) -> bool:
    return origin in allowed or "*" in allowed


def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """X-Request-Id and the security headers on a response not yet prepared.

    request_context stamps every answer it returns; a handler that prepares a
    response itself (a WebSocket, an event stream) stamps it first.
    """
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id
    response.headers.update(SECURITY_HEADERS)
    origin = request.headers.get("Origin")
    if origin is not None and _origin_allowed(request.app[CORS_ORIGINS_KEY], origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"


# A user agent is kept in the audit log cut to this many characters (the
# audit_log column's CHECK says the same).
USER_AGENT_CHARS_MAX: Final = 256
# Distinct user agents (and proxy headers, peers) whose audit form is kept, each
# cache emptied when it grows past this: browsers send a few hundred distinct ones.
ORIGIN_CACHE_MAX: Final = 4_096


class Origins:
    """Where a request comes from, for the audit rows of the changes it makes
    (``p.Origin``): its ``X-Request-Id``, the client's IP address and its user agent.

    The address is the socket peer's, unless ``header`` (a trusted proxy header,
    such as ``X-Forwarded-For``) is configured and the peer is one of the
    ``proxies`` (CIDR networks): then it is the header's rightmost address that
    is not a trusted proxy (a comma-separated list, appended to by each proxy;
    what a client wrote itself is to its left, and ignored). A header from any
    other peer is ignored. The user agent is cut to ``USER_AGENT_CHARS_MAX``
    characters, what is not printable text replaced and email addresses
    masked, worked out once per distinct agent.
    """

    def __init__(self, header: str | None = None, proxies: Sequence[str] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in proxies)
        self.header = header if self._networks else None
        self._agents: dict[str, str] = {}
        self._trusted: dict[str, bool] = {}
        self._forwarded: dict[tuple[str, str], str] = {}

    def of(self, request: web.Request) -> p.Origin:
        """The origin of ``request`` (after ``request_context`` named its request id)."""
        headers = request.headers
        raw_agent = headers.get(hdrs.USER_AGENT)
        agent = None
        if raw_agent is not None:
            agent = self._agents.get(raw_agent)
            if agent is None:
                agent = self._agent(raw_agent)
        client = request.remote
        if self.header is not None and client:
            forwarded = headers.get(self.header)
            if forwarded is not None and self.trusts(client):
                client = self._client(client, forwarded)
        return p.Origin(request[REQUEST_ID_KEY], client or None, agent)

    def _agent(self, raw: str) -> str:
        agents = self._agents
        if len(agents) >= ORIGIN_CACHE_MAX:
            agents.clear()
        agent = raw[:USER_AGENT_CHARS_MAX]
        if not agent.isprintable():
            # Bytes that are not UTF-8 arrive as lone surrogates, which the
            # database would refuse (failing the whole flush), and control
            # characters have no place in a log: each becomes U+FFFD.
            agent = "".join(c if c.isprintable() else "\ufffd" for c in agent)
        agent = agents[raw] = redact_emails(agent)[:USER_AGENT_CHARS_MAX]
        return agent

    def trusts(self, address: str) -> bool:
        """Whether ``address`` is one of the trusted proxies."""
        trusted = self._trusted.get(address)
        if trusted is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                trusted = False
            else:
                trusted = any(ip in network for network in self._networks)
            if len(self._trusted) >= ORIGIN_CACHE_MAX:
                self._trusted.clear()
            self._trusted[address] = trusted
        return trusted

    def _client(self, peer: str, forwarded: str) -> str:
        key = (peer, forwarded)
        client = self._forwarded.get(key)
        if client is None:
            client = peer
            for hop in reversed(forwarded.split(",")):
                address = _hop_address(hop)
                if address is None:
                    break  # not an address: the last trusted hop is the best known
                client = address
                if not self.trusts(address):
                    break
            if len(self._forwarded) >= ORIGIN_CACHE_MAX:
                self._forwarded.clear()
            self._forwarded[key] = client
        return client


def _hop_address(hop: str) -> str | None:
    """One hop of a forwarded-for list as an address ("203.0.113.7", "[2001:db8::1]:443",
    "203.0.113.7:5000"), normalised; None when it is not one."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1 : hop.find("]")] if "]" in hop else hop
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


ORIGINS_KEY: Final = web.AppKey("origins", Origins)


def request_origin(request: web.Request) -> p.Origin:
    """The origin of ``request`` for the audit rows of its change (``Origins.of``)."""
    return request.app[ORIGINS_KEY].of(request)


class TokenRefused(AuthError):
    """A token was presented and refused: 401 with ``error="invalid_token"``."""


def principal(request: web.Request) -> Principal:
    """The caller a request's token names; ``AuthError`` without a token, or
    ``TokenRefused`` when the token it presents is not valid."""
    # Browsers cannot set headers on WebSocket and EventSource requests.
    streaming = request.path.startswith("/ws") or request.path.endswith("/queue/events")
    token = request.query.get("token") if streaming else None
    if token is None:
        token = bearer_token(request.headers.get("Authorization"))
    try:
        return request.app[VERIFIER_KEY].verify(token)
    except AuthError as error:
        if not token:  # an empty ?token= presents none
            raise
        raise TokenRefused(str(error)) from None


async def limit(request: web.Request, endpoint: str, user_id: str) -> None:
    """docs/api.md's per-user, per-endpoint rate limit: 429 with Retry-After past it."""
    limiter = request.app.get(LIMITER_KEY)
    if limiter is None:
        return
    decision = await limiter.check(endpoint, user_id)
    if not decision.allowed:
        raise ApiError(
            429,
            "RateLimited",
            f"too many {endpoint} requests; try again in {decision.retry_after_s} s",
            retry_after_s=decision.retry_after_s,
        )


def database(request: web.Request) -> asyncpg.Pool:
    """The deployment's database pool, or 503 where the gateway runs without one."""
    pool = request.app.get(DATABASE_KEY)
    if pool is None:
        raise ApiError(503, "ServiceUnavailable", "This gateway has no database configured.")
    return pool


def data_keys(request: web.Request) -> KeyRing:
    """The data key ring, or 503 where the gateway runs without one."""
    ring = request.app.get(DATA_KEYS_KEY)
    if ring is None:
        raise ApiError(503, "ServiceUnavailable", "This gateway has no data key configured.")
    return ring


def require_admin(who: Principal) -> None:
    if who.role != "admin":
        raise Forbidden("this route is for admins")


_NAMED_FIELD: Final = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]+)`$")


def validation_error(error: msgspec.ValidationError) -> ApiError:
    """msgspec's "Expected `int`, got `str` - at `$.capacity`" as {"capacity": ...}.

    A missing or unknown field is named by the message itself ("Object missing
    required field `slotId`"), nested under the path where there is one.
    """
    text = str(error)
    message, _, where = text.rpartition(" - at `")
    if not message:
        message, where = text, ""
    path = where.rstrip("`").removeprefix("$").removeprefix(".")
    named = _NAMED_FIELD.match(message)
    if named is not None:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    field = path or "body"
    if f"matching regex {s.STORABLE_TEXT!r}" in message:
        message = NUL_MESSAGE
    return ApiError(422, "ValidationError", f"{field}: {message}", {field: message})


def refusal(failure: p.Failure) -> ApiError:
    return ApiError(
        failure.status,
        failure.code,
        failure.message,
        _public_details(failure.details),
        failure.retry_after_s,
    )


def _public_details(details: dict[str, Any]) -> dict[str, Any]:
    """The engine's details with its epoch milliseconds as RFC 3339 times."""
    public: dict[str, Any] = {}
    for key, value in details.items():
        if key.endswith("Ms") and isinstance(value, int):
            public[key.removesuffix("Ms")] = s.rfc3339(value)
        elif key.endswith("At") and isinstance(value, int):
            public[key] = s.rfc3339(value)
        else:
            public[key] = value
    return public


_READ_ONLY: Final = frozenset(p.READ_ONLY_COMMANDS)


def engine_unavailable(error: ShellError, command: p.AnyCommand | None = None) -> ApiError:
    """503 for a command the engine could not be asked, or did not answer.

    A change that may have been applied all the same (it reached its shard and
    no answer came) says so in ``details``, as the shard's own 503s do when a
    commit was under way: only a retry with the same Idempotency-Key tells what
    became of it.
    """
    unknown = command is not None and type(command) not in _READ_ONLY and may_have_applied(error)
    return ApiError(
        503,
        "ServiceUnavailable",
        "the engine did not answer: the request may have been applied; retry with the same"
        " Idempotency-Key to learn its outcome"
        if unknown
        else "the engine is unavailable, try again",
        {p.OUTCOME_DETAIL: p.OUTCOME_UNKNOWN} if unknown else None,
        retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
    )


def database_timing(app: web.Application, query_type: str) -> Timer | contextlib.nullcontext[None]:
    """``with database_timing(app, QUERY_TYPE): ...``: the statement's duration in the
    app's timings (``persistence/timings.py`` names the query types); nothing
    without metrics."""
    timings = app.get(TIMINGS_KEY)
    if timings is None:
        return contextlib.nullcontext()
    return timings.database(query_type).time()
