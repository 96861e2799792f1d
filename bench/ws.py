"""WebSocket fan-out: 10,000 subscribers on one slot's queue, and how fast one change
at the head of the queue reaches all of them.

One slot of capacity 1 is held; ``--queued`` users wait in its queue, and
``--subscribers`` users (the waiting ones among them) watch it on
``/ws/queue/{slotId}``, each on a connection of its own. Then, ``--changes``
times, the user at the head of the queue leaves through HTTP: every
subscriber must hear of it (a ``slot.updated`` for everyone, a
``queue.position`` for those waiting). The latency of a subscriber is from the
moment the change was sent to the first message it receives after it. The
gateway's memory is its processes' resident size with every subscriber
connected.

Targets on the 2-core machine: p99 <= 1 s, gateway memory <= 1.5 GB.

It must never drive a server off this machine, nor leave the database of the
run behind unless ``--keep-database`` asks.
"""

import argparse
import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import _http as h
from bench._progress import progress_bar
from bench._report import add_report_argument, write_report

P99_TARGET_MS = 1_000.0
GATEWAY_RSS_TARGET_MB = 1_536.0
# Connections opened at the same time while subscribing.
CONNECT_CONCURRENCY = 200
CHANGE_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    h.add_server_arguments(parser)
    parser.add_argument("--subscribers", type=int, default=10_000, help="WebSocket subscribers")
    parser.add_argument("--queued", type=int, default=100, help="of them, waiting in the queue")
    parser.add_argument("--changes", type=int, default=5, help="changes at the head, measured")
    add_report_argument(parser)


class Subscriber:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.first_after: float | None = None
        self.change_started = 0.0
        self.heard = asyncio.Event()
        self.messages = 0

    async def listen(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            self.messages += 1
            if self.change_started and self.first_after is None:
                self.first_after = time.perf_counter()
                self.heard.set()


def _gateway_pids(target: h.Target) -> list[int]:
    """The gateway's processes: ``slotengine serve`` and its workers, not Ray's."""
    pids = []
    for pid in target.server_pids():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"engine.cli" in command or b"multiprocessing" in command:
            pids.append(pid)
    return pids


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    run_name = f"ws_{secrets.token_hex(4)}"
    async with h.target(args, run_name) as target:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=120)
        ) as session:
            return await _measure(session, target, args)


async def _measure(
    session: aiohttp.ClientSession, target: h.Target, args: argparse.Namespace
) -> dict[str, Any]:
    slot_id = await h.create_slot(session, target, f"ws-{secrets.token_hex(4)}", 1, h.tomorrow())
    async with session.post(
        f"{target.base}/api/bookings/reserve", json={"slotId": slot_id},
        headers=target.headers("holder"),
    ) as held:  # fmt: skip
        assert held.status == 201, await held.text()
    queued = [f"waiting-{n}" for n in range(min(args.queued, args.subscribers))]
    for name in queued:
        async with session.post(
            f"{target.base}/api/bookings/reserve", json={"slotId": slot_id},
            headers=target.headers(name),
        ) as answer:  # fmt: skip
            assert answer.status == 202, await answer.text()
    names = queued + [f"watcher-{n}" for n in range(args.subscribers - len(queued))]
    subscribers = [Subscriber(name) for name in names]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    listeners: list[asyncio.Task[None]] = []

    async def connect(subscriber: Subscriber) -> None:
        async with gate:
            subscriber.ws = await session.ws_connect(
                f"{target.base}/ws/queue/{slot_id}?token={target.token(subscriber.name)}",
                autoping=True,
                heartbeat=None,
                max_msg_size=1 << 20,
            )
            # The current state first: the position, then the slot.
            for _ in range(2):
                await subscriber.ws.receive()
        listeners.append(asyncio.create_task(subscriber.listen()))
        progress.update()

    progress = progress_bar(total=len(subscribers), desc="subscribing", unit="ws", mininterval=0.5)
    connect_started = time.perf_counter()
    results = await asyncio.gather(*(connect(s) for s in subscribers), return_exceptions=True)
    failed_connects = sum(isinstance(r, BaseException) for r in results)
    connect_s = time.perf_counter() - connect_started
    progress.close()
    fan_out = h.Latencies()
    print(f"{len(subscribers) - failed_connects} subscribers in {connect_s:.1f} s", flush=True)
    gateway_rss = h.rss_bytes(_gateway_pids(target))
    tree_rss = h.rss_bytes(target.server_pids())
    live = [s for s in subscribers if s.ws is not None]
    cpu_before = h.self_cpu_seconds()
    with h.load_generator_collector():
        changes = await _make_changes(session, target, args, slot_id, queued, live, fan_out)
    loadgen_cpu_s = h.self_cpu_seconds() - cpu_before
    for subscriber in subscribers:
        if subscriber.ws is not None:
            await subscriber.ws.close()
    for task in listeners:
        task.cancel()
    worst_p99 = max((c["p99_ms"] or float("inf")) for c in changes) if changes else None
    missed = sum(c["missed"] for c in changes)
    gateway_mb = round(gateway_rss / 2**20, 1)
    result = {
        "scenario": "ws",
        "engine": args.engine,
        "workers": args.workers,
        "shards": None if args.url else h.shard_count(args),
        "subscribers": len(subscribers) - failed_connects,
        "failed_connects": failed_connects,
        "connect_s": round(connect_s, 2),
        "changes": changes,
        "p99_ms": worst_p99,
        "p99_target_ms": P99_TARGET_MS,
        "missed": missed,
        "gateway_rss_mb": gateway_mb,
        "gateway_rss_target_mb": GATEWAY_RSS_TARGET_MB,
        "server_tree_rss_mb": round(tree_rss / 2**20, 1),
        "loadgen_cpu_s_during_changes": round(loadgen_cpu_s, 2),
        "meets_target": failed_connects == 0
        and missed == 0
        and worst_p99 is not None
        and worst_p99 <= P99_TARGET_MS
        and gateway_mb <= GATEWAY_RSS_TARGET_MB,
    }
    if args.report:
        result["report"] = [str(p) for p in write_report(args.report, "ws", result, fan_out)]
    return result


async def _make_changes(
    session: aiohttp.ClientSession,
    target: h.Target,
    args: argparse.Namespace,
    slot_id: str,
    queued: list[str],
    live: list[Subscriber],
    fan_out: h.Latencies,
) -> list[dict[str, Any]]:
    """One queued user after another leaves; how long each change takes to reach everyone."""
    changes: list[dict[str, Any]] = []
    for change in range(min(args.changes, len(queued))):
        for subscriber in live:
            subscriber.first_after = None
            subscriber.heard.clear()
        leaver = queued[change]
        started = time.perf_counter()
        for subscriber in live:
            subscriber.change_started = started
        async with session.delete(
            f"{target.base}/api/slots/{slot_id}/queue", headers=target.headers(leaver)
        ) as left:
            assert left.status == 204, await left.text()
        waiting = [s for s in live if s.name != leaver]
        try:
            async with asyncio.timeout(CHANGE_TIMEOUT_S):
                await asyncio.gather(*(s.heard.wait() for s in waiting))
        except TimeoutError:
            pass
        latencies = sorted(
            int((s.first_after - started) * 1e9) for s in waiting if s.first_after is not None
        )
        for latency_ns in latencies:
            fan_out.record("fan_out", latency_ns, "reached", change + latency_ns / 1e9)
        changes.append(
            {
                "reached": len(latencies),
                "missed": len(waiting) - len(latencies),
                "p50_ms": h.quantile_ms(latencies, 0.5),
                "p99_ms": h.quantile_ms(latencies, 0.99),
                "max_ms": h.quantile_ms(latencies, 1.0),
            }
        )
        print(f"change {change + 1}/{args.changes}: {changes[-1]}", flush=True)
        live = waiting
        await asyncio.sleep(0.5)
    return changes


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_run(args))
