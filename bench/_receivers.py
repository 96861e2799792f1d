"""The receivers of the notification scenarios: a webhook endpoint and an SMTP server, local.

Both record when each notification arrived and what it was, so a scenario
measures deliveries per second and the lag from the change to the receipt.
The webhook receiver answers 204 at once (or a chosen status), cheaply; the SMTP server
is aiosmtpd's (the ``bench`` extra; without it a scenario runs webhooks only).
"""

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any, cast

import httptools
import msgspec

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


class _HookProtocol(asyncio.Protocol):
    """One receiver connection: each POST recorded, answered at once (kept alive)."""

    def __init__(self, received: Received) -> None:
        self._received = received
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._hook_id = ""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"webhook-id":
            self._hook_id = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        now = time.time()
        event: dict[str, Any] = _decode(b"".join(self._body))
        at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        self._received.webhooks.append((now, event["type"], self._hook_id, at))
        self._body = []
        status = self._received.status
        assert self._transport is not None
        self._transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n"
            % (status, HTTPStatus(status).phrase.encode())
        )


@contextlib.asynccontextmanager
async def webhook_receiver(received: Received) -> AsyncIterator[str]:
    """An HTTP endpoint on loopback recording every webhook; yields its URL.

    It stands for a receiver on another machine, so it costs the shared cores
    as little as it can: a bare protocol over httptools' parser (about a
    quarter of an aiohttp server's CPU a request)."""
    loop = asyncio.get_running_loop()
    port = free_port()
    server = await loop.create_server(
        lambda: _HookProtocol(received), "127.0.0.1", port, backlog=1024
    )
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.close()
        await server.wait_closed()


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
