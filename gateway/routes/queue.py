"""The waiting-line routes: join, leave, and one's position in a slot's queue.

The live views of a queue (WebSocket, SSE) are ``gateway/live/``'s. This
module never computes a position itself (the shard answers it) and must never
be imported by ``gateway.http`` or ``gateway.handling``.
"""

from aiohttp import web

from engine.core import protocol as p
from gateway import schemas as s
from gateway.auth.principal import acting_user
from gateway.handling import (
    idempotency_key,
    limited_body,
    next_id,
    record_token_email,
    run,
    run_keyed,
    user_param,
)
from gateway.http import json_response, limit, principal, request_origin


async def join_queue(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    _, user_id = await limited_body(request, "queue_join", who, s.ActingBody, optional=True)
    result = await run_keyed(
        request,
        "queue_join",
        user_id,
        p.JoinQueue(
            request_id=next_id(request),
            origin=request_origin(request),
            slot_id=request.match_info["slot_id"],
            user_id=user_id,
            idempotency_key=idempotency_key(request),
        ),
    )
    record_token_email(request, who, user_id)
    assert isinstance(result, p.QueueResult)
    return json_response(s.queue_out(result.entry), result.status)


async def leave_queue(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    await run(
        request,
        p.LeaveQueue(
            request_id=next_id(request),
            origin=request_origin(request),
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


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/slots/{slot_id}/queue", join_queue)
    app.router.add_delete("/api/slots/{slot_id}/queue", leave_queue)
    app.router.add_get("/api/slots/{slot_id}/queue/position", queue_position)
