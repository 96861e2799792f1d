"""The aiohttp application: routes of docs/api.md over the engine's coalescer.

Every handler does the same four things: authenticate (``gateway.auth``),
decode its body or query (msgspec: decoding is validation), turn the request
into one engine command with a fresh request id, and render the engine's
result or refusal. It never decides a booking rule: the shards do.

Errors always have docs/api.md's shape (``{"error", "message", "details",
"retryAfter"}``); every response carries ``X-Request-Id`` (the client's, or a
new one) and the security headers.
"""

import contextvars
import heapq
import itertools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar

import msgspec
from aiohttp import web

from engine.core import limits
from engine.core import protocol as p
from engine.core.routing import make_slot_id, shard_of_resource
from engine.core.states import BookingStatus, SlotStatus
from engine.core.storable import NUL_MESSAGE, text_problem
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShellError, may_have_applied
from gateway import schemas as s
from gateway.auth import AuthError, Forbidden, Principal, Verifier, acting_user, bearer_token
from gateway.connection import read_body
from gateway.idempotency import Claim, KeyRegistry, KeyRegistryUnavailable
from gateway.openapi import add_openapi
from gateway.ratelimit import RateLimiter, RateLimiterUnavailable

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

ENGINE_KEY: Final = web.AppKey("engine", EngineClient)
VERIFIER_KEY: Final = web.AppKey("verifier", Verifier)
IDS_KEY: Final = web.AppKey("ids", RequestIds)
# The engine's transport (the in-process host or the Ray shard actors), for health and metrics.
TRANSPORT_KEY: Final = web.AppKey("transport", object)
REQUEST_ID_KEY: Final = web.RequestKey("request_id", str)
LIMITER_KEY: Final = web.AppKey("rate_limiter", RateLimiter)
KEYS_KEY: Final = web.AppKey("idempotency_keys", KeyRegistry)
CORS_ORIGINS_KEY: Final = web.AppKey("cors_origins", frozenset[str])
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
T = TypeVar("T")
B = TypeVar("B", s.ReserveBody, s.CancelBody, s.ActingBody)


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


# -- request helpers ------------------------------------------------------------


def principal(request: web.Request) -> Principal:
    # Browsers cannot set headers on WebSocket and EventSource requests.
    streaming = request.path.startswith("/ws") or request.path.endswith("/queue/events")
    token = request.query.get("token") if streaming else None
    if token is None:
        token = bearer_token(request.headers.get("Authorization"))
    return request.app[VERIFIER_KEY].verify(token)


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


def require_admin(who: Principal) -> None:
    if who.role != "admin":
        raise Forbidden("this route is for admins")


async def decode_body(request: web.Request, schema: type[T], *, optional: bool = False) -> T:
    if request.content_length is not None and request.content_length > BODY_BYTES_MAX:
        raise web.HTTPRequestEntityTooLarge(
            max_size=BODY_BYTES_MAX, actual_size=request.content_length
        )
    return decode_json(await read_body(request), request.content_type, schema, optional=optional)


def decode_json(raw: bytes, content_type: str, schema: type[T], *, optional: bool = False) -> T:
    """A request body of type ``content_type`` as ``schema``, or an ``ApiError`` (400,
    422) or msgspec's ``ValidationError`` (422), answered in the contract's shape.

    No request needed: what a body may be is tested over any bytes.
    """
    if not raw.strip():
        if optional:
            return msgspec.convert({}, schema)
        raise ApiError(400, "BadRequest", "a JSON body is required")
    if content_type != "application/json":
        raise ApiError(400, "BadRequest", "bodies are JSON (Content-Type: application/json)")
    if s.nested_deeper_than(raw, s.BODY_DEPTH_MAX):
        raise ApiError(400, "BadRequest", f"JSON nested deeper than {s.BODY_DEPTH_MAX} levels")
    try:
        return msgspec.json.decode(raw, type=schema)
    except msgspec.ValidationError as error:
        # msgspec reports a schema error before it sees that the JSON is cut off:
        # malformed JSON is 400 whatever it starts with.
        try:
            msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise ApiError(400, "BadRequest", "malformed JSON") from None
        raise validation_error(error) from None
    except msgspec.DecodeError:
        raise ApiError(400, "BadRequest", "malformed JSON") from None


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


async def execute(request: web.Request, command: p.AnyCommand) -> p.AnyResult:
    """The engine's result for ``command``; its failures to answer as 503 ``ApiError``s."""
    try:
        return await request.app[ENGINE_KEY].execute(command)
    except ShellError as error:
        logger.warning(
            "engine unavailable: %r", error, extra={"request_id": request.get(REQUEST_ID_KEY)}
        )
        raise engine_unavailable(error, command) from None


async def run(request: web.Request, command: p.AnyCommand) -> p.AnyResult:
    result = await execute(request, command)
    if isinstance(result, p.Failure):
        raise refusal(result)
    return result


async def run_keyed(
    request: web.Request,
    endpoint: str,
    user_id: str,
    command: p.Reserve | p.Confirm | p.Cancel | p.JoinQueue,
) -> p.AnyResult:
    """``run``, with the client's Idempotency-Key checked across shards first."""
    key = command.idempotency_key
    registry = request.app.get(KEYS_KEY)
    if key is None or registry is None:
        return await run(request, command)
    claim = await registry.claim(endpoint, user_id, key, command)
    if claim is Claim.OTHER:
        raise ApiError(
            409, "IdempotencyKeyReused", "this Idempotency-Key was used for a different request"
        )
    # A 5xx is not kept, so the key is released for another body; unless the
    # request may have been applied all the same: then the key stands for it, and
    # the shard answers a retry with its outcome.
    try:
        result = await execute(request, command)
    except ApiError as error:
        if claim is Claim.CREATED and not p.outcome_unknown(error.details):
            await registry.release(endpoint, user_id, key)
        raise
    if isinstance(result, p.Failure):
        if (
            result.status >= 500
            and claim is Claim.CREATED
            and not p.outcome_unknown(result.details)
        ):
            await registry.release(endpoint, user_id, key)
        raise refusal(result)
    return result


async def limited_body(
    request: web.Request,
    endpoint: str,
    who: Principal,
    schema: type[B],
    *,
    optional: bool = False,
    as_self: bool = False,
) -> tuple[B, str]:
    """The rate limit first, then the body: every authenticated request counts.

    Returns the body and the user the request acts for (``as_self``: the caller,
    as an admin cancelling). A ``service`` names its user in the body, so its
    requests count against that user, or against the service itself when the
    body cannot be read.
    """
    if who.role != "service" or as_self:
        await limit(request, endpoint, who.subject)
        body = await decode_body(request, schema, optional=optional)
        return body, who.subject if as_self else acting_user(who, body.user_id)
    try:
        body = await decode_body(request, schema, optional=optional)
    except (ApiError, msgspec.ValidationError):
        await limit(request, endpoint, who.subject)
        raise
    user_id = acting_user(who, body.user_id)
    await limit(request, endpoint, user_id)
    return body, user_id


def next_id(request: web.Request) -> str:
    return request.app[IDS_KEY].next()


_IDEMPOTENCY_KEY: Final = re.compile(s.IDEMPOTENCY_KEY_PATTERN.removesuffix("$") + r"\Z")


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if len(key) > limits.IDEMPOTENCY_KEY_CHARS_MAX or _IDEMPOTENCY_KEY.match(key) is None:
        raise ApiError(
            422,
            "ValidationError",
            "Idempotency-Key is empty, too long or not visible ASCII",
            {"Idempotency-Key": f"1 to {limits.IDEMPOTENCY_KEY_CHARS_MAX} visible ASCII chars"},
        )
    return key


# -- slots ------------------------------------------------------------------------


async def create_slot(request: web.Request) -> web.StreamResponse:
    require_admin(who := principal(request))
    body = await decode_body(request, s.CreateSlotBody)
    start_ms = s.to_ms(body.start_time, "startTime")
    end_ms = s.to_ms(body.end_time, "endTime")
    result = await run(
        request,
        p.CreateSlot(
            request_id=next_id(request),
            slot_id=make_slot_id(body.resource_id, uuid.uuid4().hex),
            resource_id=body.resource_id,
            domain=body.domain,
            start_ms=start_ms,
            end_ms=end_ms,
            capacity=int(body.capacity),
            metadata=body.metadata,
            blocked=body.blocked,
            actor=f"admin:{who.subject}",
        ),
    )
    assert isinstance(result, p.SlotResult)
    return json_response(s.slot_out(result.slot), result.status)


async def update_slot(request: web.Request) -> web.StreamResponse:
    require_admin(who := principal(request))
    body = await decode_body(request, s.UpdateSlotBody)
    result = await run(
        request,
        p.UpdateSlot(
            request_id=next_id(request),
            slot_id=request.match_info["slot_id"],
            start_ms=None if body.start_time is None else s.to_ms(body.start_time, "startTime"),
            end_ms=None if body.end_time is None else s.to_ms(body.end_time, "endTime"),
            capacity=None if body.capacity is None else int(body.capacity),
            metadata=body.metadata,
            blocked=body.blocked,
            actor=f"admin:{who.subject}",
        ),
    )
    assert isinstance(result, p.SlotResult)
    return json_response(s.slot_out(result.slot), result.status)


async def delete_slot(request: web.Request) -> web.StreamResponse:
    require_admin(who := principal(request))
    force = _flag(request, "force")
    await run(
        request,
        p.DeleteSlot(
            request_id=next_id(request),
            slot_id=request.match_info["slot_id"],
            force=force,
            actor=f"admin:{who.subject}",
        ),
    )
    return web.Response(status=204)


async def get_slot(request: web.Request) -> web.StreamResponse:
    principal(request)
    result = await run(
        request, p.GetSlot(request_id=next_id(request), slot_id=request.match_info["slot_id"])
    )
    assert isinstance(result, p.SlotResult)
    return json_response(s.slot_out(result.slot))


async def list_slots(request: web.Request) -> web.StreamResponse:
    principal(request)
    query = request.query
    problems: dict[str, str] = {}
    limit = _limit_param(query, problems)
    from_ms = _time_param(query, "from", problems)
    to_ms = _time_param(query, "to", problems)
    status: SlotStatus | None = None
    if "status" in query:
        try:
            status = SlotStatus(query["status"])
        except ValueError:
            problems["status"] = f"one of {', '.join(v.value for v in SlotStatus)}"
    after = _cursor(query.get("cursor"), problems)
    if problems:
        raise ApiError(422, "ValidationError", "invalid filter", problems)
    engine = request.app[ENGINE_KEY]
    resource_id = query.get("resourceId")
    shards = (
        [shard_of_resource(resource_id, engine.shard_count)]
        if resource_id
        else list(range(engine.shard_count))
    )
    commands = {
        shard: p.ListSlots(
            request_id=next_id(request),
            resource_id=resource_id or None,
            from_ms=from_ms,
            to_ms=to_ms,
            status=status,
            available_only=_flag(request, "available"),
            limit=limit,
            after=after,
        )
        for shard in shards
    }
    views, next_cursor = await _merged_pages(
        request, commands, limit, lambda v: (v.start_ms, v.id), reverse=False
    )
    return json_response(
        s.SlotPageOut(items=[s.slot_out(v) for v in views], next_cursor=next_cursor)
    )


# -- bookings -------------------------------------------------------------------------


async def reserve(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    body, user_id = await limited_body(request, "reserve", who, s.ReserveBody)
    result = await run_keyed(
        request,
        "reserve",
        user_id,
        p.Reserve(
            request_id=next_id(request),
            slot_id=body.slot_id,
            user_id=user_id,
            idempotency_key=idempotency_key(request),
        ),
    )
    if isinstance(result, p.BookingResult):
        return json_response(
            s.BookingEnvelope(booking=s.booking_out(result.booking)), result.status
        )
    assert isinstance(result, p.QueueResult)
    return json_response(s.QueueEnvelope(queue=s.queue_out(result.entry)), result.status)


async def confirm(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    body = await decode_body(request, s.ActingBody, optional=True)
    user_id = acting_user(who, body.user_id)
    result = await run_keyed(
        request,
        "confirm",
        user_id,
        p.Confirm(
            request_id=next_id(request),
            booking_id=request.match_info["booking_id"],
            user_id=user_id,
            idempotency_key=idempotency_key(request),
        ),
    )
    assert isinstance(result, p.BookingResult)
    return json_response(s.booking_out(result.booking))


async def cancel(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    as_admin = who.role == "admin"
    body, user_id = await limited_body(
        request, "cancel", who, s.CancelBody, optional=True, as_self=as_admin
    )
    result = await run_keyed(
        request,
        "cancel",
        user_id,
        p.Cancel(
            request_id=next_id(request),
            booking_id=request.match_info["booking_id"],
            user_id=user_id,
            as_admin=as_admin,
            reason=body.reason,
            idempotency_key=idempotency_key(request),
        ),
    )
    assert isinstance(result, p.BookingResult)
    return json_response(s.booking_out(result.booking))


async def get_booking(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    as_admin = who.role == "admin"
    result = await run(
        request,
        p.GetBooking(
            request_id=next_id(request),
            booking_id=request.match_info["booking_id"],
            user_id=who.subject if as_admin else acting_user(who, user_param(request)),
            as_admin=as_admin,
        ),
    )
    assert isinstance(result, p.BookingResult)
    return json_response(s.booking_out(result.booking))


async def my_bookings(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    user_id = acting_user(who, user_param(request))
    problems: dict[str, str] = {}
    limit = _limit_param(request.query, problems)
    status: BookingStatus | None = None
    if "status" in request.query:
        try:
            status = BookingStatus(request.query["status"])
        except ValueError:
            problems["status"] = "one of RESERVED, CONFIRMED, EXPIRED, CANCELLED, COMPLETED"
        if status is BookingStatus.PENDING:
            problems["status"] = "one of RESERVED, CONFIRMED, EXPIRED, CANCELLED, COMPLETED"
    after = _cursor(request.query.get("cursor"), problems)
    if problems:
        raise ApiError(422, "ValidationError", "invalid filter", problems)
    commands = {
        shard: p.ListBookings(
            request_id=next_id(request), user_id=user_id, status=status, limit=limit, after=after
        )
        for shard in range(request.app[ENGINE_KEY].shard_count)
    }
    bookings, next_cursor = await _merged_pages(
        request, commands, limit, lambda b: (b.reserved_at_ms, b.id), reverse=True
    )
    return json_response(
        s.BookingPageOut(items=[s.booking_out(b) for b in bookings], next_cursor=next_cursor)
    )


async def _merged_pages(
    request: web.Request,
    commands: Mapping[int, p.AnyCommand],
    limit: int,
    order: Callable[[Any], tuple[int, str]],
    *,
    reverse: bool,
) -> tuple[list[Any], str | None]:
    """One page from every shard, merged in ``order``: the first ``limit`` and a cursor.

    Each shard answers at most ``limit`` items after the cursor in the same
    order, so the merged first ``limit`` are exactly the page.
    """
    engine = request.app[ENGINE_KEY]
    pending = [engine.execute(command, shard=shard) for shard, command in commands.items()]
    pages: list[list[Any]] = []
    for answer in [await page for page in pending]:
        if isinstance(answer, p.Failure):
            raise refusal(answer)
        assert isinstance(answer, p.SlotPage | p.BookingPage)
        pages.append(list(answer.items))
    merged = list(itertools.islice(heapq.merge(*pages, key=order, reverse=reverse), limit))
    if len(merged) < limit:
        return merged, None
    return merged, _encode_cursor(*order(merged[-1]))


# -- the queue -------------------------------------------------------------------------


async def join_queue(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    _, user_id = await limited_body(request, "queue_join", who, s.ActingBody, optional=True)
    result = await run_keyed(
        request,
        "queue_join",
        user_id,
        p.JoinQueue(
            request_id=next_id(request),
            slot_id=request.match_info["slot_id"],
            user_id=user_id,
            idempotency_key=idempotency_key(request),
        ),
    )
    assert isinstance(result, p.QueueResult)
    return json_response(s.queue_out(result.entry), result.status)


async def leave_queue(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    await run(
        request,
        p.LeaveQueue(
            request_id=next_id(request),
            slot_id=request.match_info["slot_id"],
            user_id=acting_user(who, user_param(request)),
        ),
    )
    return web.Response(status=204)


async def queue_position(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    user_id = acting_user(who, user_param(request))
    await limit(request, "position", user_id)
    result = await run(
        request,
        p.QueuePosition(
            request_id=next_id(request),
            slot_id=request.match_info["slot_id"],
            user_id=user_id,
        ),
    )
    assert isinstance(result, p.QueueResult)
    return json_response(s.queue_out(result.entry))


# -- query helpers ------------------------------------------------------------------------


def user_param(request: web.Request) -> str | None:
    """The ``?userId=`` a ``service`` acts for, held to the body's ``userId`` rules."""
    raw = request.query.get("userId")
    if raw is None:
        return None
    # (An empty one names nobody: ``acting_user`` refuses it as it refuses a missing one.)
    problem = (
        f"at most {limits.ID_CHARS_MAX} characters"
        if len(raw) > limits.ID_CHARS_MAX
        else text_problem(raw)
    )
    if problem is not None:
        raise ApiError(422, "ValidationError", f"userId: {problem}", {"userId": problem})
    return raw


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(422, "ValidationError", f"{name} must be true or false", {name: "boolean"})
    return value in ("true", "1")


def _int_param(query: Any, name: str, default: int, problems: dict[str, str]) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        problems[name] = "an integer"
        return default


def _limit_param(query: Any, problems: dict[str, str]) -> int:
    """A listing's page size: below 1 a bad filter like any other, above the
    maximum capped (a client asking for everything gets the largest page)."""
    limit = _int_param(query, "limit", limits.LIST_LIMIT_DEFAULT, problems)
    if limit < 1:
        problems["limit"] = "an integer of at least 1"
        return limits.LIST_LIMIT_DEFAULT
    return min(limit, limits.LIST_LIMIT_MAX)


def _time_param(query: Any, name: str, problems: dict[str, str]) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return s.to_ms(raw, name)
    except msgspec.ValidationError:
        problems[name] = "an RFC 3339 time with an offset, years 0002 to 9998"
        return None


def _encode_cursor(order: int, entity_id: str) -> str:
    return f"{order}.{entity_id}"


_CURSOR: Final = re.compile(s.CURSOR_PATTERN)


def _cursor(raw: str | None, problems: dict[str, str]) -> tuple[int, str] | None:
    """The position a cursor names: any ``<sort key>.<id>`` is one (see ``CURSOR_PATTERN``)."""
    if not raw:
        return None
    if _CURSOR.match(raw) is None:
        problems["cursor"] = "a cursor from a previous page"
        return None
    order, _, entity_id = raw.partition(".")
    return int(order), entity_id


# -- the application ---------------------------------------------------------------------


def create_app(
    engine: EngineClient | None,
    verifier: Verifier,
    limiter: RateLimiter | None = None,
    *,
    cors_origins: Sequence[str] = (),
    keys: KeyRegistry | None = None,
    domains: Sequence[str] = (),
) -> web.Application:
    """The routes of docs/api.md. ``engine`` may come later: set ``app[ENGINE_KEY]`` on startup.

    Without a ``limiter`` nothing is rate limited (tests of other concerns).
    ``cors_origins`` are the browser origins allowed to call the API ("*": any).
    ``domains``: the engine's domains, which ``/openapi.json`` lists as the only
    ones a slot may name.
    """
    app = web.Application(middlewares=[request_context], client_max_size=BODY_BYTES_MAX)
    app[CORS_ORIGINS_KEY] = frozenset(cors_origins)
    if engine is not None:
        app[ENGINE_KEY] = engine
    if limiter is not None:
        app[LIMITER_KEY] = limiter
    if keys is not None:
        app[KEYS_KEY] = keys
    app[VERIFIER_KEY] = verifier
    app[IDS_KEY] = RequestIds()
    from gateway.realtime import add_realtime  # it builds on this module

    add_realtime(app)
    app.router.add_post("/api/admin/slots", create_slot)
    app.router.add_put("/api/admin/slots/{slot_id}", update_slot)
    app.router.add_delete("/api/admin/slots/{slot_id}", delete_slot)
    app.router.add_get("/api/slots", list_slots)
    app.router.add_get("/api/slots/{slot_id}", get_slot)
    app.router.add_post("/api/bookings/reserve", reserve)
    app.router.add_get("/api/bookings/my", my_bookings)
    # As in OpenAPI, the routes above win over a booking id spelled like them:
    # GET /api/bookings/reserve is a 405, not a search for booking "reserve".
    app.router.add_get("/api/bookings/{booking_id:(?!(?:reserve|my)$)[^{}/]+}", get_booking)
    app.router.add_post("/api/bookings/{booking_id}/confirm", confirm)
    app.router.add_post("/api/bookings/{booking_id}/cancel", cancel)
    app.router.add_post("/api/slots/{slot_id}/queue", join_queue)
    app.router.add_delete("/api/slots/{slot_id}/queue", leave_queue)
    app.router.add_get("/api/slots/{slot_id}/queue/position", queue_position)
    add_openapi(app, domains)
    return app
