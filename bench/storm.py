"""A reservation storm over HTTP: 1,000 users reserve one slot of capacity 100 at once.

Each round creates a fresh slot; every user first opens its connection and
reads the slot (as a page would), then all reserve in the same instant. The
contract decides every answer: the first ``capacity`` get a hold (201), the
next ``queue max`` a numbered place in the queue (202, places 1..N each once),
the rest ``QueueFull`` (409); anything else counts as an error. Latency is
measured per request from the common start to the answer. Afterwards the
database is checked (no slot over capacity, no double booking, every
acknowledged hold present).

Target on the 2-core machine: 100 holds, 100 queued, 800 QueueFull, 0 errors,
p99 <= 200 ms.

It must never drive a server off this machine, nor leave the database of the
run behind unless ``--keep-database`` asks.
"""

import argparse
import asyncio
import secrets
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench import _http as h
from bench._progress import progress_bar
from bench._report import add_report_argument, write_report
from bench._wire import Connection, WireError

P99_TARGET_MS = 200.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    h.add_server_arguments(parser)
    parser.add_argument("--users", type=int, default=1000, help="users per storm (default 1000)")
    parser.add_argument("--capacity", type=int, default=100, help="slot capacity (default 100)")
    parser.add_argument(
        "--queue-max", type=int, default=100, help="the server's queue size (default 100)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="storms, each on a new slot")
    add_report_argument(parser)


async def _storm(
    session: aiohttp.ClientSession, target: h.Target, args: argparse.Namespace, round_no: int
) -> dict[str, Any]:
    slot_id = await h.create_slot(
        session,
        target,
        f"storm-{secrets.token_hex(4)}",
        args.capacity,
        h.tomorrow() + timedelta(hours=round_no),
    )
    users = [f"storm{round_no}-{n}" for n in range(args.users)]
    tokens = {user: target.token(user).encode() for user in users}
    address = urlsplit(target.base)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    go = asyncio.Event()
    all_ready = asyncio.Event()
    ready = 0
    warmup_errors: list[str] = []
    latencies = h.Latencies()
    ledger = h.Ledger()
    places: list[int] = []
    started = 0.0

    async def user(name: str) -> None:
        nonlocal ready
        connection = Connection(host, port)
        try:
            # Looking at the slot first opens the connection the reserve then reuses.
            await connection.request("GET", f"/api/slots/{slot_id}", tokens[name])
        except (WireError, OSError, ValueError) as error:
            warmup_errors.append(repr(error))
        ready += 1
        if ready == len(users):
            all_ready.set()
        await go.wait()
        try:
            status, body = await connection.request(
                "POST", "/api/bookings/reserve", tokens[name], {"slotId": slot_id}
            )
            outcome = h.outcome_of(status, body)
        except (WireError, OSError, ValueError):
            outcome, body = "error", None
        finally:
            connection.close()
        now = time.perf_counter()
        latencies.record("reserve", int((now - started) * 1e9), outcome, now - started)
        progress.update()
        if outcome == "error" or outcome.startswith("5"):
            progress.set_postfix(errors=latencies.errors, refresh=False)
        if outcome in ("201", "200") and body is not None:
            ledger.saw(body["booking"])
        elif outcome == "202" and body is not None:
            places.append(body["queue"]["position"])

    progress = progress_bar(
        total=len(users), desc=f"storm {round_no + 1}", unit="req", mininterval=0.2
    )
    tasks = [asyncio.create_task(user(name)) for name in users]
    # Everyone has read the slot (their connections are open) before the storm.
    await all_ready.wait()
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall_s = time.perf_counter() - started
    progress.close()
    outcomes = latencies.outcomes["reserve"]
    expected_queued = min(args.queue_max, max(0, args.users - args.capacity))
    expected = {
        "201": min(args.capacity, args.users),
        "202": expected_queued,
        "409 QueueFull": max(0, args.users - args.capacity - expected_queued),
    }
    summary = latencies.summary()["reserve"]
    return {
        "slot_id": slot_id,
        "outcomes": dict(outcomes),
        "as_expected": {k: v for k, v in expected.items() if v} == dict(outcomes),
        "queue_places_exact": sorted(places) == list(range(1, expected_queued + 1)),
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "max_ms": summary["max_ms"],
        "wall_s": round(wall_s, 3),
        "errors": latencies.errors + len(warmup_errors),
        "warmup_errors": warmup_errors[:3],
        "ledger": ledger,
        "latencies": latencies,
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    run_name = f"storm_{secrets.token_hex(4)}"
    async with h.target(args, run_name) as target:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=60)
        cpu_before = h.self_cpu_seconds()
        server_cpu_before = h.cpu_seconds(target.server_pids())
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            rounds = []
            for round_no in range(args.rounds):
                with h.load_generator_collector():
                    rounds.append(await _storm(session, target, args, round_no))
                print(
                    f"storm {round_no + 1}/{args.rounds}: {rounds[-1]['outcomes']} "
                    f"p99 {rounds[-1]['p99_ms']} ms",
                    flush=True,
                )
        cpu = {
            "loadgen_cpu_s": round(h.self_cpu_seconds() - cpu_before, 2),
            "server_cpu_s": round(h.cpu_seconds(target.server_pids()) - server_cpu_before, 2),
        }
        ledger = h.Ledger()
        latencies = h.Latencies()
        for result in rounds:
            ledger.acknowledged.update(result.pop("ledger").acknowledged)
            for name, samples in result.pop("latencies").samples.items():
                latencies.samples[name].extend(samples)
        check = await h.check_database(target.database_url, ledger)
    result = _result(args, rounds, {**cpu, **check})
    if args.report:
        result["report"] = [str(p) for p in write_report(args.report, "storm", result, latencies)]
    return result


def _result(
    args: argparse.Namespace, rounds: list[dict[str, Any]], measured: dict[str, Any]
) -> dict[str, Any]:
    """The JSON line: every round, the worst p99, CPU and the database check (``measured``)."""
    worst_p99 = max(r["p99_ms"] or 0.0 for r in rounds)
    errors = sum(r["errors"] for r in rounds)
    exact = all(r["as_expected"] and r["queue_places_exact"] for r in rounds)
    return {
        "scenario": "storm",
        "engine": args.engine,
        "workers": args.workers,
        "shards": None if args.url else h.shard_count(args),
        "users": args.users,
        "capacity": args.capacity,
        "rounds": rounds,
        "holds": rounds[-1]["outcomes"].get("201", 0),
        "queued": rounds[-1]["outcomes"].get("202", 0),
        "queue_full": rounds[-1]["outcomes"].get("409 QueueFull", 0),
        "errors": errors,
        "p99_ms": worst_p99,
        "p99_target_ms": P99_TARGET_MS,
        **measured,
        "meets_target": exact
        and errors == 0
        and worst_p99 <= P99_TARGET_MS
        and measured["invariant_violations"] == 0
        and measured["lost_acks"] == 0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_run(args))
