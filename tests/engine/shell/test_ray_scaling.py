"""Scaling shard actors on Ray under load, 2 -> 4 -> 3 -> 1, and a node joining.

The scenario is ``python -m bench rebalance --engine ray``'s, run short in a
subprocess of its own on a Ray cluster of several nodes on this machine
(``ray.cluster_utils.Cluster``: a head that offers no CPU to the actors and one
worker node), which cannot share the test session's local Ray. Callers keep a
ledger of every acknowledged change, with holds and queue offers left to expire
across the moves, while the durable shard actors (real PostgreSQL and Redis)
change in number as ``slotengine cluster scale`` does (actors started, and
stopped once emptied): 2 -> 4 -> 3 -> 1 -> 4 in the first run, 2 -> 4 in the
second. Then a second worker node joins, and the automatic rebalance of
``SLOTENGINE_AUTO_REBALANCE`` (first run) or ``cluster rebalance`` (second)
restarts actors on it until each node holds two. Nothing acknowledged is lost,
nothing breaks an invariant, no caller sees an error other than 503, every hold
and offer expires (none early), and the actors end evened over the nodes.

Times are not asserted: a loaded machine takes longer to start and move actors.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATABASE_URL, REDIS_URL

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[3]
# Two nodes start, four actors, a node joins and two actors restart on it, the
# expiries are waited for: about a minute on an idle machine.
SCENARIO_TIMEOUT_S = 300


def _bench(*arguments: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "rebalance", "--engine=ray", *arguments],
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": DATABASE_URL, "REDIS_URL": REDIS_URL},
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _nothing_lost(result: dict[str, Any], expiring: int) -> None:
    assert result["lost_acks"] == 0, result["lost_ack_examples"]
    assert result["violations"] == 0, result["reconcile_findings"]
    # Every failure a caller saw was a 503 (with retryAfter at the gateway), nothing else.
    assert result["other_errors"] == 0, result["other_error_examples"]
    assert result["invariants_error"] is None
    assert result["acknowledged_changes"] > 0
    assert result["holds_expired"] == result["holds_left_to_expire"] == expiring
    assert result["offers_expired"] == result["offers_expected"] == expiring
    assert result["expired_early"] == 0 and result["expired_late"] == 0


def test_actors_scaled_two_four_three_one_four_then_a_node_joins_and_they_even_out() -> None:
    """2 -> 4 -> 3 -> 1 -> 4 actors on one worker node, then a second joins and the
    automatic rebalance (``SLOTENGINE_AUTO_REBALANCE``) restarts two actors on it."""
    result = _bench(
        "--nodes=1", "--join-node=auto", "--shards=2,4,3,1,4", "--partitions=64",
        "--step-partitions=16", "--concurrency=30", "--slots=24", "--expiring=4",
        "--hold-ms=8000", "--claim-ms=3000", "--phase-seconds=1", "--on-time-ms=60000",
    )  # fmt: skip
    assert [(c["shards"], c["added"], c["ended"]) for c in result["changes"]] == [
        (4, [2, 3], []),
        (3, [], [3]),
        (1, [], [1, 2]),
        (4, [1, 2, 3], []),
    ]
    assert all(change["moved"] > 0 and change["forced"] == 0 for change in result["changes"])
    assert result["final_partitions_per_shard"] == {"0": 16, "1": 16, "2": 16, "3": 16}
    joined = result["node_joined"]
    assert (joined["actors_per_node_before"], joined["actors_per_node_after"]) == ([4], [2, 2])
    _nothing_lost(result, expiring=4)


def test_after_a_node_joins_cluster_rebalance_evens_the_actors_under_load() -> None:
    result = _bench(
        "--nodes=1", "--join-node=command", "--shards=2,4", "--partitions=64",
        "--step-partitions=16", "--concurrency=30", "--slots=24", "--expiring=4",
        "--hold-ms=8000", "--claim-ms=3000", "--phase-seconds=1.5", "--on-time-ms=60000",
    )  # fmt: skip
    [change] = result["changes"]
    assert (change["shards"], change["added"], change["forced"]) == (4, [2, 3], 0)
    assert change["moved"] == 32  # half of each old shard's 32 partitions
    assert result["final_partitions_per_shard"] == {"0": 16, "1": 16, "2": 16, "3": 16}
    joined = result["node_joined"]
    assert (joined["actors_per_node_before"], joined["actors_per_node_after"]) == ([4], [2, 2])
    # `cluster rebalance` says what it restarted: at least the two that moved.
    assert len(joined["relocations"]) >= 2
    _nothing_lost(result, expiring=4)
