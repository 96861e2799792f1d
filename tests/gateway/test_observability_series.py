"""The series the alerts and dashboards read: holds past their TTL (timers
overdue), queue offers, the longest queues' maximum sizes, and the gateway's
database pool by state."""

from typing import Any

import asyncpg
import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from engine.core import protocol as p
from engine.core.records import ShardStatistics, SlotView
from engine.core.states import SlotStatus
from engine.shell.runtime import RuntimeStatistics
from gateway.observability.pool import PoolCollector
from gateway.observability.sampler import EngineSampler
from tests.conftest import DATABASE_URL

NOW_MS = 1_800_000_000_000
# The shards' earliest deadlines: shard 0's passed 42 s ago, shard 1's is ahead,
# shard 2 has none.
DEADLINES_MS = {0: NOW_MS - 42_000, 1: NOW_MS + 5_000, 2: None}
QUEUES = {"slot-a": ("default", 95), "slot-b": ("short", 3), "slot-c": ("unknown", 7)}
QUEUE_SIZES = {"default": 100, "short": 10}


def _runtime(shard: int, next_deadline_ms: int | None, waiting: int) -> RuntimeStatistics:
    core = ShardStatistics(
        shard_id=shard, slots=len(QUEUES), bookings_in_memory=0, holds=1, confirmed=0,
        waiting=waiting, timers=1, idempotency_records=0, request_outcomes=0,
        commands_total=0, failures_total=0, replays_total=0, events_total=0,
        expirations_total=0, offers_total=shard + 5, next_deadline_ms=next_deadline_ms,
    )  # fmt: skip
    return RuntimeStatistics(
        shard_id=shard, batches=0, commands=0, batch_size_max=0, batch_size_histogram=(),
        events=0, timer_firings=0, apply_ns=0, reads_unheld=0, reads_answered_early=0,
        timer_deadline_ms=next_deadline_ms, failed=False, core=core,
    )  # fmt: skip


def _view(slot_id: str, domain: str, queue_length: int) -> SlotView:
    return SlotView(
        id=slot_id, resource_id="room", domain=domain, start_ms=NOW_MS, end_ms=NOW_MS + 1,
        capacity=1, current_bookings=1, held_count=0, available=0, status=SlotStatus.BOOKED,
        queue_length=queue_length, blocked=False, metadata=msgspec.Raw(b"\x80"), version=1,
    )  # fmt: skip


class _Transport:
    """Shards that answer their statistics (and say nothing of their owners)."""

    shard_count = len(DEADLINES_MS)

    def __init__(self) -> None:
        self.answers = True

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        if not self.answers:
            raise TimeoutError
        waiting = sum(length for _, length in QUEUES.values()) if shard == 0 else 0
        return _runtime(shard, DEADLINES_MS[shard], waiting)


class _Engine:
    """Shard 0 holds every queued slot."""

    async def execute(self, command: Any, *, shard: int) -> p.Result:
        assert isinstance(command, p.ListSlots)
        items = [_view(slot_id, domain, n) for slot_id, (domain, n) in QUEUES.items()]
        return p.SlotPage(status=200, items=items if shard == 0 else [])


def _samples(collector: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families: list[Metric] = list(collector.collect())
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


async def test_overdue_timers_and_the_longest_queues_maximum_sizes() -> None:
    transport = _Transport()
    engine: Any = _Engine()
    sampler = EngineSampler(
        lambda: engine,
        lambda: transport,
        queue_sizes=QUEUE_SIZES,
        wall_ms=lambda: NOW_MS,
    )
    await sampler.refresh_for_scrape()
    samples = _samples(sampler)
    overdue = {
        dict(labels)["shard"]: value
        for (name, labels), value in samples.items()
        if name == "engine_shard_timers_overdue_seconds"
    }
    assert overdue == {"0": 42.0, "1": 0.0, "2": 0.0}
    offers = {
        dict(labels)["shard"]: value
        for (name, labels), value in samples.items()
        if name == "queue_offers_total"
    }
    assert offers == {"0": 5, "1": 6, "2": 7}
    lengths = {
        dict(labels)["slot_id"]: value
        for (name, labels), value in samples.items()
        if name == "queue_length"
    }
    assert lengths == {"slot-a": 95, "slot-b": 3, "slot-c": 7}
    sizes = {
        dict(labels)["slot_id"]: value
        for (name, labels), value in samples.items()
        if name == "queue_max_size"
    }
    # A domain the gateway does not know has no maximum to show.
    assert sizes == {"slot-a": 100, "slot-b": 10}

    # Shards that stop answering keep no stale lateness.
    transport.answers = False
    await sampler.sample(max_age_s=0)
    samples = _samples(sampler)
    assert not [name for name, _ in samples if name == "engine_shard_timers_overdue_seconds"]
    await sampler.close()


class _FakePool:
    def __init__(self, size: int, idle: int, max_size: int, closing: bool = False) -> None:
        self.size, self.idle, self.max_size, self.closing = size, idle, max_size, closing

    def get_size(self) -> int:
        return self.size

    def get_idle_size(self) -> int:
        return self.idle

    def get_max_size(self) -> int:
        return self.max_size

    def is_closing(self) -> bool:
        return self.closing


def _pool_states(collector: PoolCollector) -> dict[str, float]:
    return {
        dict(labels)["state"]: value
        for (name, labels), value in _samples(collector).items()
        if name == "slotengine_db_pool_connections"
    }


def test_the_pool_is_read_at_every_collection_and_not_shown_without_one() -> None:
    pool: _FakePool | None = None
    collector = PoolCollector(lambda: pool)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    assert _pool_states(collector) == {}
    pool = _FakePool(size=4, idle=1, max_size=4)
    assert _pool_states(collector) == {"in_use": 3, "idle": 1, "max": 4}
    assert registry.get_sample_value("slotengine_db_pool_connections", {"state": "in_use"}) == 3
    pool.closing = True
    assert _pool_states(collector) == {}


async def test_an_asyncpg_pool_shows_a_connection_in_use_while_it_is_taken() -> None:
    pool = await asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=2)
    try:
        collector = PoolCollector(lambda: pool)
        assert _pool_states(collector) == {"in_use": 0, "idle": 1, "max": 2}
        async with pool.acquire():
            assert _pool_states(collector) == {"in_use": 1, "idle": 0, "max": 2}
        assert _pool_states(collector)["in_use"] == 0
    finally:
        await pool.close()
