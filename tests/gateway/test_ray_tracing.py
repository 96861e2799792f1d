"""Tracing across the Ray boundary: the shard actors export their own spans.

A gateway (the real app, traced into the SDK's in-memory exporter) reserves
through durable shard actors of this test on the session's local Ray. The
actors are created with this process's OTEL_* variables, which point them at
an OTLP/HTTP receiver run here (an aiohttp app decoding the protobuf
``ExportTraceServiceRequest`` the collector's API defines): their batch and
flush spans must arrive there, linked to the gateway's spans of the request.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from engine.shell.coalescer import EngineClient
from engine.shell.owner import StorageSettings
from engine.shell.ray_actor import RayShardTransport, kill_shard_actors
from engine.shell.tracing import REQUEST_ID_ATTRIBUTE, Tracing, start_tracing
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.ratelimit import RateLimiter, RateLimits
from tests.conftest import REDIS_URL
from tests.support.domain import POLICIES
from tests.support.otlp import ReceivedSpan, Receiver, serving_receiver

pytestmark = pytest.mark.ray

SECRET = "test-secret-0123456789abcdef0123456789abcdef"
SHARDS = 2
CONNECT_TIMEOUT_MS = 60_000
ARRIVAL_LIMIT_S = 30.0
SERVICE = "slotengine-ray-tracing-test"


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    # Before the gateway's tracing instruments aiohttp: its requests make no spans.
    async with serving_receiver() as served:
        yield served


@pytest.fixture
def gateway_tracing() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    tracing = start_tracing([SimpleSpanProcessor(spans)], http_server=True)
    try:
        yield tracing, spans
    finally:
        tracing.shutdown()


def _headers(sub: str, role: str = "user", **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, sub, role, 3600)}", **extra}


async def test_the_shard_actors_spans_arrive_linked_to_the_request(
    ray_cluster: str,
    database_url: str,
    redis_namespace: str,
    receiver: tuple[Receiver, str],
    gateway_tracing: tuple[Tracing, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector, endpoint = receiver
    tracing, gateway_spans = gateway_tracing
    # What the actors are created with: their creator's OTEL_* variables.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", SERVICE)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    prefix = f"traced-{uuid.uuid4().hex[:10]}"
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    try:
        transport = await RayShardTransport.connect(
            shard_count=SHARDS,
            policies=POLICIES,
            name_prefix=prefix,
            storage=storage,
            timeout_ms=CONNECT_TIMEOUT_MS,
        )
        engine = EngineClient(transport, tracing=tracing)
        app = create_app(
            engine,
            Verifier(AuthSettings(secret=SECRET)),
            RateLimiter(redis_client, RateLimits(), namespace=redis_namespace),
            tracing=tracing,
        )
        async with TestClient(TestServer(app)) as api:
            start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
            created = await api.post(
                "/api/admin/slots",
                json={
                    "resourceId": "room-over-ray",
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
                headers=_headers("ann", **{"X-Request-Id": "over-ray-1"}),
            )
            assert reserved.status == 201, await reserved.text()
            await engine.wait_idle(5)
        await transport.close()

        finished = gateway_spans.get_finished_spans()
        (request,) = [
            s
            for s in finished
            if s.kind is SpanKind.SERVER
            and (s.attributes or {}).get(REQUEST_ID_ATTRIBUTE) == "over-ray-1"
        ]
        assert request.context is not None
        (command,) = [
            s
            for s in finished
            if s.name == "engine Reserve"
            and s.parent is not None
            and s.parent.span_id == request.context.span_id
        ]
        assert command.context is not None
        command_id = (command.context.trace_id, command.context.span_id)

        def arrived() -> tuple[ReceivedSpan, ReceivedSpan] | None:
            batches = [
                s for s in collector.spans if s.name == "shard batch" and command_id in s.links
            ]
            for batch in batches:
                for flush in collector.spans:
                    if flush.name == "shard flush" and (batch.trace_id, batch.span_id) in (
                        flush.links
                    ):
                        return batch, flush
            return None

        async with asyncio.timeout(ARRIVAL_LIMIT_S):
            while (found := arrived()) is None:
                await asyncio.sleep(0.05)
        batch, flush = found
        # Exported by the actor itself, configured from its creator's variables.
        assert batch.service == SERVICE and flush.service == SERVICE
        # The request's trace id is in the batch's links: the traces join.
        assert request.context.trace_id in {trace_id for trace_id, _ in batch.links}
        assert batch.attributes["slotengine.shard"] == flush.attributes["slotengine.shard"]
        # The commit's statement, under the flush, arrives from the actor too.
        async with asyncio.timeout(ARRIVAL_LIMIT_S):
            while not any(
                s.parent_span_id == flush.span_id
                and "write_shard_flush" in str(s.attributes.get("db.statement"))
                for s in collector.spans
            ):
                await asyncio.sleep(0.05)
        _no_gateway_span_was_received(finished, collector)
    finally:
        kill_shard_actors(shard_count=SHARDS, name_prefix=prefix)
        await redis_client.aclose()


def _no_gateway_span_was_received(finished: tuple[ReadableSpan, ...], collector: Receiver) -> None:
    """The gateway's spans went to its own exporter: what arrived is the actors'."""
    gateway_ids = {s.context.span_id for s in finished if s.context is not None}
    assert not gateway_ids & {s.span_id for s in collector.spans}
