"""Deployments sharing one Ray cluster, and the operator's ``slotengine cluster`` verbs.

Real Ray (the session's cluster), PostgreSQL and Redis. Each deployment is
named by its database as ``serve`` names it (``deployment_namespace``), so
its actors carry that name; every test removes the actors it made, and the
Redis keys of its deployments.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from engine.core import protocol as p
from engine.core.routing import PARTITIONS_DEFAULT
from engine.shell.actor_identity import RAY_NAMESPACE, actor_name, deployment_prefix
from engine.shell.cluster import deployment_actors, remove_actors
from engine.shell.coalescer import EngineClient
from engine.shell.errors import ShardUnreachable
from engine.shell.owner import StorageSettings
from engine.shell.ray_actor import (
    DeploymentMismatch,
    RayShardTransport,
    spawn_shard_actor,
)
from persistence.migrate import deployment_namespace
from tests.conftest import DATABASE_URL as SERVER_URL
from tests.conftest import (
    REDIS_URL,
    _create_database,
    _drop_database,
    forget_namespace,
    with_database,
)
from tests.engine.shell.conftest import Engine
from tests.support.domain import POLICIES

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT_MS = 30_000
# Nothing listens here: a Redis URL a start cannot use.
NO_REDIS_URL = "redis://127.0.0.1:1/0"


class Deployment(msgspec.Struct, kw_only=True):
    database_url: str
    namespace: str
    storage: StorageSettings

    @property
    def prefix(self) -> str:
        return deployment_prefix(self.namespace)


async def _deployment(database_url: str, **storage: Any) -> Deployment:
    """The deployment ``serve`` would run on ``database_url``: named by its database."""
    connection = await asyncpg.connect(database_url)
    try:
        namespace = await deployment_namespace(connection)
    finally:
        await connection.close()
    return Deployment(
        database_url=database_url,
        namespace=namespace,
        storage=StorageSettings(
            database_url=database_url, redis_url=REDIS_URL, namespace=namespace, **storage
        ),
    )


@pytest.fixture
def other_database_url(template_database: str) -> Iterator[str]:
    name = asyncio.run(_create_database(template_database))
    yield with_database(SERVER_URL, name)
    asyncio.run(_drop_database(name))


@pytest.fixture
async def deployments(
    ray_cluster: str, database_url: str, other_database_url: str
) -> AsyncIterator[list[Deployment]]:
    """Two deployments, on two databases; afterwards none of their actors or keys is left."""
    made = [await _deployment(database_url), await _deployment(other_database_url)]
    try:
        yield made
    finally:
        for deployment in made:
            await remove_actors(deployment.prefix)
            await forget_namespace(deployment.namespace)
    for deployment in made:
        assert deployment_actors(deployment.prefix) == []


async def _connect(deployment: Deployment, shard_count: int = 1) -> RayShardTransport:
    return await RayShardTransport.connect(
        shard_count=shard_count,
        policies=POLICIES,
        namespace=RAY_NAMESPACE,
        storage=deployment.storage,
        timeout_ms=TIMEOUT_MS,
    )


async def _slots_in(database_url: str) -> set[str]:
    connection = await asyncpg.connect(database_url)
    try:
        return {row["id"] for row in await connection.fetch("SELECT id FROM slots")}
    finally:
        await connection.close()


async def test_two_deployments_on_one_cluster_each_get_their_own_actors_and_database(
    deployments: list[Deployment],
) -> None:
    first, second = deployments
    assert first.namespace != second.namespace
    transports = [await _connect(deployment, shard_count=2) for deployment in deployments]
    engines = [Engine(transport, EngineClient(transport)) for transport in transports]

    identities = [
        [await transport.identity(shard, TIMEOUT_MS) for shard in range(2)]
        for transport in transports
    ]
    for deployment, found in zip(deployments, identities, strict=True):
        assert {identity.deployment for identity in found} == {deployment.namespace}
    assert not {i.pid for i in identities[0]} & {i.pid for i in identities[1]}
    assert [name for _, name, _ in deployment_actors(first.prefix)] == [
        actor_name(0, first.prefix),
        actor_name(1, first.prefix),
    ]

    created = [await engine.slot(capacity=1) for engine in engines]
    for engine in engines:
        await engine.client.wait_idle(10)

    assert created[0] in await _slots_in(first.database_url)
    assert created[1] not in await _slots_in(first.database_url)
    assert created[1] in await _slots_in(second.database_url)
    assert created[0] not in await _slots_in(second.database_url)


@pytest.mark.parametrize("planted", ["another deployment", "another database"])
async def test_an_actor_of_another_deployment_under_this_ones_name_is_refused(
    deployments: list[Deployment], planted: str
) -> None:
    ours, theirs = deployments
    storage = theirs.storage
    if planted == "another database":
        # Our deployment's namespace, but started on their database.
        storage = msgspec.structs.replace(storage, namespace=ours.namespace)
    intruder = spawn_shard_actor(
        0,
        shard_count=1,
        policies=POLICIES,
        namespace=RAY_NAMESPACE,
        name_prefix=ours.prefix,
        storage=storage,
    )

    with pytest.raises(DeploymentMismatch) as refused:
        await _connect(ours)

    line = str(refused.value)
    assert "\n" not in line
    assert actor_name(0, ours.prefix) in line
    assert f"not this start's deployment {ours.namespace}" in line
    theirs_said = f"serves deployment {storage.namespace} (database "
    assert theirs_said in line
    assert "slotengine cluster reset" in line
    # Refused before it was started: it took no lease and loaded nothing.
    statistics = await intruder.owner_statistics.remote()
    assert (statistics.state, statistics.token) == ("starting", None)
    # Not this start's to remove: it found it, it did not create it.
    assert [name for _, name, _ in deployment_actors(ours.prefix)] == [actor_name(0, ours.prefix)]


async def test_a_failed_start_leaves_no_actor_and_the_next_start_serves(
    deployments: list[Deployment],
) -> None:
    deployment = deployments[0]
    broken = msgspec.structs.replace(
        deployment, storage=msgspec.structs.replace(deployment.storage, redis_url=NO_REDIS_URL)
    )

    with pytest.raises(ShardUnreachable, match="could not start"):
        await _connect(broken, shard_count=2)

    assert deployment_actors(deployment.prefix) == []
    transport = await _connect(deployment, shard_count=2)
    engine = Engine(transport, EngineClient(transport))
    assert await engine.slot(capacity=1) in await _slots_in(deployment.database_url)


# -- slotengine cluster ---------------------------------------------------------------


def _slotengine(*args: str, deployment: Deployment, **env: str) -> subprocess.CompletedProcess[str]:
    """``slotengine ARGS`` attached to the session's Ray cluster, on ``deployment``'s database."""
    import ray

    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        env={
            **os.environ,
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "DATABASE_URL": deployment.database_url,
            "REDIS_URL": REDIS_URL,
            "SLOTENGINE_SHARDS": "2",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _cluster(*args: str, deployment: Deployment) -> subprocess.CompletedProcess[str]:
    return _slotengine("cluster", *args, deployment=deployment)


async def _lease_holders(deployment: Deployment, shards: int) -> list[bytes | None]:
    from config.redis_keys import RedisKeys

    keys = RedisKeys(deployment.namespace)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        return [await client.get(keys.shard_owner(shard)) for shard in range(shards)]
    finally:
        await client.aclose()


async def test_cluster_status_shows_the_actors_and_stop_flushes_and_ends_them(
    deployments: list[Deployment],
) -> None:
    deployment = await _deployment(deployments[0].database_url, relaxed=True)
    transport = await _connect(deployment, shard_count=2)
    engine = Engine(transport, EngineClient(transport))
    slot_id = await engine.slot(capacity=2)
    # Relaxed durability: answered before it is committed; the stop must flush it.
    held = await engine.reserve(slot_id, "ann")
    assert held.status == 201
    await engine.client.wait_idle(10)

    shown = await asyncio.to_thread(_cluster, "status", "--json", deployment=deployment)
    assert shown.returncode == 0, shown.stderr
    status = msgspec.json.decode(shown.stdout)
    assert status["deployment"] == deployment.namespace
    assert status["unreachable"] == []
    nodes = {node["node_id"] for node in status["nodes"] if node["alive"]}
    assert [shard["shard"] for shard in status["shards"]] == [0, 1]
    for shard in status["shards"]:
        actor = shard["actor"]
        assert actor["name"] == actor_name(shard["shard"], deployment.prefix)
        assert (actor["state"], actor["owner_state"]) == ("ALIVE", "serving")
        assert actor["node_id"] in nodes
        assert shard["lease"]["holder"] == shard["fence"]["owner"]
        assert shard["fence"]["token"] == actor["owner_token"] == shard["redis_token"]
        # What the actor says of itself: nothing waits for a commit, nothing is behind.
        assert (actor["in_flight_batches"], actor["in_flight_commands"]) == (0, 0)
        assert (actor["pending_events"], actor["flush_lag_ms"], actor["rebuilds"]) == (0, 0, 0)
        assert actor["lease_valid_for_ms"] > 0
        assert 0 <= shard["fence"]["age_ms"] < 600_000
        # The map's share of the partitions, all of them loaded, at the fence's generation.
        assert shard["partitions"] == actor["partitions"] == status["partitions"] // 2
        assert shard["fence"]["generation"] == actor["partitions_generation"]
    assert status["partitions"] == PARTITIONS_DEFAULT and status["partition_map_version"] >= 1
    # The hold's shard committed it (after its reply: relaxed durability); the status
    # is asked seconds later.
    flushed = [shard["actor"]["last_flush_ago_ms"] for shard in status["shards"]]
    assert any(type(ago) is int and 0 <= ago < 600_000 for ago in flushed), flushed

    stopped = await asyncio.to_thread(_cluster, "stop", deployment=deployment)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for shard in range(2):
        assert f"{actor_name(shard, deployment.prefix)}: stopped (flushed" in stopped.stdout

    assert deployment_actors(deployment.prefix) == []
    # Released, not left to lapse.
    assert await _lease_holders(deployment, 2) == [None, None]
    connection = await asyncpg.connect(deployment.database_url)
    try:
        stored = await connection.fetch(
            "SELECT user_id, status FROM bookings WHERE slot_id = $1", slot_id
        )
    finally:
        await connection.close()
    assert [(row["user_id"], row["status"]) for row in stored] == [("ann", "RESERVED")]


async def test_cluster_reset_removes_a_wedged_actor(deployments: list[Deployment]) -> None:
    deployment = deployments[0]
    wedged = spawn_shard_actor(
        0, shard_count=1, policies=POLICIES, namespace=RAY_NAMESPACE, name_prefix=deployment.prefix
    )
    pid = (await wedged.ready.remote()).pid
    os.kill(pid, signal.SIGSTOP)
    try:
        reset = await asyncio.to_thread(_cluster, "reset", deployment=deployment)
        assert reset.returncode == 0, reset.stdout + reset.stderr
        assert f"{actor_name(0, deployment.prefix)}: removed" in reset.stdout
        assert deployment_actors(deployment.prefix) == []

        again = await asyncio.to_thread(_cluster, "reset", deployment=deployment)
        assert again.returncode == 0 and "no shard actor" in again.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_serve_refuses_another_deployments_actor_with_one_line(
    deployments: list[Deployment], tmp_path: Path
) -> None:

    ours, theirs = deployments
    spawn_shard_actor(
        0,
        shard_count=1,
        policies=POLICIES,
        namespace=RAY_NAMESPACE,
        name_prefix=ours.prefix,
        storage=theirs.storage,
    )
    served = await asyncio.to_thread(
        _slotengine,
        "serve",
        "--port",
        "0",
        deployment=ours,
        SLOTENGINE_SHARDS="1",
        SLOTENGINE_DATA_DIR=str(tmp_path),
    )

    assert served.returncode == 2, served.stderr[-3000:]
    (said,) = [line for line in served.stderr.splitlines() if "slotengine serve:" in line]
    assert said.startswith("slotengine serve: the shard actors did not start: the shard actor")
    assert f"not this start's deployment {ours.namespace}" in said
    assert f"serves deployment {theirs.namespace}" in said
    assert "Traceback" not in served.stderr


async def test_cluster_scale_moves_partitions_live_and_callers_follow(
    deployments: list[Deployment],
) -> None:
    from engine.shell.rebalance import read_map
    from persistence.partitioning import read_partition_map

    deployment = deployments[0]
    transport = await _connect(deployment, shard_count=1)
    client = EngineClient(
        transport,
        partition_map=await read_map(deployment.database_url),
        map_source=lambda: read_partition_map(deployment.database_url),
    )
    engine = Engine(transport, client)
    slots = [await engine.slot(capacity=2) for _ in range(8)]
    keyed = {
        slot_id: await engine.run(
            p.Reserve, slot_id=slot_id, user_id="ann", idempotency_key=f"k-{slot_id}"
        )
        for slot_id in slots
    }
    assert all(held.status == 201 for held in keyed.values()), keyed

    up = await asyncio.to_thread(_cluster, "scale", "--shards", "2", deployment=deployment)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"1 -> 2 shards: {PARTITIONS_DEFAULT // 2} of {PARTITIONS_DEFAULT} partitions" in (
        up.stdout
    )
    assert "started shards 1" in up.stdout
    scaled = await read_map(deployment.database_url)
    assert scaled.counts() == {0: PARTITIONS_DEFAULT // 2, 1: PARTITIONS_DEFAULT // 2}
    moved = [slot_id for slot_id in slots if scaled.shard_of(slot_id) == 1]
    assert moved, "no slot of the test moved: pick more slots"
    # The caller's map is the old one: it is told partitionNotServed, reads the map,
    # reaches the new actor by name, and the key's first outcome replays there.
    for slot_id in slots:
        again = await engine.run(
            p.Reserve, slot_id=slot_id, user_id="ann", idempotency_key=f"k-{slot_id}"
        )
        assert isinstance(again, p.BookingResult), again
        assert again.booking.id == keyed[slot_id].booking.id
        view = await engine.view(slot_id)
        assert view.held_count == 1, view
    assert client.shard_count == 2 and client.partition_map.version == scaled.version

    shown = await asyncio.to_thread(_cluster, "status", "--json", deployment=deployment)
    status = msgspec.json.decode(shown.stdout)
    assert [(s["shard"], s["partitions"], s["actor"]["partitions"]) for s in status["shards"]] == [
        (0, PARTITIONS_DEFAULT // 2, PARTITIONS_DEFAULT // 2),
        (1, PARTITIONS_DEFAULT // 2, PARTITIONS_DEFAULT // 2),
    ]

    down = await asyncio.to_thread(_cluster, "scale", "--shards", "1", deployment=deployment)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped shards 1" in down.stdout
    assert [name for _, name, _ in deployment_actors(deployment.prefix)] == [
        actor_name(0, deployment.prefix)
    ]
    for slot_id in slots:
        view = await engine.view(slot_id)
        assert view.held_count == 1, view
    assert client.shard_count == 1

    # Up again: shard 1 has a new actor, which the caller finds by name (the one it
    # knew is dead, and is never respawned by the caller).
    again = await asyncio.to_thread(_cluster, "scale", "--shards", "2", deployment=deployment)
    assert again.returncode == 0, again.stdout + again.stderr
    for slot_id in moved:
        view = await engine.view(slot_id)
        assert view.held_count == 1, view
    assert client.shard_count == 2
    await transport.check_invariants(1, TIMEOUT_MS)
    await transport.close()
