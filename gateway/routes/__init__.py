"""The routes of docs/api.md, one module per resource.

``admin`` (slot administration), ``slots`` (slot reads), ``bookings`` and
``queue``; each has ``add_routes(app)``, which ``gateway.app.create_app``
calls in that order (aiohttp matches routes in the order they were added).
The live routes are ``gateway/live/``'s, the operations endpoints
``gateway/observability/``'s. A route module builds on ``gateway.http`` and
``gateway.handling`` and never imports another route module.
"""
