"""A Ray node lost under load: its shards are served again elsewhere, nothing
acknowledged is lost, no slot goes over capacity, and the holds and offers
acknowledged before the loss expire on time: those due after the shards' restart at
their deadline, those due during it once their new owner has loaded them, none early.

The scenario is ``python -m bench failover``'s (``bench/failover.py``), run short in
a subprocess of its own: it needs a Ray cluster of several nodes on this machine
(``ray.cluster_utils.Cluster``: a head with the engine's health-check settings and
two worker nodes), which cannot share the test session's local Ray. Durable shard
actors (real PostgreSQL and Redis) are placed by Ray; callers keep a ledger of every
acknowledged change (reserves, confirms, cancels, queue joins and leaves) while the
worker node hosting the most shards is removed, its processes killed. The bench
checks its ledger against PostgreSQL; this test then checks the database it kept
once more with the reconciliation's own checks (``tests.support.integrity``) and
the expiries itself, and shows that the ledger check finds a change that is not
there (a negative control).

Only generous bounds are asserted on times: a loaded machine may take several
times the bench's target of ``NODE_FAILOVER_MS`` to restart an actor.
"""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench._database import drop_database
from bench._ledger import Ledger, check_changes, check_database
from tests.conftest import DATABASE_URL, REDIS_URL, with_database
from tests.support.integrity import assert_consistent

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[3]
# Three cluster nodes and six durable actors start, the load runs 12 s, the expiries
# are waited for: about a minute on an idle machine.
SCENARIO_TIMEOUT_S = 240
# Six shards over three nodes: two on each.
SHARDS = 6
# A loaded machine restarts a lost actor in seconds, not the half minute allowed.
SERVED_AGAIN_WITHIN_S = 30.0
# The engine's health checks find a killed node in 1.5 s; Ray's defaults, in 15 s.
NODE_DEAD_WITHIN_S = 10.0
# An expiry due while its shard was being restarted comes late by that restart.
EXPIRY_LATE_AT_MOST_MS = 30_000


def _run_bench() -> dict[str, Any]:
    command = [
        sys.executable, "-m", "bench", "failover", "--keep-database",
        f"--shards={SHARDS}", "--nodes=2", "--concurrency=40", "--slots-per-shard=4",
        "--expiring-per-shard=2", "--hold-ms=6000", "--claim-ms=3000", "--due-hold-ms=1000",
        "--before-seconds=2", "--after-seconds=10",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": DATABASE_URL, "REDIS_URL": REDIS_URL},
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


async def _check_kept(database_url: str, measured: dict[str, Any]) -> None:
    db = await asyncpg.connect(database_url)
    try:
        # The reconciliation finds nothing: no slot over capacity, no counter drift,
        # no hold past its deadline, no queue offer without its hold.
        await assert_consistent(db)
        # Every hold and offer left to expire (acknowledged before the loss) expired,
        # never before its deadline.
        rows = await db.fetch(
            "SELECT b.user_id, b.status, b.expires_at_ms, a.at_ms FROM bookings b"
            " LEFT JOIN audit_log a ON a.entity_id = b.id AND a.to_status = 'EXPIRED'"
            " WHERE b.user_id LIKE 'keeper-%' OR b.user_id LIKE 'waiter-%'"
        )
        keepers = [row for row in rows if row["user_id"].startswith("keeper-")]
        waiters = [row for row in rows if row["user_id"].startswith("waiter-")]
        # Two holds on each shard due after the restart, one due during it.
        assert len(keepers) == 3 * SHARDS
        assert (
            len(keepers) == measured["holds_left_to_expire"] + measured["due_holds_left_to_expire"]
        )
        assert len(waiters) == measured["offers_expected"] + measured["due_offers_expected"]
        for row in rows:
            assert row["status"] == "EXPIRED", dict(row)
            assert row["at_ms"] >= row["expires_at_ms"], dict(row)
            assert row["at_ms"] - row["expires_at_ms"] < EXPIRY_LATE_AT_MOST_MS, dict(row)

        # Negative control: the ledger check finds a change (and a booking) that
        # PostgreSQL does not have.
        made_up = Ledger(
            bookings={"bk-never-written": "CONFIRMED"},
            changes={"rq-never-written": "Confirm 200"},
        )
        assert await check_changes(database_url, made_up) == ["rq-never-written"]
        found = await check_database(database_url, made_up)
        assert found["lost_acks"] == 2, found
    finally:
        await db.close()


def test_a_node_lost_under_load_loses_nothing_and_its_shards_serve_again() -> None:
    measured = _run_bench()
    database = measured["database"]
    try:
        # The shard actors are spread evenly over the nodes (each node offers CPUs),
        # so the lost worker took a third of them.
        placement = measured["placement"]
        assert sorted(placement.count(node) for node in set(placement)) == [2, 2, 2], placement
        assert measured["lost_shards"], measured
        # Ray found the node dead with the engine's health checks, not its defaults';
        # the shards serve again, elsewhere, and the load reached them before and after.
        dead_after_s = measured["node_dead_after_s"]
        assert dead_after_s is not None and dead_after_s < NODE_DEAD_WITHIN_S, measured
        assert measured["actors_alive_after_s"] is not None, measured
        assert measured["moved"], measured
        assert measured["unavailable_max_s"] is not None, measured
        assert measured["unavailable_max_s"] < SERVED_AGAIN_WITHIN_S, measured
        assert measured["acknowledged_before_loss"] > 100, measured
        assert measured["acknowledged_changes"] > measured["acknowledged_before_loss"]
        # Nothing acknowledged is missing, nothing broke an invariant.
        assert measured["lost_acks"] == 0, measured["lost_ack_examples"]
        assert measured["violations"] == 0, measured
        assert measured["slots_over_capacity"] == 0
        # Every hold and offer left to expire expired, none early: those due after the
        # restart, and those due during it (once the new owner loaded the shard).
        for due in ("", "due_"):
            assert measured[f"{due}holds_expired"] == measured[f"{due}holds_left_to_expire"] > 0
            assert measured[f"{due}offers_expired"] == measured[f"{due}offers_expected"] > 0
            assert measured[f"{due}expired_early"] == 0, measured
        assert measured["machine"]["calibration_ms"] > 0

        asyncio.run(_check_kept(with_database(DATABASE_URL, database), measured))
    finally:
        asyncio.run(drop_database(with_database(DATABASE_URL, database)))
