"""PostgreSQL's CPU per command of the write-behind flushes, optionally two schemas side by side.

A shard core plays a ``bench ray``-like mix (users reserve, confirm, cancel,
ask their queue position or leave, over many slots of capacity one), and its
events are folded into flushes exactly as the writer folds them. Those
flushes are then written with ``write_flush`` into a fresh database of the
run's own, one after another on one connection, and the database backend's
CPU time (from ``/proc``, so PostgreSQL must run on this machine) is divided
by the commands: what the server spends per command, with no Ray, gateway or
network in the way. The writer's own CPU per command (building rows,
encoding) is reported beside it.

``--compare DIR`` replays the same flushes into a second database migrated
from the SQL files in DIR, alternating flush by flush: both schemas then see
the same machine at the same moments, so their ratio holds even while the
machine's speed drifts (a replay into two copies of one schema agrees within
about 1%).

It must never write to the configured deployment's own database: each schema
gets a database of the run's own.
"""

import argparse
import asyncio
import itertools
import os
import random
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.core import DAY_MS, START_MS, bench_policies, replayable_core
from engine.core import protocol as p
from engine.core.routing import make_slot_id
from persistence.rows import FlushRows

HOUR_MS = 3_600_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=int, default=60_000, help="commands (60000)")
    parser.add_argument("--slots", type=int, default=1_000, help="slots of capacity 1 (1000)")
    parser.add_argument("--users", type=int, default=1_000, help="users (1000)")
    parser.add_argument("--batch", type=int, default=180, help="commands per flush (180)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the mix (1)")
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="also replay into a schema migrated from the SQL files in DIR, alternating",
    )
    parser.add_argument(
        "--keep-database", action="store_true", help="keep the run's databases for inspection"
    )


def make_flushes(args: argparse.Namespace) -> tuple[list[FlushRows], int]:
    """The flushes of a deterministic mix, and how many commands they carry."""
    core = replayable_core(
        bench_policies(hold_ttl_ms=120_000, claim_ttl_ms=60_000, queue_size_max=100)
    )
    rng = random.Random(args.seed)
    request_ids = (f"r{n}" for n in itertools.count())
    flushes: list[FlushRows] = []

    def fold() -> None:
        rows = FlushRows(0)
        events = core.drain_events()
        origins, refused = core.drain_audit()
        rows.add(events, origins)
        rows.remember(*core.drain_remembered(), refused)
        flushes.append(rows)

    slots = []
    for n in range(args.slots):
        slot_id = make_slot_id(f"room-{n}", "flush")
        core.execute(
            p.CreateSlot(
                request_id=next(request_ids),
                slot_id=slot_id,
                resource_id=f"room-{n}",
                domain="default",
                start_ms=START_MS + DAY_MS,
                end_ms=START_MS + DAY_MS + HOUR_MS,
                capacity=1,
            ),
            START_MS,
        )
        slots.append(slot_id)
    fold()
    # user -> (what they hold: "held", "booked" or "queued", the slot, the booking)
    users: dict[str, tuple[str, str, str]] = {}
    now_ms = START_MS
    commands = 0
    while commands < args.ops:
        now_ms += 10
        for _ in range(args.batch):
            commands += 1
            user = f"user-{rng.randrange(args.users)}"
            state = users.pop(user, None)
            rid = next(request_ids)
            if state is None:
                slot_id = slots[rng.randrange(len(slots))]
                result = core.execute(
                    p.Reserve(request_id=rid, slot_id=slot_id, user_id=user), now_ms
                )
                if isinstance(result, p.BookingResult):
                    users[user] = ("held", slot_id, result.booking.id)
                elif isinstance(result, p.QueueResult):
                    users[user] = ("queued", slot_id, "")
            elif state[0] == "queued":
                asked = p.QueuePosition(request_id=rid, slot_id=state[1], user_id=user)
                result = core.execute(asked, now_ms)
                if isinstance(result, p.QueueResult) and result.entry.booking_id:
                    users[user] = ("held", state[1], result.entry.booking_id)
                else:
                    left = p.LeaveQueue(
                        request_id=next(request_ids), slot_id=state[1], user_id=user
                    )
                    core.execute(left, now_ms)
            elif state[0] == "held":
                confirm = p.Confirm(request_id=rid, booking_id=state[2], user_id=user)
                if isinstance(core.execute(confirm, now_ms), p.BookingResult):
                    users[user] = ("booked", state[1], state[2])
            else:
                core.execute(p.Cancel(request_id=rid, booking_id=state[2], user_id=user), now_ms)
        fold()
    return flushes, commands


def _backend_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _replay(
    args: argparse.Namespace, flushes: list[FlushRows], commands: int
) -> dict[str, Any]:
    from bench._database import create_run_database, drop_database
    from config.settings import load_settings
    from persistence.migrate import MIGRATIONS_DIR, migrate
    from persistence.partitioning import ensure_partition_map
    from persistence.services import resolve_services
    from persistence.store import Codecs, write_flush

    settings = load_settings()
    server_url, _ = await asyncio.to_thread(
        resolve_services, settings.database_url, settings.redis_url, settings.data_dir
    )
    schemas = {"schema": MIGRATIONS_DIR}
    if args.compare is not None:
        schemas["compared"] = args.compare
    run = f"flush_{os.getpid()}_{int(time.time())}"
    urls: dict[str, str] = {}
    connections: dict[str, asyncpg.Connection] = {}
    try:
        for name, directory in schemas.items():
            urls[name] = await create_run_database(server_url, f"{run}_{name}")
            connection = await asyncpg.connect(urls[name])
            connections[name] = connection
            await migrate(connection, directory)
            await connection.execute(
                "INSERT INTO shard_fences (shard, token, owner) VALUES (0, 1, 'bench')"
            )
            if await connection.fetchval("SELECT to_regclass('partition_map') IS NOT NULL"):
                await ensure_partition_map(connection, partitions=None, shard_count=1)
        pids = {
            name: await c.fetchval("SELECT pg_backend_pid()") for name, c in connections.items()
        }
        codecs = Codecs()
        writer_s = dict.fromkeys(connections, 0.0)
        for connection in connections.values():
            await write_flush(connection, flushes[0], 1, "bench", codecs)  # the slots, untimed
        before = {name: _backend_cpu_s(pid) for name, pid in pids.items()}
        for rows in flushes[1:]:
            for name, connection in connections.items():
                started = time.thread_time()
                await write_flush(connection, rows, 1, "bench", codecs)
                writer_s[name] += time.thread_time() - started
        result: dict[str, Any] = {}
        for name, pid in pids.items():
            result[f"{name}_postgres_us_per_command"] = round(
                (_backend_cpu_s(pid) - before[name]) / commands * 1e6, 1
            )
            result[f"{name}_writer_us_per_command"] = round(writer_s[name] / commands * 1e6, 1)
        if "compared" in connections:
            result["postgres_ratio"] = round(
                result["compared_postgres_us_per_command"]
                / max(result["schema_postgres_us_per_command"], 1e-9),
                3,
            )
        return result
    finally:
        for connection in connections.values():
            await connection.close()
        if not args.keep_database:
            for url in urls.values():
                await drop_database(url)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    flushes, commands = make_flushes(args)
    result = uvloop.run(_replay(args, flushes, commands))
    return {
        "scenario": "flush",
        "commands": commands,
        "flushes": len(flushes) - 1,
        "events": sum(rows.events for rows in flushes[1:]),
        "compare": str(args.compare) if args.compare is not None else None,
        **result,
    }
