"""The aiohttp application: ``create_app`` assembles the routes of docs/api.md.

Every route handler does the same four things: authenticate (``gateway.auth``),
decode its body or query (msgspec: decoding is validation), turn the request
into one engine command with a fresh request id, and render the engine's
result or refusal. None decides a booking rule: the shards do.

The gateway's modules, each building only on those below it (a layer
contract in pyproject.toml holds it):

- ``gateway.server``: ``slotengine serve``, the deployment around the app;
- ``gateway.app`` (this module): the application, nothing but its assembly;
- ``gateway.routes`` (``admin``, ``slots``, ``bookings``, ``queue``,
  ``contact``, ``webhooks``), the live
  updates ``gateway.live`` (``bus``, ``outbox``, ``watches``, ``endpoints``)
  and the operations endpoints ``gateway.observability`` (``metrics``,
  ``sampler``, ``health``, ``endpoints``), none of which imports another;
- ``gateway.handling``: decoding a request and calling the engine;
- ``gateway.http``: the error shape and its mapping, the app keys, the
  request context (``X-Request-Id``, security headers, CORS), the principal.

This module never holds a handler or a helper of its own: a route goes to the
module of its resource.
"""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

from engine.shell.coalescer import EngineClient, RequestIds
from gateway.auth.verify import Verifier
from gateway.handling import add_token_emails
from gateway.http import (
    BODY_BYTES_MAX,
    CORS_ORIGINS_KEY,
    DATA_KEYS_KEY,
    DATABASE_KEY,
    ENGINE_KEY,
    ENTITIES_KEY,
    IDS_KEY,
    KEYS_KEY,
    LIMITER_KEY,
    ORIGINS_KEY,
    TRACING_KEY,
    VERIFIER_KEY,
    WEBHOOK_ALLOW_PRIVATE_KEY,
    Origins,
    request_context,
)
from gateway.idempotency import KeyRegistry
from gateway.live.endpoints import add_realtime
from gateway.openapi import add_openapi
from gateway.ratelimit import RateLimiter
from gateway.routes import admin, bookings, contact, queue, slots, webhooks
from persistence.sealing import KeyRing

if TYPE_CHECKING:
    from engine.shell.tracing import Tracing


def create_app(
    engine: EngineClient | None,
    verifier: Verifier,
    limiter: RateLimiter | None = None,
    *,
    cors_origins: Sequence[str] = (),
    keys: KeyRegistry | None = None,
    domains: Sequence[str] = (),
    database: asyncpg.Pool | None = None,
    data_keys: KeyRing | None = None,
    entities: Mapping[str, str] | None = None,
    webhook_allow_private: bool = False,
    tracing: "Tracing | None" = None,
    trusted_proxy_header: str | None = None,
    trusted_proxies: Sequence[str] = (),
) -> web.Application:
    """The routes of docs/api.md. ``engine`` may come later: set ``app[ENGINE_KEY]`` on startup.

    Without a ``limiter`` nothing is rate limited (tests of other concerns).
    ``cors_origins`` are the browser origins allowed to call the API ("*": any).
    ``domains``: the engine's domains, which ``/openapi.json`` lists as the only
    ones a slot may name. ``database`` and ``data_keys``: the deployment's
    database and the data keys, for the contact details (503 without them);
    like the engine, they may be set on startup instead.
    ``entities``: each domain's entityName, which names
    a booking's calendar event (the slot's domain otherwise).
    ``webhook_allow_private``: webhook endpoints may be private, loopback or
    link-local addresses (local setups and tests).
    ``tracing``: this process's, when on (``engine.shell.tracing``); its
    ``http_server`` instrumentation must be on before the app is created.
    ``trusted_proxy_header`` and ``trusted_proxies``: the header naming the client
    behind a proxy, believed only from a peer in those networks (``Origins``).
    """
    app = web.Application(middlewares=[request_context], client_max_size=BODY_BYTES_MAX)
    app[CORS_ORIGINS_KEY] = frozenset(cors_origins)
    app[ORIGINS_KEY] = Origins(trusted_proxy_header, trusted_proxies)
    app[ENTITIES_KEY] = dict(entities or {})
    if engine is not None:
        app[ENGINE_KEY] = engine
    if limiter is not None:
        app[LIMITER_KEY] = limiter
    if keys is not None:
        app[KEYS_KEY] = keys
    if database is not None:
        app[DATABASE_KEY] = database
    if data_keys is not None:
        app[DATA_KEYS_KEY] = data_keys
    app[VERIFIER_KEY] = verifier
    if tracing is not None:
        app[TRACING_KEY] = tracing
    app[IDS_KEY] = RequestIds()
    add_token_emails(app)
    app[WEBHOOK_ALLOW_PRIVATE_KEY] = webhook_allow_private
    add_realtime(app)
    # In this order: aiohttp matches routes in the order they were added.
    admin.add_routes(app)
    slots.add_routes(app)
    bookings.add_routes(app)
    queue.add_routes(app)
    contact.add_routes(app)
    webhooks.add_routes(app)
    add_openapi(app, domains)
    return app
