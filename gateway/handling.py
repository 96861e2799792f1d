"""What a route handler does between authenticating and answering.

It owns decoding a request's body (msgspec: decoding is validation, 413 past
``BODY_BYTES_MAX``) and its query parameters (``userId``, flags, page sizes,
times, cursors), the ``Idempotency-Key`` header, and calling the engine:
``execute``/``run`` (one command, its refusal as an ``ApiError``),
``run_keyed`` (the key claimed across shards first), ``limited_body`` (the
rate limit, then the body) and ``merged_pages`` (one page from every shard),
and recording a token's ``email`` claim (``TokenEmails``) when its user
reserves or queues: once per user and address per gateway, in the background.

It builds on ``gateway.http`` only; it must never import the route modules,
the live updates or the operations endpoints, and never decides a booking
rule: the shards do.
"""

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import asyncpg
import msgspec
from aiohttp import web

from engine.core import limits
from engine.core import protocol as p
from engine.core.limits import require_relation
from engine.core.storable import text_problem
from engine.shell.errors import ShellError
from gateway import schemas as s
from gateway.auth.principal import Principal, acting_user
from gateway.connection import read_body
from gateway.http import (
    BODY_BYTES_MAX,
    DATA_KEYS_KEY,
    DATABASE_KEY,
    ENGINE_KEY,
    IDS_KEY,
    KEYS_KEY,
    REQUEST_ID_KEY,
    ApiError,
    database_timing,
    engine_unavailable,
    limit,
    refusal,
    validation_error,
)
from gateway.idempotency import Claim
from persistence import timings as t
from persistence.contacts import put_contact
from persistence.sealing import KeyRing

logger = logging.getLogger("slotengine.gateway")

T = TypeVar("T")
B = TypeVar("B", s.ReserveBody, s.CancelBody, s.ActingBody)


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
            document = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise ApiError(400, "BadRequest", "malformed JSON") from None
        raise _every_missing_field(validation_error(error), schema, document) from None
    except msgspec.DecodeError:
        raise ApiError(400, "BadRequest", "malformed JSON") from None


_MISSING_FIELD: Final = "Object missing required field `{}`"
# A page of a list when the request names no ``limit`` (docs/api.md); a larger
# one is capped at the core's LIST_LIMIT_MAX.
LIST_LIMIT_DEFAULT: Final = 50
require_relation(
    1 <= LIST_LIMIT_DEFAULT <= limits.LIST_LIMIT_MAX,
    "1 <= LIST_LIMIT_DEFAULT <= LIST_LIMIT_MAX: the default page is one the API serves",
)


def _every_missing_field(problem: ApiError, schema: type[Any], document: Any) -> ApiError:
    """``problem``, naming every required field the body lacks, not only the first.

    msgspec names one missing field, and only once every field the body has
    decoded: the others it would name are exactly the schema's required fields
    absent from the document. Each is named as msgspec names the first.
    """
    if len(problem.details) != 1 or not isinstance(document, dict):
        return problem
    ((field, message),) = problem.details.items()
    if message != _MISSING_FIELD.format(field) or not issubclass(schema, msgspec.Struct):
        return problem  # not a missing field, or one nested deeper (named by its path)
    missing = {
        info.encode_name: _MISSING_FIELD.format(info.encode_name)
        for info in msgspec.structs.fields(schema)
        if info.required and info.encode_name not in document
    }
    if len(missing) < 2:
        return problem
    text = "; ".join(f"{name}: {message}" for name, message in missing.items())
    return ApiError(422, "ValidationError", text, missing)


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
    command: p.Reserve | p.Confirm | p.Cancel | p.ExtendHold | p.ReleaseHold | p.JoinQueue,
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


# (user, address) pairs a gateway remembers having recorded: past this many, the
# least recently seen is forgotten (and recorded again when it comes back).
TOKEN_EMAILS_REMEMBERED_MAX: Final = 100_000
# How long a stopping gateway waits for the recordings under way.
TOKEN_EMAILS_DRAIN_S: Final = 2.0


class TokenEmails:
    """The token ``email`` claims this gateway has recorded as contacts (source
    ``token``), so that a user's requests cost one database write per gateway,
    not one each.

    It remembers a digest of (user, address), never the address. A recording
    runs as a task of its own: it never delays or fails the request that
    carried the claim, and its failure is logged without the address (and
    tried again with the user's next request).
    """

    def __init__(self, remembered_max: int = TOKEN_EMAILS_REMEMBERED_MAX) -> None:
        self._recorded: OrderedDict[bytes, None] = OrderedDict()
        self._remembered_max = remembered_max
        self._pending: set[asyncio.Task[None]] = set()

    def record(self, app: web.Application, user_id: str, email: str) -> None:
        pool, ring = app.get(DATABASE_KEY), app.get(DATA_KEYS_KEY)
        if pool is None or ring is None:
            return
        digest = hashlib.sha256(f"{user_id}\0{email}".encode()).digest()
        if digest in self._recorded:
            self._recorded.move_to_end(digest)
            return
        self._recorded[digest] = None
        if len(self._recorded) > self._remembered_max:
            self._recorded.popitem(last=False)
        task = asyncio.get_running_loop().create_task(
            self._write(app, pool, ring, user_id, email, digest), name="record-token-email"
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(
        self,
        app: web.Application,
        pool: asyncpg.Pool,
        ring: KeyRing,
        user_id: str,
        email: str,
        digest: bytes,
    ) -> None:
        try:
            with database_timing(app, t.DATABASE_CONTACT_WRITE):
                await put_contact(pool, ring, user_id, email, "token", int(time.time() * 1000))
        except Exception as error:  # logged; the request never waits for it
            self._recorded.pop(digest, None)
            # The class only (a driver's message may quote the values it sent),
            # and no user id: both are personal data (gateway/logs.py).
            logger.warning("recording a token's email claim failed: %s", type(error).__name__)

    async def drain(self, timeout_s: float = TOKEN_EMAILS_DRAIN_S) -> None:
        """Wait up to ``timeout_s`` for the recordings under way, then cancel the rest."""
        pending = set(self._pending)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError):
                await task


TOKEN_EMAILS_KEY: Final = web.AppKey("token_emails", TokenEmails)


def add_token_emails(app: web.Application) -> None:
    """Give ``app`` its ``TokenEmails``, drained on shutdown (before the cleanup
    closes the database its recordings use)."""
    emails = app[TOKEN_EMAILS_KEY] = TokenEmails()

    async def drain(_: web.Application) -> None:
        await emails.drain()

    app.on_shutdown.append(drain)


def record_token_email(request: web.Request, who: Principal, user_id: str) -> None:
    """Record the caller's token ``email`` claim as ``user_id``'s contact, when the
    caller acts as itself (a service's token names the service, not its user)."""
    if who.email is None or user_id != who.subject:
        return
    emails = request.app.get(TOKEN_EMAILS_KEY)
    if emails is not None:
        emails.record(request.app, user_id, who.email)


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


async def merged_pages(
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


def flag_param(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(422, "ValidationError", f"{name} must be true or false", {name: "boolean"})
    return value in ("true", "1")


def int_param(query: Any, name: str, default: int, problems: dict[str, str]) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        problems[name] = "an integer"
        return default


def limit_param(query: Any, problems: dict[str, str]) -> int:
    """A listing's page size: below 1 a bad filter like any other, above the
    maximum capped (a client asking for everything gets the largest page)."""
    limit = int_param(query, "limit", LIST_LIMIT_DEFAULT, problems)
    if limit < 1:
        problems["limit"] = "an integer of at least 1"
        return LIST_LIMIT_DEFAULT
    return min(limit, limits.LIST_LIMIT_MAX)


def time_param(query: Any, name: str, problems: dict[str, str]) -> int | None:
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


def cursor_param(raw: str | None, problems: dict[str, str]) -> tuple[int, str] | None:
    """The position a cursor names: any ``<sort key>.<id>`` is one (see ``CURSOR_PATTERN``)."""
    if not raw:
        return None
    if _CURSOR.match(raw) is None:
        problems["cursor"] = "a cursor from a previous page"
        return None
    order, _, entity_id = raw.partition(".")
    return int(order), entity_id
