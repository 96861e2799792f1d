"""The admin routes: ``POST /api/admin/slots``, ``PUT`` and ``DELETE /api/admin/slots/{slotId}``.

Each handler requires the ``admin`` role, decodes its body and turns it into
one slot command (``CreateSlot``, ``UpdateSlot``, ``DeleteSlot``) acting as
``admin:<subject>``. It never checks a slot rule itself (times, capacity,
holds on a deleted slot): the shard does. It must never be imported by
``gateway.http`` or ``gateway.handling``.
"""

import uuid

from aiohttp import web

from engine.core import protocol as p
from engine.core.routing import make_slot_id
from gateway import schemas as s
from gateway.handling import (
    decode_body,
    flag_param,
    next_id,
    run,
)
from gateway.http import json_response, principal, request_origin, require_admin


async def create_slot(request: web.Request) -> web.StreamResponse:
    require_admin(who := principal(request))
    body = await decode_body(request, s.CreateSlotBody)
    start_ms = s.to_ms(body.start_time, "startTime")
    end_ms = s.to_ms(body.end_time, "endTime")
    result = await run(
        request,
        p.CreateSlot(
            request_id=next_id(request),
            origin=request_origin(request),
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
            origin=request_origin(request),
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
    force = flag_param(request, "force")
    await run(
        request,
        p.DeleteSlot(
            request_id=next_id(request),
            origin=request_origin(request),
            slot_id=request.match_info["slot_id"],
            force=force,
            actor=f"admin:{who.subject}",
        ),
    )
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/admin/slots", create_slot)
    app.router.add_put("/api/admin/slots/{slot_id}", update_slot)
    app.router.add_delete("/api/admin/slots/{slot_id}", delete_slot)
