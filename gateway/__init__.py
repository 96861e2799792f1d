"""The public HTTP, WebSocket and SSE API over aiohttp.

It will own routing, msgspec request and response schemas, JWT auth, rate
limits, real-time fan-out, health, metrics and OpenAPI. It must never decide a
booking rule itself: every state change goes to the shards through the
coalescer in ``engine.shell``.
"""
