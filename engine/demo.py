"""``slotengine demo``: a short scripted scenario, printed as tables.

A burst of users reserves one slot at the same instant through the request
coalescer: the first ``capacity`` get holds, the next ones queue in order, the
rest find the queue full. Some holders confirm, one lets the hold lapse, and
the real timer wheel expires it and offers the place to the head of the queue.
It runs the same shard code as the server, on the real clock, with short TTLs
so the expiry is seen within seconds.

It must never need PostgreSQL, Redis or a server: its shards keep their state
in memory (in this process, or as Ray actors with ``--engine ray``).
"""

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from engine.core import protocol as p
from engine.core.policy import DomainPolicy
from engine.core.records import QueueView
from engine.core.routing import make_slot_id
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.inproc import InProcessHost
from engine.shell.transport import ShardTransport

HOUR_MS = 3_600_000
# How often the demo looks at a user's queue entry while waiting for an offer.
POLL_INTERVAL_S = 0.05
# The Ray namespace of the demo's shard actors (``--engine ray``).
DEMO_NAMESPACE = "slotengine-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=12, help="users in the burst [12]")
    parser.add_argument("--capacity", type=int, default=3, help="the slot's capacity [3]")
    parser.add_argument("--queue-max", type=int, default=6, help="the slot's queue size [6]")
    parser.add_argument(
        "--hold-ttl-seconds", type=int, default=2, help="hold and claim TTL for the demo [2]"
    )
    parser.add_argument(
        "--engine",
        choices=("inproc", "ray"),
        default="inproc",
        help="run the shards in this process or as Ray actors [inproc]",
    )
    parser.add_argument("--shards", type=int, default=2, help="shard count [2]")


def demo_policy(args: argparse.Namespace) -> DomainPolicy:
    ttl_ms = args.hold_ttl_seconds * 1000
    return DomainPolicy(
        name="default",
        hold_ttl_ms=ttl_ms,
        claim_ttl_ms=ttl_ms,
        queue_enabled=True,
        queue_size_max=args.queue_max,
        queue_inactivity_ms=4 * HOUR_MS,
        advance_booking_ms=365 * 24 * HOUR_MS,
        cancel_allowed_until_ms=0,
        refund_percentage=100,
    )


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells[1:]]
    return "\n".join(lines) + "\n"


class Scenario:
    def __init__(self, client: EngineClient, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.ids = RequestIds()
        self.started = time.monotonic()

    def clock(self) -> str:
        return f"{time.monotonic() - self.started:5.2f}s"

    async def run(self, command_type: Any, **fields: Any) -> Any:
        return await self.client.execute(command_type(request_id=self.ids.next(), **fields))

    async def play(self) -> None:
        args = self.args
        now_ms = time.time_ns() // 1_000_000
        slot_id = make_slot_id("dr-smith", uuid.uuid4().hex)
        created = await self.run(
            p.CreateSlot,
            slot_id=slot_id,
            resource_id="dr-smith",
            domain="default",
            start_ms=now_ms + 2 * HOUR_MS,
            end_ms=now_ms + 2 * HOUR_MS + 30 * 60_000,
            capacity=args.capacity,
        )
        print(
            f"[{self.clock()}] slot {created.slot.id} for dr-smith, capacity {args.capacity},"
            f" queue {args.queue_max}, hold TTL {args.hold_ttl_seconds}s\n"
        )

        users = [f"user-{i:02d}" for i in range(1, args.users + 1)]
        results = await asyncio.gather(
            *(self.run(p.Reserve, slot_id=slot_id, user_id=u) for u in users)
        )
        rows: list[tuple[str, int, str, str | None, int | None]] = []
        holds: dict[str, str] = {}
        for user, result in zip(users, results, strict=True):
            if isinstance(result, p.BookingResult):
                holds[user] = result.booking.id
                rows.append((user, result.status, "hold", result.booking.status, None))
            elif isinstance(result, p.QueueResult):
                rows.append((user, result.status, "queued", "WAITING", result.entry.position))
            else:
                rows.append((user, result.status, result.code, None, None))
        print(
            table(
                f"[{self.clock()}] {len(users)} users reserve at once",
                ("user", "http", "outcome", "status", "position"),
                rows,
            )
        )

        holders = list(holds)
        lapsing = holders[-1]
        confirms = []
        for user in holders[:-1]:
            confirmed = await self.run(p.Confirm, booking_id=holds[user], user_id=user)
            confirms.append((user, confirmed.status, confirmed.booking.status))
        confirms.append((lapsing, "-", "lets the hold lapse"))
        print(table(f"[{self.clock()}] holders decide", ("user", "http", "booking"), confirms))

        queued = [row[0] for row in rows if row[2] == "queued"]
        if not queued:
            return
        head = queued[0]
        print(f"[{self.clock()}] waiting for {lapsing}'s hold to expire ...")
        offer = await self.wait_for_offer(slot_id, head)
        lapsed = await self.run(p.GetBooking, booking_id=holds[lapsing], user_id=lapsing)
        print(
            f"[{self.clock()}] {lapsing}'s hold is {lapsed.booking.status};"
            f" {head} was offered hold {offer.booking_id}\n"
        )
        positions = []
        for user in queued:
            entry = (await self.run(p.QueuePosition, slot_id=slot_id, user_id=user)).entry
            positions.append(
                (
                    user,
                    entry.status,
                    entry.position,
                    entry.total_in_queue,
                    entry.estimated_wait_time,
                )
            )
        print(
            table(
                f"[{self.clock()}] the queue after the offer",
                ("user", "status", "position", "in queue", "estimated wait"),
                positions,
            )
        )
        claimed = await self.run(p.Confirm, booking_id=offer.booking_id, user_id=head)
        entry = (await self.run(p.QueuePosition, slot_id=slot_id, user_id=head)).entry
        slot = (await self.run(p.GetSlot, slot_id=slot_id)).slot
        print(
            f"[{self.clock()}] {head} claims the offer: booking {claimed.booking.status},"
            f" queue entry {entry.status}"
        )
        print(
            table(
                f"\n[{self.clock()}] the slot now",
                ("status", "capacity", "confirmed", "held", "available", "queue"),
                [
                    (
                        slot.status,
                        slot.capacity,
                        slot.current_bookings,
                        slot.held_count,
                        slot.available,
                        slot.queue_length,
                    )
                ],
            )
        )

    async def wait_for_offer(self, slot_id: str, user: str) -> QueueView:
        deadline = time.monotonic() + self.args.hold_ttl_seconds + 10
        while time.monotonic() < deadline:
            entry: QueueView = (
                await self.run(p.QueuePosition, slot_id=slot_id, user_id=user)
            ).entry
            if entry.status == "NOTIFIED":
                return entry
            await asyncio.sleep(POLL_INTERVAL_S)
        raise SystemExit(f"no offer reached {user} in time")


async def _run(args: argparse.Namespace) -> None:
    policies = {"default": demo_policy(args)}
    transport: ShardTransport
    if args.engine == "ray":
        import ray

        from engine.shell.ray_actor import RayShardTransport, kill_shard_actors

        ray.init(
            # A Ray of its own, never one already on the machine (another
            # deployment's, a test run's), unless RAY_ADDRESS names one to use.
            address=os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            log_to_driver=False,
            namespace=DEMO_NAMESPACE,
        )
        transport = await RayShardTransport.connect(shard_count=args.shards, policies=policies)
        try:
            await Scenario(EngineClient(transport), args).play()
        finally:
            kill_shard_actors(shard_count=args.shards)
            ray.shutdown()
        return
    host = InProcessHost(shard_count=args.shards, policies=policies)
    try:
        await Scenario(EngineClient(host), args).play()
    finally:
        host.close()


def main(args: argparse.Namespace) -> int:
    if args.capacity < 1 or args.users < 1 or args.queue_max < 1 or args.hold_ttl_seconds < 1:
        raise SystemExit(
            "demo: --users, --capacity, --queue-max and --hold-ttl-seconds must be >= 1"
        )
    asyncio.run(_run(args))
    return 0
