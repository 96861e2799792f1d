"""Notifications under a storm: holds, queue offers and confirmations reach a webhook and mailboxes.

A started server with notifications on (its delivery worker inside), a
webhook endpoint subscribed to every event on a local receiver, and email to
a local SMTP server (aiosmtpd, from the ``bench`` extra; without it, webhooks
only). Each round creates a slot, gives every user of the round an address
(``PUT /api/me/contact``), and then: all users reserve at once (holds, queue
places, QueueFull), every holder confirms, half of them cancel (each
cancellation offers its place to the head of the queue), and every offered
user claims the offer. Once the outbox has drained (``/health``), the
receivers say what arrived:

- deliveries per second: webhooks and emails received, over the time from the
  first receipt to the last;
- the lag from each change to its receipt (p50, p99), webhooks and emails
  (an email is matched to its change by the event id it carries);
- dead deliveries (``/health``), and duplicates received (the same event id
  twice: allowed by at-least-once, counted).

Targets on the 2-core machine: >= 1,000 deliveries/s, lag p99 <= 1 s, 0 dead.

It must never drive a server off this machine, nor leave the database of the
run behind unless ``--keep-database`` asks.
"""

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bench import _http as h
from bench._machine import calibration_ms
from bench._receivers import Received, smtp_receiver, webhook_receiver
from bench._worker import delivery_worker
from persistence.sealing import format_key, new_key

DELIVERIES_PER_S_TARGET = 1_000.0
LAG_P99_TARGET_MS = 1_000.0
# The outbox has drained when /health says so this many times in a row.
DRAINED_READS = 3
DRAIN_TIMEOUT_S = 300.0
# Requests in flight at once from the load generator.
CONCURRENCY = 200
DOMAIN_FILE = """\
# The bench's default domain: every notification channel.
domainType = "resource"
entityName = "Resource"
advanceBookingDays = 365

[cancellationPolicy]
allowedUntil = 0
refundPercentage = 50

[queueSettings]
enabled = true
notificationChannels = ["websocket", "webhook", "email"]
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    h.add_server_arguments(parser, engine="inproc", workers=1)
    parser.add_argument("--rounds", type=int, default=5, help="storms, each on a new slot")
    parser.add_argument("--users", type=int, default=300, help="users per storm (default 300)")
    parser.add_argument("--capacity", type=int, default=100, help="slot capacity (default 100)")
    parser.add_argument(
        "--live-round-every-s",
        type=float,
        default=0.8,
        help="live phase: a storm starts at most this often (default 0.8 s: some 1,000 "
        "deliveries/s at the defaults); 0: back to back",
    )


async def _round(
    session: aiohttp.ClientSession, target: h.Target, args: argparse.Namespace, round_no: int
) -> dict[str, int]:
    slot_id = await h.create_slot(
        session, target, f"notify-{secrets.token_hex(4)}", args.capacity,
        h.tomorrow() + timedelta(hours=round_no),
    )  # fmt: skip
    users = [f"notify{round_no}-{n}" for n in range(args.users)]
    headers = {user: target.headers(user) for user in users}
    limit = asyncio.Semaphore(CONCURRENCY)
    counts: dict[str, int] = {}

    async def call(method: str, path: str, user: str, body: Any = None) -> tuple[int, Any]:
        async with (
            limit,
            session.request(
                method, f"{target.base}{path}", headers=headers[user], json=body
            ) as response,
        ):
            payload = await response.json() if response.content_type == "application/json" else None
            key = f"{method} {path.rsplit('/', maxsplit=1)[-1]} {response.status}"
            counts[key] = counts.get(key, 0) + 1
            return response.status, payload

    await asyncio.gather(
        *(call("PUT", "/api/me/contact", u, {"email": f"{u}@bench.invalid"}) for u in users)
    )
    answers = await asyncio.gather(
        *(call("POST", "/api/bookings/reserve", u, {"slotId": slot_id}) for u in users)
    )
    holders = [
        (user, body["booking"]["id"])
        for user, (status, body) in zip(users, answers, strict=True)
        if status == 201
    ]
    queued = [user for user, (status, _) in zip(users, answers, strict=True) if status == 202]
    await asyncio.gather(
        *(call("POST", f"/api/bookings/{booking}/confirm", u) for u, booking in holders)
    )
    cancelling = holders[: len(holders) // 2]
    await asyncio.gather(
        *(call("POST", f"/api/bookings/{booking}/cancel", u, {}) for u, booking in cancelling)
    )
    positions = await asyncio.gather(
        *(call("GET", f"/api/slots/{slot_id}/queue/position", u) for u in queued)
    )
    offered = [
        (user, body["bookingId"])
        for user, (status, body) in zip(queued, positions, strict=True)
        if status == 200 and body.get("status") == "NOTIFIED"
    ]
    await asyncio.gather(
        *(call("POST", f"/api/bookings/{booking}/confirm", u) for u, booking in offered)
    )
    return counts


async def _drained(session: aiohttp.ClientSession, target: h.Target) -> dict[str, Any]:
    """Wait until no event waits to be fanned out and no delivery is due."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    quiet = 0
    outbox: dict[str, Any] = {}
    while time.monotonic() < deadline and quiet < DRAINED_READS:
        async with session.get(f"{target.base}/health") as health:
            outbox = (await health.json()).get("outbox") or {}
        idle = outbox.get("undispatchedEvents") == 0 and outbox.get("dueDeliveries") == 0
        quiet = quiet + 1 if idle else 0
        await asyncio.sleep(0.5)
    return outbox


def _quantile_ms(values_s: list[float], q: float) -> float | None:
    if not values_s:
        return None
    ordered = sorted(values_s)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


async def _phase(
    session: aiohttp.ClientSession,
    target: h.Target,
    args: argparse.Namespace,
    first_round: int,
    counts: dict[str, int],
    every_s: float = 0.0,
) -> float:
    """Run the rounds of one phase, one every ``every_s`` at most; answers how long
    the load took."""
    started = time.time()
    for round_no in range(first_round, first_round + args.rounds):
        began = time.monotonic()
        for key, n in (await _round(session, target, args, round_no)).items():
            counts[key] = counts.get(key, 0) + n
        await asyncio.sleep(max(0.0, every_s - (time.monotonic() - began)))
    return time.time() - started


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    received = Received()
    calibration = calibration_ms()
    with tempfile.TemporaryDirectory(prefix="bench-notify-") as domains:
        Path(domains, "default.toml").write_text(DOMAIN_FILE)
        async with webhook_receiver(received) as hook_url, smtp_receiver(received) as smtp_url:
            env = {
                "SLOTENGINE_NOTIFICATIONS": "true",
                "SLOTENGINE_WEBHOOK_ALLOW_PRIVATE": "true",
                "SLOTENGINE_DOMAINS_DIR": domains,
                "SLOTENGINE_DATA_KEY": format_key(new_key("bench")),
                "SLOTENGINE_RATE_LIMIT_RESERVE_PER_MIN": "0",
                "SLOTENGINE_RATE_LIMIT_CANCEL_PER_MIN": "0",
            }
            if smtp_url is not None:
                env["SLOTENGINE_SMTP_URL"] = smtp_url
            run_name = f"notify_{secrets.token_hex(4)}"
            # The server runs no worker: the bench's own worker process delivers, so that
            # it can be stopped while a backlog builds.
            async with h.target(args, run_name, env, ["--no-notify"]) as target:
                assert target.database_url is not None and target.log_path is not None
                worker_env = {
                    **os.environ, **env, "DATABASE_URL": target.database_url,
                    "SLOTENGINE_LOG_LEVEL": "warning",
                }  # fmt: skip
                worker_log = target.log_path.with_suffix(".worker.log")
                timeout = aiohttp.ClientTimeout(total=60)
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    async with session.post(
                        f"{target.base}/api/admin/webhooks",
                        headers=target.headers("bench", "admin"),
                        json={"url": hook_url, "events": ["*"]},
                    ) as created:
                        assert created.status == 201, await created.text()
                    counts: dict[str, int] = {}
                    # 1. Live: the worker delivers while the storm makes the events.
                    async with delivery_worker(worker_env, worker_log):
                        live_load_s = await _phase(
                            session, target, args, 0, counts, args.live_round_every_s
                        )
                        live_outbox = await _drained(session, target)
                    live = len(received.webhooks), len(received.emails)
                    # 2. Backlog: the storm with no worker, then one worker drains it.
                    backlog_load_s = await _phase(session, target, args, args.rounds, counts)
                    async with delivery_worker(worker_env, worker_log):
                        outbox = await _drained(session, target)
    return _result(
        args, received, live, counts, (live_load_s, backlog_load_s), (live_outbox, outbox),
        calibration, smtp_url is not None,
    )  # fmt: skip


def _result(
    args: argparse.Namespace,
    received: Received,
    live: tuple[int, int],
    counts: dict[str, int],
    load_s: tuple[float, float],
    outboxes: tuple[dict[str, Any], dict[str, Any]],
    calibration: float,
    with_email: bool,
) -> dict[str, Any]:
    live_hooks, backlog_hooks = received.webhooks[: live[0]], received.webhooks[live[0] :]
    live_mails, backlog_mails = received.emails[: live[1]], received.emails[live[1] :]
    event_time = {event_id: at for _, _, event_id, at in received.webhooks}

    def lags(hooks: list[Any], mails: list[Any]) -> list[float]:
        return [max(0.0, got - at) for got, _, _, at in hooks] + [
            max(0.0, got - event_time[event_id])
            for got, event_id in mails
            if event_id in event_time
        ]

    backlog_receipts = [at for at, *_ in backlog_hooks] + [at for at, _ in backlog_mails]
    window_s = max(backlog_receipts) - min(backlog_receipts) if len(backlog_receipts) > 1 else 0.0
    per_s = round(len(backlog_receipts) / window_s, 1) if window_s > 0 else None
    live_lags = lags(live_hooks, live_mails)
    by_type: dict[str, int] = {}
    for _, kind, _, _ in received.webhooks:
        by_type[kind] = by_type.get(kind, 0) + 1
    ids = [event_id for _, _, event_id, _ in received.webhooks]
    dead = outboxes[1].get("deadDeliveries")
    p99 = _quantile_ms(live_lags, 0.99)
    return {
        "scenario": "notify",
        "engine": args.engine,
        "calibration_ms": calibration,
        "rounds_per_phase": args.rounds,
        "users_per_round": args.users,
        "requests": counts,
        "webhooks": len(received.webhooks),
        "webhooks_by_type": dict(sorted(by_type.items())),
        "emails": len(received.emails) if with_email else "skipped: aiosmtpd not installed",
        "live": {
            "load_s": round(load_s[0], 2),
            "deliveries": sum(live),
            "deliveries_per_s_of_the_load": round(sum(live) / load_s[0], 1) if load_s[0] else None,
            "lag_p50_ms": _quantile_ms(live_lags, 0.5),
            "lag_p99_ms": p99,
            "lag_max_ms": _quantile_ms(live_lags, 1.0),
            "email_lag_p99_ms": _quantile_ms(lags([], live_mails), 0.99),
            "outbox_after": outboxes[0],
        },
        "backlog": {
            "load_s": round(load_s[1], 2),
            "deliveries": len(backlog_receipts),
            "drain_window_s": round(window_s, 2),
            "deliveries_per_s": per_s,
            "outbox_after": outboxes[1],
        },
        "duplicates": len(ids) - len(set(ids)),
        "dead_deliveries": dead,
        "targets": {"deliveries_per_s": DELIVERIES_PER_S_TARGET, "lag_p99_ms": LAG_P99_TARGET_MS},
        "meets_target": per_s is not None
        and per_s >= DELIVERIES_PER_S_TARGET
        and p99 is not None
        and p99 <= LAG_P99_TARGET_MS
        and dead == 0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_run(args))
