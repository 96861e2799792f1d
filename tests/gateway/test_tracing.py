"""Tracing with OpenTelemetry over the real gateway, durable in-process shards,
PostgreSQL and Redis: one reservation followed from the HTTP request to the
commit and back, and nothing at all with tracing off.

The spans go to the SDK's in-memory exporter (its testing exporter) through a
simple span processor, so every span is there once it has ended.
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from engine.core.protocol import BatchCodec
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import StorageSettings
from engine.shell.tracing import (
    BATCH_COMMANDS_ATTRIBUTE,
    COMMAND_ATTRIBUTE,
    FLUSH_BATCHES_ATTRIBUTE,
    REQUEST_ID_ATTRIBUTE,
    SHARD_ATTRIBUTE,
    STATUS_ATTRIBUTE,
    Tracing,
    configure_tracing,
    start_tracing,
)
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.idempotency import KeyRegistry
from gateway.ratelimit import RateLimiter, RateLimits
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET, SHARDS
from tests.support.domain import POLICIES

Client = TestClient[Any, Any]
SPANS_WAIT_S = 5.0


def _headers(sub: str, role: str = "user", **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, sub, role, 3600)}", **extra}


class RecordingTransport:
    """The host, with every batch it is sent kept as sent (bytes)."""

    def __init__(self, host: OwnedInProcessHost) -> None:
        self.host = host
        self.batches: list[bytes] = []

    @property
    def shard_count(self) -> int:
        return self.host.shard_count

    async def call_batch(self, shard: int, data: bytes, timeout_ms: int, *args: Any) -> bytes:
        self.batches.append(data)
        return await self.host.call_batch(shard, data, timeout_ms, *args)


async def _gateway(
    database_url: str, redis_namespace: str, tracing: Tracing | None
) -> AsyncIterator[tuple[Client, RecordingTransport]]:
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    host = OwnedInProcessHost(
        shard_count=SHARDS, policies=POLICIES, storage=storage, tracing=tracing
    )
    await host.start()
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    transport = RecordingTransport(host)
    app = create_app(
        EngineClient(transport, tracing=tracing),
        Verifier(AuthSettings(secret=SECRET)),
        RateLimiter(redis_client, RateLimits(), namespace=redis_namespace),
        keys=KeyRegistry(redis_client, redis_namespace),
        tracing=tracing,
    )
    try:
        async with TestClient(TestServer(app)) as client:
            yield client, transport
    finally:
        await redis_client.aclose()
        await host.close()


async def _reserve(api: Client, request_id: str) -> dict[str, Any]:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    created = await api.post(
        "/api/admin/slots",
        json={
            "resourceId": "room-traced",
            "startTime": start.isoformat(),
            "endTime": (start + timedelta(hours=1)).isoformat(),
            "capacity": 1,
        },
        headers=_headers("root", "admin"),
    )
    assert created.status == 201, await created.text()
    slot = await created.json()
    reserved = await api.post(
        "/api/bookings/reserve",
        json={"slotId": slot["id"]},
        headers=_headers("ann", **{"X-Request-Id": request_id}),
    )
    assert reserved.status == 201, await reserved.text()
    assert reserved.headers["X-Request-Id"] == request_id
    booking: dict[str, Any] = await reserved.json()
    return booking


@pytest.fixture
def exporter() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    tracing = start_tracing([SimpleSpanProcessor(spans)], http_server=True)
    try:
        yield tracing, spans
    finally:
        tracing.shutdown()


async def _spans_until(
    spans: InMemorySpanExporter, found: Any, timeout_s: float = SPANS_WAIT_S
) -> tuple[ReadableSpan, ...]:
    """The finished spans once ``found(spans)`` holds (spans end as answers leave)."""
    async with asyncio.timeout(timeout_s):
        while True:
            finished = spans.get_finished_spans()
            if found(finished):
                return finished
            await asyncio.sleep(0.02)


def _linked(span: ReadableSpan) -> set[tuple[int, int]]:
    return {(link.context.trace_id, link.context.span_id) for link in span.links}


def _id(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


async def test_a_reservation_is_followed_from_the_request_to_the_commit_and_back(
    database_url: str,
    redis_namespace: str,
    exporter: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, spans = exporter
    async for api, _ in _gateway(database_url, redis_namespace, tracing):
        await _reserve(api, "traced-reserve-1")

        def complete(finished: tuple[ReadableSpan, ...]) -> bool:
            return any(
                s.attributes is not None
                and s.attributes.get(REQUEST_ID_ATTRIBUTE) == "traced-reserve-1"
                for s in finished
            )

        finished = await _spans_until(spans, complete)

    # The HTTP server span (aiohttp's instrumentation), naming the X-Request-Id.
    (request,) = [
        s
        for s in finished
        if s.kind is SpanKind.SERVER
        and (s.attributes or {}).get(REQUEST_ID_ATTRIBUTE) == "traced-reserve-1"
    ]
    assert request.context is not None
    # The command's span, its child, recording the answer.
    (command,) = [
        s
        for s in finished
        if s.name == "engine Reserve"
        and s.parent is not None
        and s.parent.span_id == request.context.span_id
    ]
    assert command.kind is SpanKind.PRODUCER
    assert command.context is not None and command.context.trace_id == request.context.trace_id
    assert (command.attributes or {})[COMMAND_ATTRIBUTE] == "Reserve"
    assert (command.attributes or {})[STATUS_ATTRIBUTE] == 201
    # The shard's span of the batch that carried it, linked to it (the trace ids join).
    (batch,) = [s for s in finished if s.name == "shard batch" and _id(command) in _linked(s)]
    assert batch.kind is SpanKind.CONSUMER
    assert request.context.trace_id in {trace_id for trace_id, _ in _linked(batch)}
    assert (batch.attributes or {})[SHARD_ATTRIBUTE] in range(SHARDS)
    assert (batch.attributes or {})[BATCH_COMMANDS_ATTRIBUTE] >= 1
    # The flush that committed its changes, linked to the batch...
    (flush,) = [s for s in finished if s.name == "shard flush" and _id(batch) in _linked(s)]
    assert (flush.attributes or {})[FLUSH_BATCHES_ATTRIBUTE] >= 1
    assert (flush.attributes or {})[SHARD_ATTRIBUTE] == (batch.attributes or {})[SHARD_ATTRIBUTE]
    # ... with the commit's asyncpg span under it.
    assert flush.context is not None
    database = [
        s
        for s in finished
        if s.parent is not None
        and s.parent.span_id == flush.context.span_id
        and (s.attributes or {}).get("db.system") == "postgresql"
    ]
    assert database and "write_shard_flush" in str(database[0].attributes)
    # The reply reached the request before its span ended: the commit came first.
    assert flush.end_time is not None and command.end_time is not None
    assert flush.end_time <= command.end_time
    assert request.end_time is not None and command.end_time <= request.end_time
    # Redis: the rate limit's script call (shared by the checks of one loop turn,
    # so a span of its own) and the committed events' fan-out, arguments left out.
    redis_calls = [s for s in finished if (s.attributes or {}).get("db.system") == "redis"]
    statements = {str((s.attributes or {}).get("db.statement")) for s in redis_calls}
    assert any(statement.startswith("EVALSHA ?") for statement in statements), statements
    assert all(set(statement.split()[1:]) <= {"?"} for statement in statements), statements


async def test_a_token_in_the_query_string_is_not_in_the_span(
    database_url: str,
    redis_namespace: str,
    exporter: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, spans = exporter
    token = issue_token(SECRET, "ann", "user", 3600)
    async for api, _ in _gateway(database_url, redis_namespace, tracing):
        # An event stream of a queue place: browsers send the token in the query.
        answer = await api.get(
            f"/api/slots/nope/queue/events?token={token}", headers={"X-Request-Id": "streamed"}
        )
        await answer.release()
        finished = await _spans_until(
            spans,
            lambda f: any((s.attributes or {}).get(REQUEST_ID_ATTRIBUTE) == "streamed" for s in f),
        )
    (request,) = [
        s for s in finished if (s.attributes or {}).get(REQUEST_ID_ATTRIBUTE) == "streamed"
    ]
    assert token not in str(request.attributes)
    assert token.split(".")[2] not in str(request.attributes)


async def test_tracing_off_makes_no_span_and_batches_carry_no_trace_context(
    database_url: str, redis_namespace: str
) -> None:
    original_application = web.Application
    assert configure_tracing({}) is None
    assert configure_tracing({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert configure_tracing({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is None
    # No provider was set, nothing was instrumented.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert web.Application is original_application
    codec = BatchCodec()
    async for api, transport in _gateway(database_url, redis_namespace, None):
        booking = await _reserve(api, "untraced-1")
        assert booking["booking"]["status"] == "RESERVED"
        assert transport.batches
        for data in transport.batches:
            batch = codec.decode_traced_batch(data)
            assert batch.traces == []
            # Not a byte more than the batch of the same commands always was.
            assert data == codec.encode_batch(batch.commands)
            assert b"traces" not in data
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
