"""Operations per second of the pure shard core on a reserve/confirm/cancel/expire/queue mix.

One ``ShardCore`` holds many small slots. Users reserve; most holds are
confirmed, some are abandoned and expire (their place is offered to the
slot's waiting queue), some bookings are cancelled (another offer), queued
users ask their position, answer offers or leave. Commands arrive in batches
that share one reading of a simulated clock, like the actor shell applies
them, and the events and the remembered outcomes are drained after every
batch, like the shell hands them off to storage.

The command list is generated first, untimed, by driving a scout core (so
confirms and cancels name real booking ids); the measured runs replay it on
fresh cores with the same deterministic ids and must give the same results.
Only ``execute`` and the drains (``drain_events``, ``drain_remembered``,
``drain_audit``) are timed. It never touches the
network, the disk or an event loop.
"""

import argparse
import collections
import cProfile
import gc
import io
import itertools
import platform
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench._machine import compiled_core
from engine.core import protocol as p
from engine.core.policy import DomainPolicy
from engine.core.routing import make_slot_id
from engine.core.shard import ShardCore

TARGET_OPS_PER_S = 200_000
START_MS = 1_800_000_000_000
SECOND_MS = 1_000
DAY_MS = 86_400_000

# (weight, what the simulated user does)
MIX = (
    (38, "reserve"),
    (24, "confirm"),
    (8, "cancel"),
    (12, "position"),
    (5, "join"),
    (3, "leave"),
    (6, "get_booking"),
    (4, "get_slot"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=int, default=300_000, help="commands per run (300000)")
    parser.add_argument("--slots", type=int, default=5_000, help="slots on the shard (5000)")
    parser.add_argument("--capacity", type=int, default=4, help="capacity of each slot (4)")
    parser.add_argument("--users", type=int, default=20_000, help="distinct users (20000)")
    parser.add_argument(
        "--queue-max", type=int, default=10, help="waiting queue size per slot (10)"
    )
    parser.add_argument("--batch", type=int, default=256, help="commands per batch (256)")
    parser.add_argument(
        "--batch-ms",
        type=int,
        default=100,
        help="simulated time between batches, so holds lapse (100)",
    )
    parser.add_argument("--hold-ttl-s", type=int, default=20, help="hold TTL (20 s)")
    parser.add_argument("--claim-ttl-s", type=int, default=10, help="queue offer TTL (10 s)")
    parser.add_argument(
        "--abandon", type=float, default=0.25, help="share of holds never confirmed (0.25)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="measured runs; best reported (3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated mix (1)")
    parser.add_argument(
        "--gc",
        choices=("actor", "default"),
        default="actor",
        help="the garbage collector as a shard actor tunes it, or CPython's default (actor)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also run once under cProfile and report the N hottest functions",
    )


def bench_policies(
    *, hold_ttl_ms: int, claim_ttl_ms: int, queue_size_max: int
) -> dict[str, DomainPolicy]:
    """The one domain the core benches run: a waiting queue, nothing else in the way."""
    return {
        "default": DomainPolicy(
            name="default",
            hold_ttl_ms=hold_ttl_ms,
            claim_ttl_ms=claim_ttl_ms,
            queue_enabled=True,
            queue_size_max=queue_size_max,
            queue_inactivity_ms=4 * 3_600 * SECOND_MS,
            advance_booking_ms=365 * DAY_MS,
            cancel_allowed_until_ms=0,
            refund_percentage=100,
        )
    }


def replayable_core(policies: dict[str, DomainPolicy], now_ms: int = START_MS) -> ShardCore:
    """A core whose ids are the same in every run, so that runs answer alike."""
    return ShardCore(shard_id=0, shard_count=1, policies=policies, now_ms=now_ms, id_seed="replay")


def _new_core(args: argparse.Namespace) -> ShardCore:
    return replayable_core(
        bench_policies(
            hold_ttl_ms=args.hold_ttl_s * SECOND_MS,
            claim_ttl_ms=args.claim_ttl_s * SECOND_MS,
            queue_size_max=args.queue_max,
        )
    )


Batches = list[tuple[int, list[p.AnyCommand]]]


class _Scout:
    """Generates the workload by playing it against a core of its own."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.core = _new_core(args)
        self.request_ids = (f"q{n}" for n in itertools.count(1))
        self.users = [f"user-{n}" for n in range(args.users)]
        self.slot_ids: list[str] = []
        self.holds: list[tuple[str, str]] = []
        self.bookings: list[tuple[str, str]] = []
        self.confirmed: list[tuple[str, str]] = []
        self.queued: list[tuple[str, str]] = []
        self.mix: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        # Every command's outcome, in order: what each measured run must answer too.
        self.answers: list[str] = []
        self.setup: list[p.AnyCommand] = []

    def create_slots(self) -> None:
        args = self.args
        for n in range(args.slots):
            resource = f"resource-{n % max(1, args.slots // 4)}"
            slot_id = make_slot_id(resource, f"{n}")
            start_ms = START_MS + DAY_MS + (n // max(1, args.slots // 4)) * 3_600 * SECOND_MS
            command = p.CreateSlot(
                request_id=next(self.request_ids),
                slot_id=slot_id,
                resource_id=resource,
                domain="default",
                start_ms=start_ms,
                end_ms=start_ms + 1_800 * SECOND_MS,
                capacity=args.capacity,
            )
            result = self.core.execute(command, START_MS)
            if not isinstance(result, p.SlotResult):
                raise RuntimeError(f"bench setup failed: {result}")
            self.setup.append(command)
            self.slot_ids.append(slot_id)
        self.core.drain_events()

    def generate(self) -> Batches:
        args = self.args
        names = [name for _, name in MIX]
        weights = [weight for weight, _ in MIX]
        choices = self.rng.choices(names, weights, k=args.ops)
        actions: dict[str, Callable[[], p.AnyCommand]] = {
            name: getattr(self, name) for name in names
        }
        batches: Batches = []
        now_ms = START_MS
        for offset in range(0, args.ops, args.batch):
            now_ms += args.batch_ms
            batch = [actions[name]() for name in choices[offset : offset + args.batch]]
            for command in batch:
                self.mix[type(command).__name__] += 1
                self.learn(command, self.core.execute(command, now_ms))
            self.learn_offers(self.core.drain_events())
            self.core.drain_audit()
            batches.append((now_ms, batch))
        return batches

    # -- what users do -----------------------------------------------------------

    def _take(self, items: list[tuple[str, str]]) -> tuple[str, str] | None:
        if not items:
            return None
        index = self.rng.randrange(len(items))
        items[index], items[-1] = items[-1], items[index]
        return items.pop()

    def reserve(self) -> p.AnyCommand:
        return p.Reserve(
            request_id=next(self.request_ids),
            slot_id=self.rng.choice(self.slot_ids),
            user_id=self.rng.choice(self.users),
        )

    def confirm(self) -> p.AnyCommand:
        hold = self._take(self.holds)
        while hold is not None and self.rng.random() < self.args.abandon:
            hold = self._take(self.holds)  # walked away: that hold will expire
        if hold is None:
            return self.reserve()
        booking_id, user_id = hold
        return p.Confirm(request_id=next(self.request_ids), booking_id=booking_id, user_id=user_id)

    def cancel(self) -> p.AnyCommand:
        booking = self._take(self.confirmed)
        if booking is None:
            return self.reserve()
        booking_id, user_id = booking
        return p.Cancel(
            request_id=next(self.request_ids),
            booking_id=booking_id,
            user_id=user_id,
            reason="plans changed",
        )

    def position(self) -> p.AnyCommand:
        if not self.queued:
            return self.get_slot()
        slot_id, user_id = self.queued[self.rng.randrange(len(self.queued))]
        return p.QueuePosition(request_id=next(self.request_ids), slot_id=slot_id, user_id=user_id)

    def join(self) -> p.AnyCommand:
        return p.JoinQueue(
            request_id=next(self.request_ids),
            slot_id=self.rng.choice(self.slot_ids),
            user_id=self.rng.choice(self.users),
        )

    def leave(self) -> p.AnyCommand:
        entry = self._take(self.queued)
        if entry is None:
            return self.get_slot()
        slot_id, user_id = entry
        return p.LeaveQueue(request_id=next(self.request_ids), slot_id=slot_id, user_id=user_id)

    def get_booking(self) -> p.AnyCommand:
        if not self.bookings:
            return self.get_slot()
        booking_id, user_id = self.bookings[self.rng.randrange(len(self.bookings))]
        return p.GetBooking(
            request_id=next(self.request_ids), booking_id=booking_id, user_id=user_id
        )

    def get_slot(self) -> p.AnyCommand:
        return p.GetSlot(request_id=next(self.request_ids), slot_id=self.rng.choice(self.slot_ids))

    # -- what the answers teach ----------------------------------------------------

    def learn(self, command: p.AnyCommand, result: p.AnyResult) -> None:
        outcome = _outcome(command, result)
        self.outcomes[outcome] += 1
        self.answers.append(outcome)
        if isinstance(result, p.BookingResult):
            booking = result.booking
            pair = (booking.id, booking.user_id)
            if isinstance(command, p.Reserve) and result.status == 201:
                self.holds.append(pair)
                self.bookings.append(pair)
            elif isinstance(command, p.Confirm):
                self.confirmed.append(pair)
        elif isinstance(result, p.QueueResult) and result.status in (201, 202):
            self.queued.append((result.entry.slot_id, result.entry.user_id))
        if len(self.bookings) > 50_000:
            del self.bookings[:25_000]

    def learn_offers(self, events: list[p.AnyEvent]) -> None:
        for event in events:
            if isinstance(event, p.BookingChanged) and event.trigger == "queue_offer":
                pair = (event.booking.id, event.booking.user_id)
                self.holds.append(pair)
                self.bookings.append(pair)


def _outcome(command: p.AnyCommand, result: p.AnyResult) -> str:
    name = type(command).__name__
    if isinstance(result, p.Failure):
        return f"{name} {result.code}"
    return f"{name} {result.status}"


def _prepared_core(args: argparse.Namespace, setup: list[p.AnyCommand]) -> ShardCore:
    core = _new_core(args)
    for command in setup:
        core.execute(command, START_MS)
    core.drain_events()
    return core


def _replay(core: ShardCore, batches: Batches) -> tuple[list[float], float, int, list[p.AnyResult]]:
    """The measured loop: execute every batch, drain its events.

    Returns the wall seconds each quarter of the batches took, the CPU seconds
    of the whole loop (what other processes on the machine cannot inflate),
    the events drained and the results.
    """
    execute = core.execute
    drain = core.drain_events
    drain_remembered = core.drain_remembered
    drain_audit = core.drain_audit
    results: list[p.AnyResult] = []
    keep = results.append
    events = 0
    ends = _quarter_ends(batches)
    cpu_started = time.process_time()
    marks = [time.perf_counter()]
    for index, (now_ms, batch) in enumerate(batches, 1):
        for command in batch:
            keep(execute(command, now_ms))
        events += len(drain())
        drain_remembered()
        drain_audit()
        if index in ends:
            marks.append(time.perf_counter())
    cpu_s = time.process_time() - cpu_started
    return [b - a for a, b in itertools.pairwise(marks)], cpu_s, events, results


def run(args: argparse.Namespace) -> dict[str, Any]:
    generating = time.perf_counter()
    scout = _Scout(args)
    scout.create_slots()
    batches = scout.generate()
    generate_s = time.perf_counter() - generating

    seconds: list[float] = []
    cpu_seconds: list[float] = []
    quarters: list[float] = []
    events = 0
    stats: Any = None
    for _ in range(max(1, args.repeat)):
        core = _prepared_core(args, scout.setup)
        gc.collect()
        thresholds = gc.get_threshold()
        if args.gc == "actor":
            # The collector as a shard actor runs it (after loading its state).
            from engine.shell.gc_tuning import tune_gc

            tune_gc()
        try:
            parts, cpu_s, events, results = _replay(core, batches)
        finally:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
        elapsed = sum(parts)
        if not seconds or elapsed < min(seconds):
            quarters = parts
        seconds.append(elapsed)
        cpu_seconds.append(cpu_s)
        got = [_outcome(c, r) for c, r in zip(_commands(batches), results, strict=True)]
        if got != scout.answers:
            raise RuntimeError("a measured run answered differently from the scout run")
        core.check_invariants(batches[-1][0])
        stats = core.statistics()

    ops = sum(len(batch) for _, batch in batches)
    best_s = min(seconds)
    quarter_ops = _quarter_ops(batches)
    summary: dict[str, Any] = {
        "scenario": "core",
        "gc": args.gc,
        "compiled": compiled_core(),
        "ops": ops,
        "seconds": round(best_s, 4),
        "ops_per_s": round(ops / best_s),
        "ops_per_s_median": round(ops / statistics.median(seconds)),
        # Per second of this process's CPU time: steadier on a shared machine.
        "ops_per_cpu_s": round(ops / min(cpu_seconds)),
        "runs_s": [round(s, 4) for s in seconds],
        # Throughput per quarter of the best run: the state (and the memory of
        # request outcomes) grows as the run goes on.
        "ops_per_s_by_quarter": [
            round(n / part) for n, part in zip(quarter_ops, quarters, strict=True)
        ],
        "target_ops_per_s": TARGET_OPS_PER_S,
        "meets_target": ops / best_s >= TARGET_OPS_PER_S,
        "mix": dict(scout.mix.most_common()),
        "outcomes": dict(scout.outcomes.most_common()),
        "events": events,
        "expirations": stats.expirations_total,
        "offers": stats.offers_total,
        "slots": args.slots,
        "capacity": args.capacity,
        "users": args.users,
        "batch": args.batch,
        "batches": len(batches),
        "simulated_s": round((batches[-1][0] - START_MS) / 1_000, 1),
        "generate_s": round(generate_s, 2),
        "python": platform.python_version(),
    }
    if args.profile:
        summary["profile"] = _profile(args, scout.setup, batches, args.profile)
    return summary


def _quarter_ends(batches: Batches) -> set[int]:
    """The 1-based batch numbers that close each quarter of the run."""
    return {max(1, len(batches) * k // 4) for k in range(1, 5)}


def _quarter_ops(batches: Batches) -> list[int]:
    """Commands in each stretch that ``_replay`` times separately."""
    ends = _quarter_ends(batches)
    counts: list[int] = []
    pending = 0
    for index, (_, batch) in enumerate(batches, 1):
        pending += len(batch)
        if index in ends:
            counts.append(pending)
            pending = 0
    return counts


def _commands(batches: Batches) -> list[p.AnyCommand]:
    return [command for _, batch in batches for command in batch]


def _profile(
    args: argparse.Namespace, setup: list[p.AnyCommand], batches: Batches, top: int
) -> list[dict[str, Any]]:
    core = _prepared_core(args, setup)
    profiler = cProfile.Profile()
    profiler.enable()
    _replay(core, batches)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
    stats.print_stats(top)
    print(stream.getvalue(), file=sys.stderr)
    rows = []
    for (filename, line, function), (_, calls, tottime, cumtime, _) in sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda item: item[1][2],
        reverse=True,
    )[:top]:
        rows.append(
            {
                "function": f"{filename.rsplit('/', 1)[-1]}:{line}({function})",
                "calls": calls,
                "tottime_s": round(tottime, 4),
                "cumtime_s": round(cumtime, 4),
            }
        )
    return rows
