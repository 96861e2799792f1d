"""Many concurrent callers through the coalescer to real Ray shard actors, batched and unbatched.

Each caller is one user looping over random slots: reserve; with a hold,
confirm then cancel (which frees the place and offers it to the slot's queue);
queued instead, ask the queue position, then confirm and cancel an offered
hold or leave the queue. Every command counts as one operation, refusals
included. The same load then runs without coalescing (one Ray call per
command) for the baseline, in the same run and on the same actors.

It owns its own Ray (unless ``RAY_ADDRESS`` names a cluster), its own shard
actors under a fresh name, and kills both at the end.

It must never touch another run's or a deployment's shard actors.
"""

import argparse
import asyncio
import collections
import contextlib
import os
import platform
import random
import shutil
import tempfile
import time
import uuid
from typing import Any

from engine.core import protocol as p
from engine.core.routing import make_slot_id
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShellError
from engine.shell.limits import PARTIAL_BATCHES_IN_FLIGHT_MAX

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
# Bounds the wait for the callers to finish their last cycle after a window.
DRAIN_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, default=4, help="shard actors (default 4)")
    parser.add_argument(
        "--concurrency", type=int, default=1000, help="concurrent callers (default 1000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured window, coalesced (default 10)"
    )
    parser.add_argument(
        "--max-ops", type=int, default=0, help="end a window after this many operations (0: no cap)"
    )
    parser.add_argument(
        "--warmup-seconds", type=float, default=1.0, help="unmeasured start (default 1)"
    )
    parser.add_argument(
        "--unbatched-seconds",
        type=float,
        default=3.0,
        help="measured window without coalescing (default 3; 0 skips it)",
    )
    parser.add_argument(
        "--slots", type=int, default=1000, help="slots to spread over (default 1000)"
    )
    parser.add_argument("--capacity", type=int, default=1, help="capacity of each slot (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the callers' choices")
    parser.add_argument(
        "--durable",
        action="store_true",
        help="shards write behind to PostgreSQL with group commit and hold Redis leases "
        "(DATABASE_URL / REDIS_URL, else the embedded ones); the baseline then commits "
        "every command on its own",
    )
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help="with --durable: keep the run's database (slotengine_bench_<run>) for inspection",
    )
    parser.add_argument(
        "--per-command-seconds",
        type=float,
        default=3.0,
        help="with --durable: measured window of the commit-per-command baseline "
        "(default 3; 0 skips it)",
    )
    parser.add_argument(
        "--partial-batches-in-flight",
        type=int,
        default=PARTIAL_BATCHES_IN_FLIGHT_MAX,
        help="batches in flight per shard before a batch that is not full waits "
        f"(default {PARTIAL_BATCHES_IN_FLIGHT_MAX})",
    )


class Window:
    """What one measured window saw: operations, their latencies, their outcomes."""

    def __init__(self, max_ops: int) -> None:
        self.max_ops = max_ops
        self.recording = False
        self.stopping = False
        self.ops = 0
        self.errors = 0
        self.latencies_ns: list[int] = []
        # Keyed by (command type, status or failure code), named only in the summary.
        self.outcomes: collections.Counter[tuple[type, int | str]] = collections.Counter()
        self.full = asyncio.Event()
        self.started_s = 0.0
        self.ended_s = 0.0

    def begin(self) -> None:
        self.recording = True
        self.started_s = time.perf_counter()

    def end(self) -> None:
        if self.recording:
            self.recording = False
            self.ended_s = time.perf_counter()
        self.stopping = True

    def record(self, latency_ns: int, outcome: tuple[type, int | str]) -> None:
        if not self.recording:
            return
        self.ops += 1
        self.latencies_ns.append(latency_ns)
        self.outcomes[outcome] += 1
        if self.ops == self.max_ops:
            self.end()
            self.full.set()

    def summary(self) -> dict[str, Any]:
        elapsed_s = max(self.ended_s - self.started_s, 1e-9)
        latencies = sorted(self.latencies_ns)
        return {
            "ops": self.ops,
            "seconds": round(elapsed_s, 3),
            "ops_per_s": round(self.ops / elapsed_s),
            "p50_ms": _quantile_ms(latencies, 0.50),
            "p99_ms": _quantile_ms(latencies, 0.99),
            "errors": self.errors,
            "outcomes": {
                f"{command_type.__name__}:{answer}": count
                for (command_type, answer), count in self.outcomes.most_common()
            },
        }


def _quantile_ms(sorted_ns: list[int], q: float) -> float | None:
    if not sorted_ns:
        return None
    return round(sorted_ns[int(q * (len(sorted_ns) - 1))] / 1e6, 3)


class Caller:
    """One user's loop. Checks for the end only between cycles, so none is left half done."""

    def __init__(
        self,
        user_id: str,
        client: EngineClient,
        slots: list[str],
        window: Window,
        ids: RequestIds,
        rng: random.Random,
    ) -> None:
        self._user_id = user_id
        self._client = client
        self._slots = slots
        self._window = window
        self._ids = ids
        self._rng = rng

    async def run(self) -> None:
        while not self._window.stopping:
            try:
                await self._cycle()
            except ShellError:
                self._window.errors += 1

    async def _cycle(self) -> None:
        # Flat on purpose: a helper coroutine per operation would cost the callers
        # a measurable share of the driver's time.
        execute = self._client.execute
        record = self._record
        user_id = self._user_id
        ids = self._ids
        slot_id = self._slots[self._rng.randrange(len(self._slots))]
        command: p.AnyCommand = p.Reserve(request_id=ids.next(), slot_id=slot_id, user_id=user_id)
        started_ns = time.perf_counter_ns()
        held = await execute(command)
        record(command, held, started_ns)
        booking_id: str | None = None
        if isinstance(held, p.BookingResult):
            booking_id = held.booking.id
        elif isinstance(held, p.QueueResult):
            command = p.QueuePosition(request_id=ids.next(), slot_id=slot_id, user_id=user_id)
            started_ns = time.perf_counter_ns()
            position = await execute(command)
            record(command, position, started_ns)
            if isinstance(position, p.QueueResult):
                booking_id = position.entry.booking_id
            if booking_id is None:
                command = p.LeaveQueue(request_id=ids.next(), slot_id=slot_id, user_id=user_id)
                started_ns = time.perf_counter_ns()
                record(command, await execute(command), started_ns)
        if booking_id is None:
            return
        command = p.Confirm(request_id=ids.next(), booking_id=booking_id, user_id=user_id)
        started_ns = time.perf_counter_ns()
        confirmed = await execute(command)
        record(command, confirmed, started_ns)
        if isinstance(confirmed, p.BookingResult):
            command = p.Cancel(request_id=ids.next(), booking_id=booking_id, user_id=user_id)
            started_ns = time.perf_counter_ns()
            record(command, await execute(command), started_ns)

    def _record(self, command: p.AnyCommand, result: p.AnyResult, started_ns: int) -> None:
        answer = result.code if isinstance(result, p.Failure) else result.status
        self._window.record(time.perf_counter_ns() - started_ns, (type(command), answer))


async def create_slot(
    client: EngineClient, ids: RequestIds, resource: str, *, capacity: int, domain: str = "default"
) -> str:
    """A new slot of ``resource`` (its shard is the resource's), an hour long, tomorrow."""
    slot_id = make_slot_id(resource, uuid.uuid4().hex)
    start_ms = int(time.time() * 1000) + DAY_MS
    result = await client.execute(
        p.CreateSlot(
            request_id=ids.next(),
            slot_id=slot_id,
            resource_id=resource,
            domain=domain,
            start_ms=start_ms,
            end_ms=start_ms + HOUR_MS,
            capacity=capacity,
        )
    )
    if result.status != 201:
        raise RuntimeError(f"could not create a bench slot: {result}")
    return slot_id


async def _create_slots(client: EngineClient, count: int, capacity: int) -> list[str]:
    ids = RequestIds()
    resources = [f"bench-room-{n}-{uuid.uuid4().hex[:8]}" for n in range(count)]
    return list(
        await asyncio.gather(*(create_slot(client, ids, r, capacity=capacity) for r in resources))
    )


async def drive(
    client: EngineClient,
    slots: list[str],
    *,
    concurrency: int,
    warmup_s: float,
    seconds: float,
    max_ops: int,
    seed: int,
    user_prefix: str,
) -> dict[str, Any]:
    """Run ``concurrency`` callers; measure ``seconds`` (or ``max_ops``) after the warm-up."""
    window = Window(max_ops)
    ids = RequestIds()
    rng = random.Random(seed)
    callers = [
        Caller(f"{user_prefix}-{n}", client, slots, window, ids, random.Random(rng.random()))
        for n in range(concurrency)
    ]
    tasks = [asyncio.create_task(caller.run()) for caller in callers]
    try:
        await asyncio.sleep(warmup_s)
        window.begin()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(window.full.wait(), timeout=seconds)
        window.end()
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    summary = window.summary()
    stats = client.statistics()
    summary["batches"] = stats.batches_sent
    summary["batch_size_mean"] = round(stats.commands_sent / max(stats.batches_sent, 1), 1)
    summary["retries"] = stats.retries + stats.busy_retries
    return summary


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from config.domains import load_policies
    from config.settings import load_settings
    from engine.shell.ray_actor import RayShardTransport

    settings = load_settings()
    policies = load_policies(settings)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    storage = await _bench_storage(settings, prefix, args.shards) if args.durable else None
    transport = await RayShardTransport.connect(
        shard_count=args.shards, policies=policies, name_prefix=prefix, storage=storage
    )
    per_command: dict[str, Any] = {}
    try:
        setup = EngineClient(transport)
        slots = await _create_slots(setup, args.slots, args.capacity)
        batched = await drive(
            EngineClient(transport, partial_batches_in_flight_max=args.partial_batches_in_flight),
            slots,
            concurrency=args.concurrency,
            warmup_s=args.warmup_seconds,
            seconds=args.seconds,
            max_ops=args.max_ops,
            seed=args.seed,
            user_prefix="batched",
        )
        # Before the unbatched run: the writers' figures are the coalesced run's.
        owner_stats = [await transport.owner_statistics(n, 30_000) for n in range(args.shards)]
        unbatched: dict[str, Any] = {}
        if args.unbatched_seconds > 0:
            unbatched = await drive(
                EngineClient(transport, coalesce=False),
                slots,
                concurrency=args.concurrency,
                warmup_s=min(args.warmup_seconds, 0.5),
                seconds=args.unbatched_seconds,
                max_ops=args.max_ops,
                seed=args.seed + 1,
                user_prefix="unbatched",
            )
        shard_stats = [await transport.statistics(n, 30_000) for n in range(args.shards)]
        for shard in range(args.shards):
            await transport.check_invariants(shard, 30_000)
        if storage is not None and args.per_command_seconds > 0:
            per_command = await _per_command_baseline(args, policies, storage, prefix, slots)
    finally:
        from engine.shell.ray_actor import kill_shard_actors

        kill_shard_actors(shard_count=args.shards, name_prefix=prefix)
        kill_shard_actors(shard_count=args.shards, name_prefix=f"{prefix}-percmd")
        if storage is not None and not args.keep_database:
            await _drop_database(storage.database_url)

    result: dict[str, Any] = {
        "scenario": "ray",
        "durable": storage is not None,
        "durability": "relaxed" if storage is not None and storage.relaxed else "commit",
        "shards": args.shards,
        "concurrency": args.concurrency,
        "slots": args.slots,
        "capacity": args.capacity,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ops": batched["ops"],
        "seconds": batched["seconds"],
        "ops_per_s": batched["ops_per_s"],
        "p50_ms": batched["p50_ms"],
        "p99_ms": batched["p99_ms"],
        "errors": batched["errors"],
        "batch_size_mean": batched["batch_size_mean"],
        "partial_batches_in_flight": args.partial_batches_in_flight,
        "retries": batched["retries"],
        "outcomes": batched["outcomes"],
        "shard_commands": [s.commands for s in shard_stats],
        "shard_batches": [s.batches for s in shard_stats],
        # Batches of reads answered without waiting for a commit (what they read was durable).
        "shard_reads_unheld": [s.reads_unheld for s in shard_stats],
        "shard_events": [s.events for s in shard_stats],
        # Inside the shard: decode, apply, events, encode; the rest of a shard's time is Ray's.
        "shard_apply_us_per_op": round(
            sum(s.apply_ns for s in shard_stats)
            / max(sum(s.commands for s in shard_stats), 1)
            / 1e3,
            1,
        ),
    }
    writers = [o.writer for o in owner_stats if o is not None and o.writer is not None]
    if writers:
        flushes = sum(w.flushes for w in writers)
        result["flushes"] = flushes
        result["events_per_flush"] = round(
            sum(w.events_written for w in writers) / max(flushes, 1), 1
        )
        result["commit_ms_mean"] = round(
            sum(w.commit_ns_total for w in writers) / max(flushes, 1) / 1e6, 2
        )
    if per_command:
        result.update(
            {
                "per_command_ops": per_command["ops"],
                "per_command_ops_per_s": per_command["ops_per_s"],
                "per_command_p50_ms": per_command["p50_ms"],
                "per_command_p99_ms": per_command["p99_ms"],
                "group_commit_speedup": round(
                    batched["ops_per_s"] / max(per_command["ops_per_s"], 1), 1
                ),
            }
        )
    if unbatched:
        result.update(
            {
                "unbatched_ops": unbatched["ops"],
                "unbatched_seconds": unbatched["seconds"],
                "unbatched_ops_per_s": unbatched["ops_per_s"],
                "unbatched_p50_ms": unbatched["p50_ms"],
                "unbatched_p99_ms": unbatched["p99_ms"],
                "unbatched_errors": unbatched["errors"],
                "speedup": round(batched["ops_per_s"] / max(unbatched["ops_per_s"], 1), 1),
            }
        )
    return result


# Each durable run writes to a database of its own on the configured server,
# named after the run and dropped at its end (--keep-database keeps it).


async def _bench_storage(
    settings: Any, prefix: str, shards: int, partitions: int | None = None
) -> Any:
    """A fresh database of the bench's own on the configured (or embedded) server,
    with ``partitions`` partitions (default: one per shard, the clients' default
    routing, with nothing to look up)."""
    import asyncpg

    from bench._database import create_run_database
    from engine.shell.owner import StorageSettings
    from persistence.migrate import migrate_url
    from persistence.partitioning import establish_partitions
    from persistence.services import resolve_services

    # In a thread: starting an embedded service runs an event loop of its own.
    database_url, redis_url = await asyncio.to_thread(
        resolve_services, settings.database_url, settings.redis_url, settings.data_dir
    )
    bench_url = await create_run_database(database_url, prefix)
    await migrate_url(bench_url)
    connection = await asyncpg.connect(bench_url)
    try:
        await establish_partitions(connection, partitions=partitions or shards, shard_count=shards)
    finally:
        await connection.close()
    return StorageSettings(
        database_url=bench_url,
        redis_url=redis_url,
        relaxed=settings.durability == "relaxed",
        namespace=f"slotengine-{prefix}",
        partitions=partitions or shards,
    )


async def _drop_database(url: str) -> None:
    from bench._database import drop_database

    await drop_database(url)


async def _per_command_baseline(
    args: argparse.Namespace, policies: Any, storage: Any, prefix: str, slots: list[str]
) -> dict[str, Any]:
    """The same load, one command per call and one transaction per command."""
    import msgspec

    from engine.shell.ray_actor import RayShardTransport

    transport = await RayShardTransport.connect(
        shard_count=args.shards,
        policies=policies,
        name_prefix=f"{prefix}-percmd",
        storage=msgspec.structs.replace(
            storage, group_commit=False, namespace=f"{storage.namespace}-percmd"
        ),
    )
    return await drive(
        EngineClient(transport, coalesce=False),
        slots,
        concurrency=args.concurrency,
        warmup_s=min(args.warmup_seconds, 0.5),
        seconds=args.per_command_seconds,
        max_ops=args.max_ops,
        seed=args.seed + 2,
        user_prefix="per-command",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import uvloop

    from engine.shell.gc_tuning import tune_gc

    # The callers allocate per operation like a shard does; the same collector settings.
    tune_gc()
    address = os.environ.get("RAY_ADDRESS")
    temp_dir = None
    if address:
        ray.init(address=address, namespace="slotengine-bench", log_to_driver=False)
    else:
        temp_dir = tempfile.mkdtemp(prefix="ray-bench-")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=temp_dir,
            namespace="slotengine-bench",
            log_to_driver=False,
        )
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(measure(args))
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
