"""The admin webhook routes: endpoints (``/api/admin/webhooks``), their deliveries,
and sending a delivery again (``/api/admin/deliveries/{deliveryId}/redeliver``).

Each handler requires the ``admin`` role. A new endpoint's URL passes the
guard against server-side request forgery (``engine.notify.webhooks``) before
it is stored; its secret is answered once, on creation, and stored sealed
(``persistence.webhooks``). These routes read and write the deployment's
database themselves: no shard owns webhooks.

It never makes a delivery (the delivery workers do) and must never be
imported by ``gateway.http`` or ``gateway.handling``.
"""

import contextlib
import time
from collections.abc import Iterator
from typing import Final, get_args

import asyncpg
from aiohttp import web

from engine.core.limits import ID_CHARS_MAX
from engine.core.storable import text_problem
from engine.notify.events import ALL_EVENTS
from engine.notify.webhooks import new_secret, secret_problem, url_problem
from gateway import schemas as s
from gateway.handling import cursor_param, decode_body, limit_param
from gateway.http import (
    RETRY_AFTER_UNAVAILABLE_S,
    WEBHOOK_ALLOW_PRIVATE_KEY,
    ApiError,
    data_keys,
    database,
    database_timing,
    json_response,
    principal,
    require_admin,
)
from persistence import timings as t
from persistence import webhooks as stored

_STATUSES: Final = get_args(s.DeliveryStatusName)


@contextlib.contextmanager
def _database_up() -> Iterator[None]:
    """The database unreachable, as the contract's 503."""
    try:
        yield
    except (
        OSError,
        TimeoutError,
        asyncpg.InterfaceError,
        asyncpg.PostgresConnectionError,
        asyncpg.exceptions.OperatorInterventionError,
    ):
        raise ApiError(
            503,
            "ServiceUnavailable",
            "the database is unreachable, try again",
            retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
        ) from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _events(names: list[str]) -> list[str]:
    """The subscribed event types, once each in the order given; ``["*"]`` for all."""
    if ALL_EVENTS in names:
        return [ALL_EVENTS]
    return list(dict.fromkeys(names))


def _endpoint_out(endpoint: stored.Endpoint) -> s.WebhookEndpointOut:
    return s.WebhookEndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        events=list(endpoint.events),
        created_at=s.rfc3339(endpoint.created_at_ms),
    )


def _delivery_out(delivery: stored.Delivery) -> s.DeliveryOut:
    return s.DeliveryOut(
        id=delivery.id,
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        channel="email" if delivery.channel == "email" else "webhook",
        status=delivery.status,
        attempts=delivery.attempts,
        last_error=delivery.last_error,
        next_attempt_at=s.rfc3339(delivery.next_attempt_ms),
        created_at=s.rfc3339(delivery.created_at_ms),
        delivered_at=None
        if delivery.delivered_at_ms is None
        else s.rfc3339(delivery.delivered_at_ms),
    )


def _not_found(what: str) -> ApiError:
    return ApiError(404, "NotFound", f"no such {what}")


def _path_id(request: web.Request, name: str, what: str) -> str:
    """An id from the path; one no row can have (U+0000, too long) is unknown."""
    value = request.match_info[name]
    if len(value) > ID_CHARS_MAX or text_problem(value) is not None:
        raise _not_found(what)
    return value


async def create_webhook(request: web.Request) -> web.StreamResponse:
    require_admin(principal(request))
    body = await decode_body(request, s.CreateWebhookBody)
    pool, ring = database(request), data_keys(request)
    problems: dict[str, str] = {}
    secret = body.secret if body.secret is not None else new_secret()
    problem = secret_problem(secret)
    if problem is not None:
        problems["secret"] = problem
    allow_private = request.app.get(WEBHOOK_ALLOW_PRIVATE_KEY, False)
    problem = await url_problem(body.url, allow_private=allow_private)
    if problem is not None:
        problems["url"] = problem
    if problems:
        message = "; ".join(f"{field}: {text}" for field, text in problems.items())
        raise ApiError(422, "ValidationError", message, problems)
    with _database_up(), database_timing(request.app, t.DATABASE_WEBHOOK_WRITE):
        endpoint = await stored.create_endpoint(
            pool, ring, body.url, _events(body.events), secret, _now_ms()
        )
    out = _endpoint_out(endpoint)
    return json_response(
        s.CreatedWebhookEndpointOut(
            id=out.id, url=out.url, events=out.events, created_at=out.created_at, secret=secret
        ),
        201,
    )


async def list_webhooks(request: web.Request) -> web.StreamResponse:
    require_admin(principal(request))
    pool = database(request)
    with _database_up(), database_timing(request.app, t.DATABASE_WEBHOOK_READ):
        endpoints = await stored.list_endpoints(pool)
    return json_response(
        s.WebhookEndpointPageOut(items=[_endpoint_out(e) for e in endpoints], next_cursor=None)
    )


async def delete_webhook(request: web.Request) -> web.StreamResponse:
    require_admin(principal(request))
    pool = database(request)
    with _database_up(), database_timing(request.app, t.DATABASE_WEBHOOK_WRITE):
        deleted = await stored.delete_endpoint(
            pool, _path_id(request, "endpoint_id", "webhook endpoint"), _now_ms()
        )
    if not deleted:
        raise _not_found("webhook endpoint")
    return web.Response(status=204)


async def list_deliveries(request: web.Request) -> web.StreamResponse:
    require_admin(principal(request))
    problems: dict[str, str] = {}
    query = request.query
    status = query.get("status")
    if status is not None and status not in _STATUSES:
        problems["status"] = f"one of {', '.join(_STATUSES)}"
    limit = limit_param(query, problems)
    cursor = query.get("cursor")
    cursor_param(cursor, problems)
    if problems:
        message = "; ".join(f"{field}: {text}" for field, text in problems.items())
        raise ApiError(422, "ValidationError", message, problems)
    pool = database(request)
    endpoint_id = _path_id(request, "endpoint_id", "webhook endpoint")
    with _database_up(), database_timing(request.app, t.DATABASE_DELIVERY_READ):
        if not await stored.endpoint_exists(pool, endpoint_id):
            raise _not_found("webhook endpoint")
        items, next_cursor = await stored.list_deliveries(
            pool,
            endpoint_id,
            status,  # type: ignore[arg-type]  # one of _STATUSES, checked above
            cursor or None,
            limit,
        )
    return json_response(
        s.DeliveryPageOut(items=[_delivery_out(d) for d in items], next_cursor=next_cursor)
    )


async def redeliver(request: web.Request) -> web.StreamResponse:
    require_admin(principal(request))
    pool = database(request)
    with _database_up(), database_timing(request.app, t.DATABASE_DELIVERY_REDELIVER):
        found = await stored.redeliver(
            pool, _path_id(request, "delivery_id", "delivery"), _now_ms()
        )
    if not found:
        raise _not_found("delivery")
    return web.Response(status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/admin/webhooks", create_webhook)
    app.router.add_get("/api/admin/webhooks", list_webhooks)
    app.router.add_delete("/api/admin/webhooks/{endpoint_id}", delete_webhook)
    app.router.add_get("/api/admin/webhooks/{endpoint_id}/deliveries", list_deliveries)
    app.router.add_post("/api/admin/deliveries/{delivery_id}/redeliver", redeliver)
