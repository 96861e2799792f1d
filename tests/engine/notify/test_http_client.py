"""The webhook client against receivers that answer every way HTTP/1.1 allows.

Each receiver is a raw asyncio server that reads requests and writes answers
byte for byte, so the client meets what real servers send: kept-alive and
closed connections, chunked, close-delimited and oversized bodies, an
informational answer first, garbage, a connection closed while idle, TLS.
"""

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from engine.notify.http_client import WebhookClient
from tests.support.certificates import self_signed

BODY = b'{"type":"booking.confirmed"}'
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
# A redirect is the answer, never followed (here it points at the metadata address).
MOVED = b"HTTP/1.1 301 Moved\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n"

# Reads one request from a connection (None at its end), answers it.
Handler = Callable[[int, int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class RawReceiver:
    """Serves connections; ``handler(connection_no, request_no, reader, writer)`` answers
    each request and says whether to keep the connection."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection, head, body)
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def url(self, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}/hook?x=1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        handled = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                handled += 1
                self.requests.append((number, head, body))
                if not await self.handler(number, handled, reader, writer):
                    return
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawReceiver]]]:
    started: list[RawReceiver] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> RawReceiver:
        receiver = RawReceiver(handler, tls)
        await receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.close()


@pytest.fixture
async def client() -> AsyncIterator[WebhookClient]:
    opened = WebhookClient(allow_private=True)
    yield opened
    await opened.close()


def answer(raw: bytes, *, keep: bool = True) -> Handler:
    async def handler(
        connection: int, request: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep

    return handler


async def test_one_kept_alive_connection_carries_one_request_after_another(
    serve: Callable[..., Awaitable[RawReceiver]], client: WebhookClient
) -> None:
    receiver = await serve(answer(NO_CONTENT))
    headers = {"webhook-id": "msg_1", "content-type": "application/json"}
    for _ in range(3):
        assert await client.post(receiver.url(), headers, BODY, 5) is None
    assert receiver.connections == 1
    (_, head, body), *_ = receiver.requests
    assert head.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{receiver.port}\r\n".encode() in head
    assert b"webhook-id: msg_1\r\n" in head
    assert f"content-length: {len(BODY)}\r\n".encode() in head
    assert body == BODY


async def test_a_connection_the_receiver_closed_while_idle_is_replaced_unnoticed(
    serve: Callable[..., Awaitable[RawReceiver]], client: WebhookClient
) -> None:
    """As a server whose idle timeout fired just as the request came: it closes the
    connection without answering. The request is sent again on a new connection."""

    async def handler(
        connection: int, request: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if connection == 1 and request == 2:
            return False  # closed, no answer
        writer.write(NO_CONTENT)
        return True

    receiver = await serve(handler)
    assert await client.post(receiver.url(), {}, BODY, 5) is None
    assert await client.post(receiver.url(), {}, BODY, 5) is None
    assert receiver.connections == 2
    assert [connection for connection, _, _ in receiver.requests] == [1, 1, 2]


async def test_a_fresh_connection_closed_without_an_answer_is_a_failed_attempt(
    serve: Callable[..., Awaitable[RawReceiver]], client: WebhookClient
) -> None:
    async def handler(*_: object) -> bool:
        return False

    receiver = await serve(handler)
    assert await client.post(receiver.url(), {}, BODY, 5) == (
        "the connection closed without an answer"
    )
    assert receiver.connections == 1


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # chunked, then the connection is kept
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", None),
        (b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", None),
        # an informational answer, then the final one
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + NO_CONTENT, None),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy", "HTTP 503"),
        (MOVED, "HTTP 301"),
    ],
)
async def test_every_form_of_answer_is_read_to_its_end_and_the_connection_kept(
    serve: Callable[..., Awaitable[RawReceiver]],
    client: WebhookClient,
    raw: bytes,
    status: str | None,
) -> None:
    receiver = await serve(answer(raw))
    assert await client.post(receiver.url(), {}, BODY, 5) == status
    assert await client.post(receiver.url(), {}, BODY, 5) == status
    assert receiver.connections == 1
    assert len(receiver.requests) == 2


async def test_a_body_ended_by_closing_the_connection_answers_and_is_not_reused(
    serve: Callable[..., Awaitable[RawReceiver]], client: WebhookClient
) -> None:
    receiver = await serve(answer(b"HTTP/1.1 200 OK\r\n\r\nall of it", keep=False))
    assert await client.post(receiver.url(), {}, BODY, 5) is None
    assert await client.post(receiver.url(), {}, BODY, 5) is None
    assert receiver.connections == 2


async def test_connection_close_is_honoured(
    serve: Callable[..., Awaitable[RawReceiver]], client: WebhookClient
) -> None:
    receiver = await serve(answer(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"))
    for _ in range(2):
        assert await client.post(receiver.url(), {}, BODY, 5) is None
    assert receiver.connections == 2


async def test_an_oversized_answer_is_not_read_and_its_connection_is_dropped(
    serve: Callable[..., Awaitable[RawReceiver]], client: WebhookClient
) -> None:
    async def handler(
        connection: int, request: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
        try:
            for _ in range(100):
                writer.write(b"x" * 65536)
                await writer.drain()
        except ConnectionError:
            pass
        return False

    receiver = await serve(handler)
    assert await client.post(receiver.url(), {}, BODY, 5) is None
    assert client.open_connections == 0


async def test_garbage_is_a_failed_attempt(
    serve: Callable[..., Awaitable[RawReceiver]], client: WebhookClient
) -> None:
    receiver = await serve(answer(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"))
    assert await client.post(receiver.url(), {}, BODY, 5) == "not an HTTP/1.1 answer"
    assert client.open_connections == 0


async def test_a_header_with_a_line_break_is_never_sent(
    serve: Callable[..., Awaitable[RawReceiver]], client: WebhookClient
) -> None:
    receiver = await serve(answer(NO_CONTENT))
    error = await client.post(receiver.url(), {"x": "a\r\nInjected: yes"}, BODY, 5)
    assert error == "a header carries a line break"
    assert receiver.requests == []


async def test_only_http_and_https_urls_are_posted_to(client: WebhookClient) -> None:
    assert await client.post("ftp://example.com/", {}, BODY, 5) == "not an http or https URL"
    assert await client.post("http://user:pw@example.com/", {}, BODY, 5) == "not a URL of a host"


async def test_idle_connections_are_closed_after_the_idle_time(
    serve: Callable[..., Awaitable[RawReceiver]],
) -> None:
    receiver = await serve(answer(NO_CONTENT))
    client = WebhookClient(allow_private=True, idle_s=0.1)
    try:
        assert await client.post(receiver.url(), {}, BODY, 5) is None
        assert client.open_connections == 1
        for _ in range(50):
            await asyncio.sleep(0.05)
            if client.open_connections == 0:
                break
        assert client.open_connections == 0
        assert await client.post(receiver.url(), {}, BODY, 5) is None
        assert receiver.connections == 2
    finally:
        await client.close()


async def test_https_verifies_the_receivers_certificate(
    serve: Callable[..., Awaitable[RawReceiver]], tmp_path: Path
) -> None:
    cert_path, key_path = self_signed(tmp_path, ("localhost",), ("127.0.0.1",))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_path, key_path)
    receiver = await serve(answer(NO_CONTENT), tls=server_tls)

    trusting = ssl.create_default_context(cafile=str(cert_path))
    client = WebhookClient(allow_private=True, ssl_context=trusting)
    try:
        for host in ("localhost", "127.0.0.1"):
            assert await client.post(receiver.url(host, "https"), {}, BODY, 5) is None
        assert receiver.requests[0][2] == BODY
    finally:
        await client.close()

    # The system's trust store does not know the certificate: refused, nothing sent.
    sent = len(receiver.requests)
    strict = WebhookClient(allow_private=True)
    try:
        error = await strict.post(receiver.url("localhost", "https"), {}, BODY, 5)
        assert error is not None
        assert error.startswith("TLS failed:"), error
        assert strict.open_connections == 0
    finally:
        await strict.close()
    assert len(receiver.requests) == sent
