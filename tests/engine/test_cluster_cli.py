"""``slotengine cluster`` without a cluster: what it refuses, its status table, and
the facts an actor's owner gives its status (a real owner on PostgreSQL and Redis).

The verbs against real actors are in ``tests/engine/shell/test_ray_deployments.py``.
"""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cluster import _print_status
from engine.core import protocol as p
from engine.shell.clock import SystemClock
from engine.shell.cluster import (
    ActorStatus,
    ClusterStatus,
    FenceStatus,
    LeaseStatus,
    NodeStatus,
    ShardStatus,
    owner_facts,
)
from tests.persistence.helpers import Driver, create_slot, make_owner, request_id, slot_on

ROOT = Path(__file__).resolve().parents[2]


def _cluster(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "cluster", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("verb", ["status", "stop", "reset"])
def test_without_a_cluster_or_a_database_it_refuses_in_one_line(
    verb: str, database_url: str, tmp_path: Path
) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("RAY_ADDRESS", "DATABASE_URL", "REDIS_URL")
    }
    env["SLOTENGINE_DATA_DIR"] = str(tmp_path)  # no embedded service runs there

    no_database = _cluster(verb, env=env)
    assert no_database.returncode == 2
    assert no_database.stderr.strip() == (
        f"slotengine cluster {verb}: DATABASE_URL is not set and no embedded PostgreSQL runs"
        f" under {tmp_path.resolve()}: the deployment is named by its database"
    )
    assert not (tmp_path / "postgres").exists(), "it started the embedded PostgreSQL"

    no_cluster = _cluster(verb, env={**env, "DATABASE_URL": database_url})
    assert no_cluster.returncode == 2
    assert no_cluster.stderr.strip() == (
        f"slotengine cluster {verb}: no Ray cluster to attach to: set RAY_ADDRESS or pass"
        " --address (this command never starts one)"
    )


def test_the_status_table_shows_each_shard_and_what_could_not_be_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = ClusterStatus(
        deployment="slotengine:4f2a9c1b3d7e",
        ray_namespace="slotengine",
        actor_prefix="slotengine-4f2a9c1b3d7e-shard",
        nodes=[NodeStatus(node_id="ab" * 28, address="10.0.0.2", alive=True, cpus=2.0)],
        shards=[
            ShardStatus(
                shard=0,
                actor=ActorStatus(
                    name="slotengine-4f2a9c1b3d7e-shard-0",
                    state="ALIVE",
                    node_id="ab" * 28,
                    node_address="10.0.0.2",
                    pid=4242,
                    restarts=1,
                    owner_state="serving",
                    owner_token=7,
                    lease_valid_for_ms=7_800,
                    rebuilds=0,
                    in_flight_batches=2,
                    in_flight_commands=5,
                    pending_events=12,
                    flush_lag_ms=3_250,
                    last_flush_ago_ms=4_000,
                    partitions=512,
                    partitions_generation=3,
                ),
                lease=LeaseStatus(holder="a1b2/c3", age_ms=1_500, expires_in_ms=8_500),
                redis_token=7,
                fence=FenceStatus(
                    token=7,
                    owner="a1b2/c3",
                    updated_at="2026-12-07T10:00:00Z",
                    age_ms=4_000,
                    generation=4,
                ),
                # A partition moved here; the owner has not reloaded yet.
                partitions=513,
            ),
            ShardStatus(shard=1, actor=None, lease=None, redis_token=None, fence=None),
        ],
        unreachable=["redis: ConnectionError: refused"],
        partitions=1024,
        partition_map_version=9,
    )

    _print_status(status)

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "deployment slotengine:4f2a9c1b3d7e: actors slotengine-4f2a9c1b3d7e-shard-<shard>"
        " in Ray namespace slotengine"
    )
    assert lines[1] == "1024 partitions, map version 9"
    assert lines[2].split() == ["NODE", "ADDRESS", "STATE", "CPUS"]
    assert lines[3].split() == ["ab" * 6, "10.0.0.2", "alive", "2"]
    shard_rows = [line.split() for line in lines[5:8]]
    assert shard_rows[0] == [
        "SHARD", "ACTOR", "NODE", "PID", "RESTARTS", "OWNER", "PARTITIONS", "IN", "FLIGHT",
        "PENDING", "FLUSH", "LAG", "LAST", "FLUSH", "LEASE", "HOLDER", "AGE", "REDIS", "TOKEN",
        "FENCE", "TOKEN/GEN",
    ]  # fmt: skip
    assert shard_rows[1] == [
        "0", "ALIVE", "10.0.0.2", "4242", "1", "serving", "512/513", "5", "12", "3.2s", "4.0s",
        "a1b2/c3", "1.5s", "7", "7/4",
    ]  # fmt: skip
    assert shard_rows[2] == ["1", *["-"] * 14]
    assert lines[-1] == "unreachable: redis: ConnectionError: refused"


async def test_an_actor_whose_writer_is_held_shows_its_commands_in_flight_and_a_growing_lag(
    database_url: str, redis_namespace: str
) -> None:
    flush_may_start = asyncio.Event()
    flush_may_start.set()

    async def gate() -> None:  # a PostgreSQL that takes no commit, as the writer meets it
        await flush_may_start.wait()

    owner = make_owner(database_url, redis_namespace, before_flush=gate)
    await owner.start()
    try:
        drive = Driver(owner)
        slot_id = slot_on(0, 1)
        await drive.run(create_slot(slot_id, SystemClock().now_ms()))
        quiet = owner_facts(owner.statistics())
        assert (quiet["in_flight_commands"], quiet["flush_lag_ms"]) == (0, 0)
        assert quiet["last_flush_ago_ms"] is not None and quiet["lease_valid_for_ms"] > 0
        assert quiet["owner_token"] == owner.statistics().token and quiet["rebuilds"] == 0

        flush_may_start.clear()
        reserves = [
            p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=user)
            for user in ("ann", "bob")
        ]
        batch = asyncio.ensure_future(drive.run(*reserves))
        await asyncio.sleep(0.2)
        first = owner_facts(owner.statistics())
        await asyncio.sleep(0.5)
        second = owner_facts(owner.statistics())
        assert (second["in_flight_batches"], second["in_flight_commands"]) == (1, 2)
        # The batch reaches the writer a moment after the first sleep began; the lag
        # then grows with the clock (a little slack for the millisecond rounding).
        assert first["flush_lag_ms"] > 0
        assert second["flush_lag_ms"] >= first["flush_lag_ms"] + 450
        assert second["last_flush_ago_ms"] >= quiet["last_flush_ago_ms"] + 650

        flush_may_start.set()
        assert [result.status for result in await asyncio.wait_for(batch, 10)] == [201, 201]
        done = owner_facts(owner.statistics())
        assert (done["in_flight_commands"], done["flush_lag_ms"], done["pending_events"]) == (
            0, 0, 0,
        )  # fmt: skip
        assert done["last_flush_ago_ms"] < second["last_flush_ago_ms"]
    finally:
        flush_may_start.set()
        await owner.close()
