"""The service edge: CORS, security headers, the request log and its JSON lines."""

import io
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from engine.shell.coalescer import EngineClient
from engine.shell.inproc import InProcessHost
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.logs import JsonFormatter, configure_logging
from tests.gateway.conftest import SECRET
from tests.support.domain import POLICIES

ORIGIN = "https://app.example.com"
Client = TestClient[Any, Any]


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("a bug")


@pytest.fixture
async def edge() -> AsyncIterator[Client]:
    host = InProcessHost(shard_count=1, policies=POLICIES)
    app = create_app(
        EngineClient(host), Verifier(AuthSettings(secret=SECRET)), cors_origins=(ORIGIN,)
    )
    app.router.add_get("/boom", _boom)
    async with TestClient(TestServer(app)) as client:
        yield client
    host.close()


def _auth(sub: str = "ann") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, sub, 'user', 600)}"}


async def test_a_preflight_from_an_allowed_origin_is_answered(edge: Client) -> None:
    response = await edge.options(
        "/api/bookings/reserve",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert {"authorization", "content-type", "idempotency-key"} <= {
        h.strip() for h in allowed.split(",")
    }
    assert int(response.headers["Access-Control-Max-Age"]) > 0


async def test_a_preflight_from_another_origin_is_refused(edge: Client) -> None:
    response = await edge.options(
        "/api/bookings/reserve",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers
    assert (await response.json())["error"] == "Forbidden"


async def test_answers_name_an_allowed_origin_and_no_other(edge: Client) -> None:
    allowed = await edge.get("/api/slots", headers={"Origin": ORIGIN, **_auth()})
    assert allowed.status == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert allowed.headers["Vary"] == "Origin"
    assert "X-Request-Id" in allowed.headers["Access-Control-Expose-Headers"]
    other = await edge.get("/api/slots", headers={"Origin": "https://evil.example", **_auth()})
    assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers
    # Errors carry the headers too, so a page can read why it was refused.
    refused = await edge.get("/api/slots", headers={"Origin": ORIGIN})
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_every_answer_has_the_security_headers_and_a_request_id(edge: Client) -> None:
    for response in (
        await edge.get("/api/slots", headers=_auth()),
        await edge.get("/api/slots"),
        await edge.get("/nowhere"),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert len(response.headers["X-Request-Id"]) >= 16
    echoed = await edge.get("/api/slots", headers={"X-Request-Id": "trace-42", **_auth()})
    assert echoed.headers["X-Request-Id"] == "trace-42"


async def test_a_bug_is_a_500_in_the_contract_shape(edge: Client) -> None:
    response = await edge.get("/boom")
    assert response.status == 500
    body = await response.json()
    assert body["error"] == "InternalError" and "a bug" not in body["message"]


async def test_each_request_is_logged_with_its_route_never_its_query(
    edge: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="slotengine.access")
    secret_token = issue_token(SECRET, "ann", "user", 600)
    await edge.get(f"/api/slots/00000000-snope?token={secret_token}", headers=_auth())
    records = [r for r in caplog.records if r.name == "slotengine.access"]
    assert len(records) == 1
    record = records[0]
    assert record.__dict__["event"] == "http.request"
    assert record.__dict__["route"] == "/api/slots/{slot_id}"
    assert record.__dict__["status"] == 404 and record.__dict__["error"] == "NotFound"
    assert record.__dict__["duration_ms"] >= 0 and record.__dict__["request_id"]
    line = JsonFormatter().format(record)
    assert secret_token not in line and "snope" not in line and "ann" not in line


def test_a_log_line_is_one_json_object_with_only_the_allowed_fields() -> None:
    record = logging.LogRecord(
        "slotengine.test", logging.WARNING, __file__, 1, "cannot reach %s", (), None
    )
    record.msg = "cannot reach %s"
    record.args = ("postgresql://app:hunter2@db:5432/slots",)
    record.__dict__.update(request_id="r-1", status=503, authorization="Bearer abc")
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "warning" and data["logger"] == "slotengine.test"
    assert data["msg"] == "cannot reach postgresql://app:***@db:5432/slots"
    assert data["request_id"] == "r-1" and data["status"] == 503
    assert "authorization" not in data and "Bearer" not in line
    assert data["ts"].endswith("Z")


def test_configured_logging_writes_json_lines_from_a_thread_with_tracebacks() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    writer = configure_logging("info", stream)
    try:
        log = logging.getLogger("slotengine.check")
        log.debug("not shown")
        log.info("shown %d", 1, extra={"shard": 3})
        try:
            raise ValueError("broken")
        except ValueError:
            log.exception("failed")
    finally:
        writer.stop()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["shown 1", "failed"]
    assert lines[0]["shard"] == 3
    assert "ValueError: broken" in lines[1]["exc"]


def test_anything_shaped_like_a_token_is_masked_in_every_record_written() -> None:
    """A last line of defence: a library quoting a request with its token in it."""
    token = issue_token(SECRET, "ann", "user", 600)
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    writer = configure_logging("debug", stream)
    try:
        library = logging.getLogger("aiohttp.server")
        library.debug("header %r refused", f"Authorization: Bearer {token}\x01")
        try:
            raise ValueError(f"bad line b'GET /ws/queue/s?token={token[:50]}\\x01{token[50:]}'")
        except ValueError:
            library.exception("Error handling request")
        logging.getLogger("slotengine.access").info(
            "request", extra={"request_id": token, "status": 400}
        )
        logging.getLogger("slotengine.check").info("no token in %s", "this one")
    finally:
        writer.stop()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    output = stream.getvalue()
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) == 4
    for part in token.split("."):
        assert part not in output
    assert lines[0]["msg"].startswith("header 'Authorization: Bearer [redacted")
    assert "ValueError: bad line" in lines[1]["exc"] and "redacted" in lines[1]["exc"]
    assert "redacted" in lines[2]["request_id"] and lines[2]["status"] == 400
    assert lines[3]["msg"] == "no token in this one"


def _expired() -> str:
    return issue_token(SECRET, "ann", "user", 60, now_s=1_000_000_000)


@pytest.mark.parametrize(
    ("path", "headers", "challenge"),
    [
        # No credentials: the scheme alone (RFC 6750, section 3).
        ("/api/bookings/my", {}, "Bearer"),
        ("/api/bookings/my", {"Authorization": "Basic YW5uOnB3"}, "Bearer"),
        ("/ws/bookings", {}, "Bearer"),
        # A token presented and refused: invalid_token.
        (
            "/api/bookings/my",
            {"Authorization": "Bearer not.a.token"},
            'Bearer error="invalid_token"',
        ),
        ("/api/slots", {"Authorization": f"Bearer {_expired()}"}, 'Bearer error="invalid_token"'),
        ("/ws/bookings?token=not.a.token", {}, 'Bearer error="invalid_token"'),
    ],
)
async def test_every_401_names_the_bearer_scheme_and_says_when_the_token_was_refused(
    edge: Client, path: str, headers: dict[str, str], challenge: str
) -> None:
    response = await edge.get(path, headers=headers)
    assert response.status == 401
    assert (await response.json())["error"] == "Unauthorized"
    assert response.headers.getall("WWW-Authenticate") == [challenge]


async def test_an_answer_other_than_401_carries_no_challenge(edge: Client) -> None:
    response = await edge.get("/api/slots/nope", headers=_auth())
    assert response.status == 404
    assert "WWW-Authenticate" not in response.headers
