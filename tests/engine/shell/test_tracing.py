"""Tracing's configuration from the OTEL_* variables, the trace context a batch
carries, and the coalescer's spans (the SDK's in-memory exporter)."""

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanContext, StatusCode, TraceFlags

from engine.core import protocol as p
from engine.core.protocol import BatchCodec
from engine.core.routing import make_slot_id
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import InProcessHost, OwnedInProcessHost
from engine.shell.owner import StorageSettings
from engine.shell.owner_states import OwnerState
from engine.shell.tracing import (
    Tracing,
    TracingConfigError,
    check_tracing_environment,
    parse_traceparent,
    start_tracing,
    traceparent,
    tracing_asked,
)
from tests.conftest import REDIS_URL
from tests.engine.shell.conftest import Engine
from tests.support.domain import POLICIES

WAIT_S = 10.0


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": ""}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console, none"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
        # Only the exporter turns it on: an endpoint alone does not.
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ],
)
def test_tracing_is_on_only_when_the_variables_ask(environ: dict[str, str], on: bool) -> None:
    assert tracing_asked(environ) is on


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
    ],
)
def test_variables_it_cannot_follow_are_refused(environ: dict[str, str]) -> None:
    with pytest.raises(TracingConfigError):
        check_tracing_environment(environ)


def test_unknown_exporters_are_not_checked_while_tracing_is_off() -> None:
    check_tracing_environment({"OTEL_TRACES_EXPORTER": "zipkin", "OTEL_SDK_DISABLED": "true"})


def test_a_traceparent_goes_and_comes_back() -> None:
    context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    value = traceparent(context)
    assert value == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    parsed = parse_traceparent(value)
    assert parsed is not None and parsed.is_remote
    assert (parsed.trace_id, parsed.span_id, parsed.trace_flags) == (
        context.trace_id,
        context.span_id,
        context.trace_flags,
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # invalid trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # invalid span id
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # unknown version
        "00-0af7651916cd43dd8448eb211c80319x-b7ad6b7169203331-01",  # not hex
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
    ],
)
def test_a_malformed_traceparent_is_no_context(value: str) -> None:
    assert parse_traceparent(value) is None


class Recording:
    """An in-process host, with every batch it is sent kept."""

    def __init__(self, host: InProcessHost) -> None:
        self.host = host
        self.batches: list[bytes] = []

    @property
    def shard_count(self) -> int:
        return self.host.shard_count

    async def call_batch(self, shard: int, data: bytes, timeout_ms: int, *args: object) -> bytes:
        self.batches.append(data)
        return await self.host.call_batch(shard, data, timeout_ms, *args)  # type: ignore[arg-type]


@pytest.fixture
def traced() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    tracing = start_tracing([SimpleSpanProcessor(spans)])
    try:
        yield tracing, spans
    finally:
        tracing.shutdown()


async def test_a_batch_carries_the_context_of_each_traced_command(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, spans = traced
    transport = Recording(InProcessHost(shard_count=1, policies=POLICIES))
    engine = Engine(transport, EngineClient(transport, tracing=tracing))
    slot_id = await engine.slot()
    answer = await engine.reserve(slot_id, "ann")
    assert answer.status == 201
    commands = {s.name: s for s in spans.get_finished_spans() if s.name.startswith("engine ")}
    assert set(commands) == {"engine CreateSlot", "engine Reserve"}
    codec = BatchCodec()
    carried = [codec.decode_traced_batch(data) for data in transport.batches]
    for batch, command in zip(carried, ("engine CreateSlot", "engine Reserve"), strict=True):
        context = commands[command].context
        assert context is not None
        assert batch.traces == [traceparent(context)]
    # The in-process shard traces with the same provider only when handed it:
    # this host was not, so the batches made no shard span.
    assert not [s for s in spans.get_finished_spans() if s.name.startswith("shard ")]


async def test_commands_not_sampled_add_nothing_to_their_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SDK's own reading of the sampler from the environment.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    spans = InMemorySpanExporter()
    tracing = start_tracing([SimpleSpanProcessor(spans)])
    assert tracing.provider.sampler is ALWAYS_OFF
    try:
        transport = Recording(InProcessHost(shard_count=1, policies=POLICIES))
        engine = Engine(transport, EngineClient(transport, tracing=tracing))
        slot_id = await engine.slot()
        assert (await engine.reserve(slot_id, "ann")).status == 201
        codec = BatchCodec()
        for data in transport.batches:
            assert codec.decode_traced_batch(data).traces == []
            assert data == codec.encode_batch(codec.decode_batch(data))
        assert not spans.get_finished_spans()
    finally:
        tracing.shutdown()


def test_a_batch_without_traces_encodes_as_it_always_did() -> None:
    codec = BatchCodec()
    commands: list[p.AnyCommand] = [p.GetSlot(request_id="r-1", slot_id="s-1")]
    plain = codec.encode_batch(commands)
    assert plain == codec.encode_batch(commands, [])
    value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    traced = codec.encode_batch(commands, [value])
    assert len(traced) > len(plain)
    assert codec.decode_batch(traced) == commands
    assert codec.decode_traced_batch(plain).traces == []


async def test_a_flush_links_to_every_batch_it_commits_and_a_failed_one_says_so(
    database_url: str,
    redis_namespace: str,
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    """Group commit: batches applied while a flush runs are committed together by
    the next, which links to each of them."""
    tracing, spans = traced
    held = asyncio.Event()
    released = asyncio.Event()
    failing = False

    async def gate(shard: int) -> None:
        if failing:
            raise OSError("the database went away")
        if not released.is_set():
            held.set()
            await released.wait()

    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    host = OwnedInProcessHost(
        shard_count=1, policies=POLICIES, storage=storage, before_flush=gate, tracing=tracing
    )
    await host.start()
    try:
        # One command a batch: each reservation is a batch of its own.
        engine = Engine(host, EngineClient(host, coalesce=False, tracing=tracing))
        first = asyncio.ensure_future(engine.slot())
        await asyncio.wait_for(held.wait(), WAIT_S)
        # The first flush is held; these batches are applied meanwhile...
        later = [asyncio.ensure_future(engine.slot()) for _ in range(3)]
        async with asyncio.timeout(WAIT_S):
            while (await host.statistics(0, 1_000)).batches < 4:
                await asyncio.sleep(0.01)
        assert not any(task.done() for task in later)  # ...and wait for their commit
        released.set()
        await asyncio.wait_for(asyncio.gather(first, *later), WAIT_S)
        # A flush that fails: its span says so, and the reply is a 503.
        failing = True
        refused = await engine.run(
            p.CreateSlot,
            slot_id=make_slot_id("room-lost", "lost"),
            resource_id="room-lost",
            domain="default",
            start_ms=4_000_000_000_000,
            end_ms=4_000_003_600_000,
            capacity=1,
        )
        assert refused.status == 503, refused
        failing = False
        # Reloaded from storage before the host closes (a close does not wait for
        # a reload under way).
        async with asyncio.timeout(WAIT_S):
            while host.owner(0).state is not OwnerState.SERVING:
                await asyncio.sleep(0.01)
    finally:
        await host.close()
    finished = spans.get_finished_spans()
    batches = [s for s in finished if s.name == "shard batch"]
    flushes = [s for s in finished if s.name == "shard flush"]
    assert len(batches) == 5
    (failed,) = [flush for flush in flushes if not flush.status.is_ok]
    assert failed.status.status_code is StatusCode.ERROR
    assert "the database went away" in str(failed.events[0].attributes)
    flushes = [flush for flush in flushes if flush is not failed]
    linked = {link.context.span_id: flush for flush in flushes for link in flush.links}
    # Every batch is linked by the flush that committed it: the first alone, the
    # three later ones together.
    committed = {link.context.span_id for link in failed.links}
    assert {s.context.span_id for s in batches if s.context is not None} <= set(linked) | committed
    assert len(committed) == 1
    assert sorted(len(flush.links) for flush in flushes if flush.links) == [1, 3]
