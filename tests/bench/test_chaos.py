"""The chaos soak: a short run from the command line, and its pieces.

The short runs start their own PostgreSQL, Redis (a master, a replica and three
sentinels) and engine (shard actors on a Ray of their own; an engine process of
their own), inject 20 faults (10 with the engine process), as many of each
kind, under a small load and check the database after each: they must end with
no acknowledged change lost and no violation. Recovery times are reported,
never asserted (the machine is shared). The run is a process group of its own,
killed whatever happens, so that nothing it started outlives the test.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest

from bench._ledger import Ledger, check_changes
from bench.chaos import ENGINE_FAULTS, FAULTS, Probes, fault_plan, parse_faults

ROOT: Final = Path(__file__).resolve().parents[2]
CYCLES: Final = 20
# Ray, PostgreSQL and Redis start, then 20 faults of a few seconds each at the most;
# within the suite's own timeout per test (300 s), so that the soak is stopped here.
SOAK_TIMEOUT_S: Final = 270
STOP_WAIT_S: Final = 30


def test_the_faults_follow_the_seed_and_every_kind_comes_in_each_round() -> None:
    plan = fault_plan(7, 2 * len(FAULTS), list(FAULTS))
    assert plan == fault_plan(7, 2 * len(FAULTS), list(FAULTS))
    assert plan != fault_plan(8, 2 * len(FAULTS), list(FAULTS))
    assert sorted(plan[: len(FAULTS)]) == sorted(FAULTS)
    assert sorted(plan[len(FAULTS) : 2 * len(FAULTS)]) == sorted(FAULTS)
    assert fault_plan(1, 3, ["redis_restart"]) == ["redis_restart"] * 3
    with pytest.raises(SystemExit, match="--faults"):
        parse_faults("actor_kill,meteor")


def test_each_engine_and_redis_has_the_faults_it_can_be_dealt() -> None:
    assert parse_faults(None) == [k for k in FAULTS if k != "engine_kill"]
    assert parse_faults(None, "sentinel", "process") == [k for k in FAULTS if k != "actor_kill"]
    assert "redis_failover" not in parse_faults(None, "single")
    assert parse_faults("redis_restart,actor_kill", "single") == ["redis_restart", "actor_kill"]
    with pytest.raises(SystemExit, match="--redis single"):
        parse_faults("redis_failover", "single")
    with pytest.raises(SystemExit, match="--engine ray"):
        parse_faults("engine_kill")
    with pytest.raises(SystemExit, match="--engine process"):
        parse_faults("actor_kill", "sentinel", "process")


def test_the_outage_runs_from_the_last_change_before_the_fault_to_the_recovering_one() -> None:
    # (sent, answered) of the changes a shard made: answered at 1.0 and 1.2 before the
    # fault (at 1.5), nothing until 4.0, the change the recovery is measured to.
    probes = Probes(served={0: [(0.9, 1.0), (1.1, 1.2), (3.9, 4.0), (4.0, 4.1)]})
    assert probes.first_after(0, 1.5) == 4.0
    assert probes.longest_gap(0, 1.5, 4.0) == 2.8
    assert probes.longest_gap(0, 1.5, 3.99) == 0.0  # not recovered yet: no gap closed
    assert probes.first_after(1, 0.0) is None


async def test_changes_acknowledged_while_the_check_runs_are_not_counted_lost(
    database_url: str,
) -> None:
    ledger = Ledger()
    ledger.changes["rq-never-written"] = "Reserve 201"
    checking = asyncio.create_task(check_changes(database_url, ledger))
    await asyncio.sleep(0)  # the check has begun: it waits for its connection
    ledger.changes["rq-acknowledged-meanwhile"] = "Confirm 200"
    assert await checking == ["rq-never-written"]


def _stop(process: "subprocess.Popen[str]") -> None:
    """SIGTERM (the soak stops what it started), then SIGKILL to its whole group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_WAIT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _soak(cycles: int, *options: str) -> dict[str, Any]:
    """Run the soak, check what every soak must end with, and return its result."""
    command = [
        sys.executable, "-m", "bench", "chaos", f"--cycles={cycles}", "--seed=3",
        "--shards=2", "--concurrency=6", "--slots-per-shard=3", "--steady-seconds=0.3",
        *options,
    ]  # fmt: skip
    # Its own Ray, whatever the environment names.
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=SOAK_TIMEOUT_S)
    finally:
        _stop(process)
    assert process.returncode == 0, out[-2000:] + err[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    # What each cycle found, and any new owner that did not serve: shown on a failure.
    found = "\n".join(line for line in err.splitlines() if line.startswith(("cycle", "a new")))
    assert result["scenario"] == "chaos" and result["cycles"] == cycles
    assert result["acknowledged_changes"] > 0 and result["acknowledged_bookings"] > 0
    # After every fault, and at the end: nothing acknowledged lost, nothing broken.
    assert result["lost_acks"] == 0, (result["lost_ack_examples"], found)
    assert result["lost_acks_max_after_a_cycle"] == 0, found
    assert result["violations"] == 0 and result["violations_max_after_a_cycle"] == 0, found
    assert result["slots_over_capacity"] == 0 and result["double_bookings"] == 0
    assert result["reconcile_findings"] == {}
    # Every fault recovered from (within the run's generous limit; timings are not asserted).
    assert result["not_recovered"] == 0, found
    assert result["new_owner_changes"] > 0 and result["new_owner_failures"] == 0, found
    assert result["machine"]["calibration_ms"] > 0
    assert "lost acks 0" in out
    return result


def test_a_short_soak_on_ray_loses_no_acknowledged_change_and_breaks_no_invariant() -> None:
    result = _soak(CYCLES)
    kinds = ENGINE_FAULTS["ray"]
    assert result["engine"] == "ray"
    assert {kind: figures["count"] for kind, figures in result["faults"].items()} == {
        kind: CYCLES // len(kinds) for kind in kinds
    }


def test_a_short_soak_with_an_engine_process_killed_loses_nothing_either() -> None:
    result = _soak(CYCLES // 2, "--engine=process")
    kinds = ENGINE_FAULTS["process"]
    assert result["engine"] == "process"
    assert {kind: figures["count"] for kind, figures in result["faults"].items()} == {
        kind: CYCLES // 2 // len(kinds) for kind in kinds
    }
