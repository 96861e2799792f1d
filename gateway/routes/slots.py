"""The slot reads: ``GET /api/slots`` (filtered, paged across shards) and one slot.

It owns the listing's filters (422 ``ValidationError`` for a malformed one)
and the merge of the shards' pages. It never changes a slot (the admin
routes do) and must never be imported by ``gateway.http`` or
``gateway.handling``.
"""

from aiohttp import web

from engine.core import protocol as p
from engine.core.states import SlotStatus
from gateway import schemas as s
from gateway.handling import (
    cursor_param,
    flag_param,
    limit_param,
    merged_pages,
    next_id,
    run,
    time_param,
)
from gateway.http import ENGINE_KEY, ApiError, json_response, principal


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
    limit = limit_param(query, problems)
    from_ms = time_param(query, "from", problems)
    to_ms = time_param(query, "to", problems)
    status: SlotStatus | None = None
    if "status" in query:
        try:
            status = SlotStatus(query["status"])
        except ValueError:
            problems["status"] = f"one of {', '.join(v.value for v in SlotStatus)}"
    after = cursor_param(query.get("cursor"), problems)
    if problems:
        raise ApiError(422, "ValidationError", "invalid filter", problems)
    engine = request.app[ENGINE_KEY]
    resource_id = query.get("resourceId")
    shards = (
        [engine.shard_of_resource(resource_id)] if resource_id else list(range(engine.shard_count))
    )
    commands = {
        shard: p.ListSlots(
            request_id=next_id(request),
            resource_id=resource_id or None,
            from_ms=from_ms,
            to_ms=to_ms,
            status=status,
            available_only=flag_param(request, "available"),
            limit=limit,
            after=after,
        )
        for shard in shards
    }
    views, next_cursor = await merged_pages(
        request, commands, limit, lambda v: (v.start_ms, v.id), reverse=False
    )
    return json_response(
        s.SlotPageOut(items=[s.slot_out(v) for v in views], next_cursor=next_cursor)
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/slots", list_slots)
    app.router.add_get("/api/slots/{slot_id}", get_slot)
