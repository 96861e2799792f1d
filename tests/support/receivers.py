"""A webhook receiver on loopback for the notification tests: every request, its headers
and body, and when; the status it answers; requests of one event that overlapped."""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from tests.support.ray_head import free_port


@dataclass
class Receiver:
    """A webhook endpoint on loopback: every request, its headers and body, and when."""

    status: int = 204
    requests: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)
    overlaps: list[str] = field(default_factory=list)
    delay_s: float = 0.0
    url: str = ""

    def types(self) -> list[str]:
        return [msgspec.json.decode(body)["type"] for _, _, body in self.requests]


async def running_receiver() -> AsyncIterator[Receiver]:
    """A receiver serving until the block ends."""
    got = Receiver()

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        event_id = request.headers["webhook-id"]
        if got.in_flight.get(event_id):
            got.overlaps.append(event_id)
        got.in_flight[event_id] = got.in_flight.get(event_id, 0) + 1
        try:
            if got.delay_s:
                await asyncio.sleep(got.delay_s)
            got.requests.append((time.time(), dict(request.headers), body))
            return web.Response(status=got.status)
        finally:
            got.in_flight[event_id] -= 1

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    got.url = f"http://127.0.0.1:{port}/hook"
    yield got
    await runner.cleanup()
