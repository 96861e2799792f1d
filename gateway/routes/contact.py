"""The caller's contact details: ``GET``, ``PUT`` and ``DELETE /api/me/contact``.

Any authenticated caller reads, sets and erases its own, and no one else's.
The details are the gateway's own (the deployment's database, sealed with the
data keys: ``persistence.contacts``), not the engine's: no command, no audit.
It must never put an address in a log line or an error message, and must
never be imported by ``gateway.http`` or ``gateway.handling``.
"""

import time

import asyncpg
from aiohttp import web

from gateway import schemas as s
from gateway.handling import decode_body
from gateway.http import (
    RETRY_AFTER_UNAVAILABLE_S,
    ApiError,
    data_keys,
    database,
    database_timing,
    json_response,
    principal,
)
from persistence import timings as t
from persistence.contacts import Contact, delete_contact, get_contact, put_contact

# What the database may raise when it is away; answered 503 (the class is
# logged, never its message: a driver's message may quote what it was sent).
_UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def _unavailable() -> ApiError:
    return ApiError(
        503,
        "ServiceUnavailable",
        "the database is unavailable, try again",
        retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
    )


def _out(contact: Contact) -> s.ContactOut:
    return s.ContactOut(
        email=contact.email, source=contact.source, updated_at=s.rfc3339(contact.updated_at_ms)
    )


async def read_contact(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    pool, ring = database(request), data_keys(request)
    try:
        with database_timing(request.app, t.DATABASE_CONTACT_READ):
            contact = await get_contact(pool, ring, who.subject)
    except _UNAVAILABLE:
        raise _unavailable() from None
    if contact is None:
        raise ApiError(404, "NotFound", "no contact details are kept for the caller")
    return json_response(_out(contact))


async def set_contact(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    body = await decode_body(request, s.ContactBody)
    pool, ring = database(request), data_keys(request)
    now_ms = int(time.time() * 1000)
    try:
        with database_timing(request.app, t.DATABASE_CONTACT_WRITE):
            await put_contact(pool, ring, who.subject, body.email, "api", now_ms)
    except _UNAVAILABLE:
        raise _unavailable() from None
    return json_response(s.ContactOut(email=body.email, source="api", updated_at=s.rfc3339(now_ms)))


async def erase_contact(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    pool = database(request)
    try:
        with database_timing(request.app, t.DATABASE_CONTACT_ERASE):
            await delete_contact(pool, who.subject)
    except _UNAVAILABLE:
        raise _unavailable() from None
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/me/contact", read_contact)
    app.router.add_put("/api/me/contact", set_contact)
    app.router.add_delete("/api/me/contact", erase_contact)
