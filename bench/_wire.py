"""A lean HTTP/1.1 keep-alive client for load generation on the server's own machine.

The load generator shares two cores with the server it measures, so what it
spends per request is taken from the server: aiohttp's client costs about
200 µs of CPU a request, which at a storm of a thousand requests is most of
what a latency figure would show. This client writes each request as one
pre-assembled buffer and parses answers by hand (status line, Content-Length,
body), about a tenth of that. It speaks only what the gateway answers: HTTP/1.1
with Content-Length bodies (no chunked encoding, no compression), one request
at a time per connection.

It must never be pointed at a server other than the gateway: it speaks only
what the gateway answers.
"""

import asyncio
from typing import Any, Final, cast

import msgspec

_encode = msgspec.json.encode
_decode = msgspec.json.decode
HEADER_BYTES_MAX: Final = 64 * 1024

# What a real client sends, so the gateway handles (and audits) one: a mobile
# browser's user agent, of the usual length.
_USER_AGENT = (
    b"User-Agent: Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
    b"(KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36\r\n"
)


class WireError(Exception):
    """The connection broke or answered something this client does not speak."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(WireError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            answer = self._parse()
            if answer is not None:
                self.waiter.set_result(answer)

    def _parse(self) -> tuple[int, bytes] | None:
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > HEADER_BYTES_MAX:
                raise WireError("headers too long")
            return None
        head = bytes(buffer[:end])
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        total = end + 4 + length
        if len(buffer) < total:
            return None
        body = bytes(buffer[end + 4 : total])
        del buffer[:total]
        return status, body


class Connection:
    """One keep-alive connection; ``request`` sends one request and waits for its answer."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._protocol: _Protocol | None = None
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        self._protocol = protocol

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()

    async def request(
        self, method: str, path: str, authorization: bytes, body: Any = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON body or None)."""
        if self._protocol is None or self._protocol.closed:
            await self.open()
        protocol = self._protocol
        assert protocol is not None and protocol.transport is not None
        payload = b"" if body is None else _encode(body)
        head = (
            f"{method} {path} HTTP/1.1\r\n".encode()
            + self._host_header
            + _USER_AGENT
            + b"Authorization: Bearer "
            + authorization
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
        )
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        protocol.waiter = waiter
        protocol.transport.write(head + payload)
        # An answer may already sit in the buffer (never for a fresh request, but cheap).
        ready = protocol._parse() if protocol.buffer else None
        if ready is not None:
            waiter.set_result(ready)
        status, raw = await waiter
        protocol.waiter = None
        return status, (_decode(raw) if raw else None)
