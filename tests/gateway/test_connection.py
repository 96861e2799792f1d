"""One HTTP connection, over raw sockets: what the HTTP parser refuses is answered in
the contract's shape without echoing or logging a byte of the request; slow
headers and slow bodies time out with 408 while other connections are served.

Most tests run an in-process gateway served with ``GatewayRunner`` (the protocol
``serve`` uses); the last ones run ``slotengine serve`` itself.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from engine.shell.coalescer import EngineClient
from engine.shell.inproc import InProcessHost
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.connection import GatewayRunner, ReadTimeouts
from gateway.http import SECURITY_HEADERS
from tests.gateway.conftest import SECRET
from tests.gateway.test_serve import Served
from tests.support.domain import POLICIES

# Issued when the module is collected, which may be long before its tests run on a
# slow machine: it lasts a day, longer than any run of the suite.
TOKEN = issue_token(SECRET, "ann", "user", 86_400)
# A string found nowhere but in the requests sent: an answer must not echo it.
MARK = "Qz7markV"
# Small, so that the tests wait little; a trickling client keeps sending far longer.
TIMEOUTS = ReadTimeouts(header_s=1.0, body_s=1.0)
TRICKLE_EVERY_S = 0.2
TRICKLE_FOR_S = 30.0
# Generous: the 408 is due after a second; without the timeouts there is none for 75 s.
ANSWER_WITHIN_S = 8.0


class GatewayTestServer(TestServer):
    """aiohttp's test server, serving with the gateway's protocol (as ``serve`` does)."""

    def __init__(self, app: web.Application, read_timeouts: ReadTimeouts) -> None:
        super().__init__(app)
        self._read_timeouts = read_timeouts

    async def _make_runner(self, **options: Any) -> web.AppRunner:
        return GatewayRunner(self.app, self._read_timeouts, **options)


async def _echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str(message.data)
    return ws


@pytest.fixture
async def port() -> AsyncIterator[int]:
    host = InProcessHost(shard_count=1, policies=POLICIES)
    app = create_app(EngineClient(host), Verifier(AuthSettings(secret=SECRET)))
    app.router.add_get("/echo", _echo)
    server = GatewayTestServer(app, TIMEOUTS)
    await server.start_server()
    assert server.port is not None
    yield server.port
    await server.close()
    host.close()


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of every logger, from DEBUG up."""
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def _token_parts(token: str) -> list[str]:
    return token.split(".")


class Answer:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines)
        }

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


async def _exchange(port: int, request: bytes) -> Answer:
    """Send ``request`` whole; the answer, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return Answer(await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S))
    finally:
        writer.close()


def _assert_contract_shape(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer.raw[:500]
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["error"] == code and isinstance(body["message"], str)
    assert set(body) <= {"error", "message", "details", "retryAfter"}
    assert isinstance(body.get("details", {}), dict)
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers[name.lower()] == value
    assert answer.headers["x-request-id"]


def _refused(token: str) -> dict[str, bytes]:
    """Requests the HTTP parser refuses, each carrying ``token`` and MARK."""
    return {
        "a stray byte beside a token in a header": (
            f"GET /api/slots?m={MARK} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\x01\r\n\r\n"
        ).encode(),
        "a bad byte after a token in a live route's query": (
            f"GET /ws/queue/s-{MARK}?token={token}\x7f HTTP/1.1\r\nHost: x\r\n\r\n"
        ).encode(),
        "a control byte inside a token in the query": (
            f"GET /api/slots/s-{MARK}/queue/events?token={token[:40]}\x01{token[40:]} HTTP/1.1"
            "\r\nHost: x\r\n\r\n"
        ).encode(),
        "an oversized header starting with a token": (
            f"GET /api/slots HTTP/1.1\r\nHost: x\r\nCookie: s={token}{MARK * 1200}\r\n\r\n"
        ).encode(),
        "an invalid method": (
            f"G\x01T /api/slots?m={MARK} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode(),
        "garbage": f"\x16\x03\x01{MARK}\x00\xff {token}\r\n\r\n".encode("latin-1"),
    }


REFUSED = _refused(TOKEN)


@pytest.mark.parametrize("request_bytes", REFUSED.values(), ids=REFUSED.keys())
async def test_what_the_parser_refuses_is_answered_in_the_contract_shape_and_never_echoed(
    port: int, every_log: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    answer = await _exchange(port, request_bytes)
    _assert_contract_shape(answer, 400, "BadRequest")
    for part in [MARK, *_token_parts(TOKEN)]:
        assert part.encode() not in answer.raw
    assert every_log.records, "the refusal is logged"
    for part in [MARK, *_token_parts(TOKEN)]:
        assert part not in every_log.text
        for record in every_log.records:
            assert part not in record.getMessage()


async def test_an_answer_aiohttp_renders_itself_has_the_contract_shape_too(
    port: int, every_log: pytest.LogCaptureFixture
) -> None:
    """An unknown Expect is refused by aiohttp before the middleware, quoting the header."""
    answer = await _exchange(
        port,
        f"GET /api/slots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Expect: {MARK}-{TOKEN}\r\n\r\n".encode(),
    )
    _assert_contract_shape(answer, 417, "ExpectationFailed")
    for part in [MARK, *_token_parts(TOKEN)]:
        assert part.encode() not in answer.raw
        assert part not in every_log.text


async def test_a_refused_connection_does_not_disturb_the_next_one(port: int) -> None:
    await _exchange(port, b"G\x01T / HTTP/1.1\r\n\r\n")
    answer = await _exchange(
        port,
        f"GET /api/slots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode(),
    )
    assert answer.status == 200 and answer.json()["items"] == []


async def test_a_body_that_cannot_be_decoded_is_a_400_not_a_failure(
    port: int, every_log: pytest.LogCaptureFixture
) -> None:
    body = b"not gzip at all"
    answer = await _exchange(
        port,
        f"POST /api/bookings/reserve HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    _assert_contract_shape(answer, 400, "BadRequest")
    assert not [r for r in every_log.records if r.levelno >= logging.WARNING]


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """``data`` a byte at a time, for far longer than any timeout, until the server closes."""
    deadline = time.monotonic() + TRICKLE_FOR_S
    for byte in data:
        if time.monotonic() > deadline or writer.is_closing():
            return
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(TRICKLE_EVERY_S)


async def _answer_to_trickle(port: int, whole: bytes, trickled: bytes) -> tuple[Answer, float]:
    """Sends ``whole`` at once, then ``trickled`` slowly; the answer and how long it took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(whole)
    trickling = asyncio.create_task(_trickle(writer, trickled))
    try:
        # Read until the server closes: it must not wait for the rest.
        raw = await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S)
        return Answer(raw), time.monotonic() - started
    finally:
        trickling.cancel()
        writer.close()


async def _served_meanwhile(port: int, token: str = TOKEN) -> Answer:
    await asyncio.sleep(TIMEOUTS.header_s / 2)  # while the slow clients are mid-way
    return await _exchange(
        port,
        f"GET /api/slots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode(),
    )


async def test_headers_sent_a_byte_at_a_time_time_out_with_408_and_the_connection_closes(
    port: int,
) -> None:
    request = f"GET /api/slots HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    slow, other = await asyncio.gather(
        _answer_to_trickle(port, b"G", (request[1:] + "X-Pad: " + "p" * 400).encode()),
        _served_meanwhile(port),
    )
    answer, took_s = slow
    _assert_contract_shape(answer, 408, "RequestTimeout")
    assert took_s >= TIMEOUTS.header_s
    assert TOKEN.encode() not in answer.raw
    assert other.status == 200


async def test_a_body_sent_a_byte_at_a_time_times_out_with_408_and_the_connection_closes(
    port: int,
) -> None:
    body = b'{"slotId": "' + b"s" * 300 + b'"}'
    head = (
        f"POST /api/bookings/reserve HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    slow, other = await asyncio.gather(
        _answer_to_trickle(port, head + body[:1], body[1:]), _served_meanwhile(port)
    )
    answer, took_s = slow
    _assert_contract_shape(answer, 408, "RequestTimeout")
    assert took_s >= TIMEOUTS.body_s
    assert other.status == 200


async def test_a_request_arriving_in_pieces_within_the_timeout_is_served(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b'{"slotId": "nowhere"}'
        for piece in (
            b"POST /api/bookings/reserve HTTP/1.1\r\nHost: x\r\n",
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n".encode(),
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode(),
            body[:5],
            body[5:],
        ):
            writer.write(piece)
            await asyncio.sleep(TIMEOUTS.header_s / 10)
        answer = Answer(await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S))
    finally:
        writer.close()
    # Read and decoded: the engine's answer (no such slot), not a timeout.
    assert answer.status in (404, 422), answer.raw
    assert answer.json()["error"] != "RequestTimeout"


async def test_a_keep_alive_connection_idle_between_requests_is_not_timed_out(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /api/slots HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    try:
        for _ in range(2):
            writer.write(request.encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_WITHIN_S)
            length = int(Answer(head).headers["content-length"])
            await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(TIMEOUTS.header_s * 1.5)
        assert not reader.at_eof()
    finally:
        writer.close()


async def test_a_websocket_is_not_timed_out_once_upgraded(port: int) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{port}/echo") as ws,
    ):
        for text in ("first", "after the header timeout"):
            await ws.send_str(text)
            assert await asyncio.wait_for(ws.receive_str(), ANSWER_WITHIN_S) == text
            await asyncio.sleep(TIMEOUTS.header_s * 1.5)


# -- slotengine serve ---------------------------------------------------------------------


def _served(database_url: str, tmp_path: Path) -> Served:
    served = Served(database_url, tmp_path)
    served.env["SLOTENGINE_LOG_LEVEL"] = "debug"
    served.env["SLOTENGINE_HEADER_TIMEOUT_SECONDS"] = "1"
    served.env["SLOTENGINE_BODY_TIMEOUT_SECONDS"] = "1"
    return served


async def test_serve_never_echoes_or_logs_a_token_the_parser_refuses(
    database_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    served = _served(database_url, tmp_path)
    async with served:
        token = served.token("ann")
        for request_bytes in _refused(token).values():
            answer = await _exchange(served.port, request_bytes)
            _assert_contract_shape(answer, 400, "BadRequest")
            for part in [MARK, *_token_parts(token)]:
                assert part.encode() not in answer.raw
    # Everything the server logged, at debug level, once it has stopped.
    assert "refused" in served.output
    for part in [MARK, *_token_parts(token)]:
        assert part not in served.output


async def _next_event(events: aiohttp.ClientResponse, kind: str) -> None:
    async with asyncio.timeout(ANSWER_WITHIN_S):
        async for line in events.content:
            if line.startswith(b"data:") and json.loads(line[5:])["type"] == kind:
                return


async def _next_message(ws: aiohttp.ClientWebSocketResponse, kind: str) -> None:
    async with asyncio.timeout(ANSWER_WITHIN_S):
        while json.loads(await ws.receive_str())["type"] != kind:
            pass


async def test_serve_times_slow_clients_out_but_not_live_connections(
    database_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    served = _served(database_url, tmp_path)
    async with served, aiohttp.ClientSession() as session:
        admin, ann, bob = served.token("root", "admin"), served.token("ann"), served.token("bob")
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
        async with session.post(
            f"{served.base}/api/admin/slots",
            json={"resourceId": "room-1", "startTime": f"{tomorrow}T09:00:00Z",
                  "endTime": f"{tomorrow}T10:00:00Z", "capacity": 2},
            headers={"Authorization": f"Bearer {admin}"},
        ) as created:  # fmt: skip
            assert created.status == 201
            slot_id = (await created.json())["id"]
        async with (
            session.ws_connect(f"{served.base}/ws/queue/{slot_id}?token={ann}") as ws,
            session.get(
                f"{served.base}/api/slots/{slot_id}/queue/events",
                headers={"Authorization": f"Bearer {ann}"},
            ) as events,
        ):
            await _next_message(ws, "slot.updated")
            await _next_event(events, "slot.updated")
            request = f"GET /api/slots HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bob}\r\n"
            body = b'{"slotId": "' + slot_id.encode() + b'"}'
            head = (
                f"POST /api/bookings/reserve HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {bob}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            slow_headers, slow_body, other = await asyncio.gather(
                _answer_to_trickle(served.port, b"G", request[1:].encode() + b"X-Pad: " * 100),
                _answer_to_trickle(served.port, head + body[:1], body[1:]),
                _served_meanwhile(served.port, bob),
            )
            _assert_contract_shape(slow_headers[0], 408, "RequestTimeout")
            _assert_contract_shape(slow_body[0], 408, "RequestTimeout")
            assert other.status == 200
            # Both live connections outlived the timeouts: a change still reaches them.
            async with session.post(
                f"{served.base}/api/bookings/reserve",
                json={"slotId": slot_id},
                headers={"Authorization": f"Bearer {bob}"},
            ) as reserved:
                assert reserved.status == 201
            await _next_message(ws, "slot.updated")
            await _next_event(events, "slot.updated")
