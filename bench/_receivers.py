"""The receivers of the notification scenarios: a webhook endpoint and an SMTP server, local.

Both record when each notification arrived and what it was, so a scenario
measures deliveries per second and the lag from the change to the receipt.
The webhook receiver answers 204 at once (or a chosen status); the SMTP server
is aiosmtpd's (the ``bench`` extra; without it a scenario runs webhooks only).
"""

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from aiohttp import web

_decode = msgspec.json.Decoder().decode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Received:
    # (wall-clock seconds at receipt, event type, event id, the event's own time in seconds)
    webhooks: list[tuple[float, str, str, float]] = field(default_factory=list)
    # (wall-clock seconds at receipt, event id)
    emails: list[tuple[float, str]] = field(default_factory=list)
    status: int = 204

    def webhook_ids(self) -> set[str]:
        return {event_id for _, _, event_id, _ in self.webhooks}


@contextlib.asynccontextmanager
async def webhook_receiver(received: Received) -> AsyncIterator[str]:
    """An HTTP endpoint on loopback recording every webhook; yields its URL."""

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        event: dict[str, Any] = _decode(body)
        at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        received.webhooks.append((now, event["type"], request.headers["webhook-id"], at))
        return web.Response(status=received.status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def smtp_receiver(received: Received) -> AsyncIterator[str | None]:
    """An SMTP server on loopback recording every message; yields its URL, or None
    when aiosmtpd is not installed."""
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        yield None
        return

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            now = time.time()
            content = envelope.content.decode("utf-8", "replace")
            event_id = ""
            for line in content.splitlines():
                if line.lower().startswith("x-slotengine-event-id:"):
                    event_id = line.split(":", 1)[1].strip()
                    break
            received.emails.append((now, event_id))
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        yield f"smtp://127.0.0.1:{port}"
    finally:
        await asyncio.to_thread(controller.stop)
