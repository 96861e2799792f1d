"""The booking routes: reserve, confirm, cancel, extend and release a hold, one
booking, the user's bookings, a confirmed booking's calendar file.

Each handler authenticates, counts the request against its user's rate limit
where docs/api.md says so, decodes its body and runs one command (keyed by
the client's ``Idempotency-Key`` for the changes). It never decides a booking
rule (the shards do) and must never be imported by ``gateway.http`` or
``gateway.handling``.
"""

from typing import Final

import msgspec
from aiohttp import web

from engine.core import protocol as p
from engine.core.states import BookingStatus
from engine.notify.calendar import CONTENT_TYPE, booking_calendar
from gateway import schemas as s
from gateway.auth.principal import acting_user
from gateway.handling import (
    cursor_param,
    decode_body,
    idempotency_key,
    limit_param,
    limited_body,
    merged_pages,
    next_id,
    record_token_email,
    run,
    run_keyed,
    user_param,
)
from gateway.http import (
    ENGINE_KEY,
    ENTITIES_KEY,
    ApiError,
    json_response,
    principal,
    request_origin,
)

# What a browser saves the calendar file as.
CALENDAR_DISPOSITION: Final = 'attachment; filename="booking.ics"'


async def reserve(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    body, user_id = await limited_body(request, "reserve", who, s.ReserveBody)
    result = await run_keyed(
        request,
        "reserve",
        user_id,
        p.Reserve(
            request_id=next_id(request),
            origin=request_origin(request),
            slot_id=body.slot_id,
            user_id=user_id,
            idempotency_key=idempotency_key(request),
        ),
    )
    record_token_email(request, who, user_id)
    if isinstance(result, p.BookingResult):
        return json_response(
            s.BookingEnvelope(booking=s.booking_out(result.booking)), result.status
        )
    assert isinstance(result, p.QueueResult)
    return json_response(s.QueueEnvelope(queue=s.queue_out(result.entry)), result.status)


async def confirm(request: web.Request) -> web.StreamResponse:
    return await _owner_command(request, "confirm", p.Confirm)


async def extend(request: web.Request) -> web.StreamResponse:
    return await _owner_command(request, "extend", p.ExtendHold)


async def release(request: web.Request) -> web.StreamResponse:
    return await _owner_command(request, "release", p.ReleaseHold)


async def _owner_command(
    request: web.Request,
    name: str,
    command: type[p.Confirm] | type[p.ExtendHold] | type[p.ReleaseHold],
) -> web.StreamResponse:
    """A command of a booking's owner on it (confirm, extend, release): the Booking."""
    who = principal(request)
    body = await decode_body(request, s.ActingBody, optional=True)
    user_id = acting_user(who, body.user_id)
    result = await run_keyed(
        request,
        name,
        user_id,
        command(
            request_id=next_id(request),
            origin=request_origin(request),
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
            origin=request_origin(request),
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
    limit = limit_param(request.query, problems)
    status: BookingStatus | None = None
    if "status" in request.query:
        try:
            status = BookingStatus(request.query["status"])
        except ValueError:
            problems["status"] = "one of RESERVED, CONFIRMED, EXPIRED, CANCELLED, COMPLETED"
        if status is BookingStatus.PENDING:
            problems["status"] = "one of RESERVED, CONFIRMED, EXPIRED, CANCELLED, COMPLETED"
    after = cursor_param(request.query.get("cursor"), problems)
    if problems:
        raise ApiError(422, "ValidationError", "invalid filter", problems)
    commands = {
        shard: p.ListBookings(
            request_id=next_id(request), user_id=user_id, status=status, limit=limit, after=after
        )
        for shard in range(request.app[ENGINE_KEY].shard_count)
    }
    bookings, next_cursor = await merged_pages(
        request, commands, limit, lambda b: (b.reserved_at_ms, b.id), reverse=True
    )
    return json_response(
        s.BookingPageOut(items=[s.booking_out(b) for b in bookings], next_cursor=next_cursor)
    )


async def calendar_file(request: web.Request) -> web.StreamResponse:
    """The owner's CONFIRMED booking as an iCalendar file (engine/notify/calendar.py).

    Owners only: another user's booking is 404 as on ``GET /api/bookings/{id}``,
    an admin's included (the file is the attendee's).
    """
    who = principal(request)
    found = await run(
        request,
        p.GetBooking(
            request_id=next_id(request),
            booking_id=request.match_info["booking_id"],
            user_id=acting_user(who, user_param(request)),
        ),
    )
    assert isinstance(found, p.BookingResult)
    booking = found.booking
    if booking.status is not BookingStatus.CONFIRMED:
        raise ApiError(
            409,
            "Conflict",
            f"the booking is {booking.status.value}: only a CONFIRMED booking has a calendar file",
        )
    slot = await run(request, p.GetSlot(request_id=next_id(request), slot_id=booking.slot_id))
    assert isinstance(slot, p.SlotResult)
    slot_out = s.slot_out(slot.slot)
    ics = booking_calendar(
        msgspec.to_builtins(s.booking_out(booking)),
        msgspec.to_builtins(slot_out),
        entity=request.app[ENTITIES_KEY].get(slot_out.domain),
    )
    response = web.Response(body=ics, headers={"Content-Type": CONTENT_TYPE})
    response.headers["Content-Disposition"] = CALENDAR_DISPOSITION
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/bookings/reserve", reserve)
    app.router.add_get("/api/bookings/my", my_bookings)
    # As in OpenAPI, the routes above win over a booking id spelled like them:
    # GET /api/bookings/reserve is a 405, not a search for booking "reserve".
    app.router.add_get("/api/bookings/{booking_id:(?!(?:reserve|my)$)[^{}/]+}", get_booking)
    app.router.add_post("/api/bookings/{booking_id}/confirm", confirm)
    app.router.add_post("/api/bookings/{booking_id}/cancel", cancel)
    app.router.add_get("/api/bookings/{booking_id}/calendar.ics", calendar_file)
    app.router.add_post("/api/bookings/{booking_id}/extend", extend)
    app.router.add_post("/api/bookings/{booking_id}/release", release)
