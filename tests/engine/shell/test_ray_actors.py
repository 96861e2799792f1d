"""Shard actors on a real local Ray: naming, restarts after a kill, and the coalescer's resends.

A restarted actor starts with an empty shard here: rebuilding its state from
storage belongs to the persistence layer. These tests check that it serves
again and that the caller's batch gets through without the caller noticing.
"""

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.core import protocol as p
from engine.core.routing import make_slot_id
from engine.shell.coalescer import EngineClient
from engine.shell.errors import ShardFailed, ShardUnavailable
from engine.shell.ray_actor import (
    RayShardTransport,
    ShardIdentity,
    kill_shard_actors,
    spawn_shard_actors,
    wait_shards_ready,
)
from tests.engine.shell.conftest import WAIT_LIMIT_S, Engine, wait_until
from tests.support.domain import POLICIES

pytestmark = pytest.mark.ray

TIMEOUT_MS = 30_000
WAIT_LIMIT_MS = int(WAIT_LIMIT_S * 1000)


@pytest.fixture
async def own_shards(ray_cluster: str) -> AsyncIterator[tuple[str, RayShardTransport]]:
    """One shard actor of its own, so killing it disturbs no other test."""
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    transport = await RayShardTransport.connect(
        shard_count=1, policies=POLICIES, name_prefix=prefix, timeout_ms=TIMEOUT_MS
    )
    try:
        yield prefix, transport
    finally:
        kill_shard_actors(shard_count=1, name_prefix=prefix)


async def test_spawning_again_finds_the_same_named_actor(
    own_shards: tuple[str, RayShardTransport],
) -> None:
    prefix, transport = own_shards
    first = await transport.identity(0, TIMEOUT_MS)

    again = spawn_shard_actors(shard_count=1, policies=POLICIES, name_prefix=prefix)
    (found,) = await wait_shards_ready(again, timeout_ms=TIMEOUT_MS)

    assert found == first
    assert not found.restarted


async def test_an_actor_from_another_shard_layout_is_refused(
    own_shards: tuple[str, RayShardTransport],
) -> None:
    import ray

    prefix, transport = own_shards
    before = await transport.identity(0, TIMEOUT_MS)
    # Shard 0 exists for a layout of one shard; a layout of two must not adopt it.
    try:
        with pytest.raises(ShardFailed, match="expected 0 of 2"):
            await RayShardTransport.connect(
                shard_count=2, policies=POLICIES, name_prefix=prefix, timeout_ms=TIMEOUT_MS
            )
        # The failed start removed the actor it created (shard 1), not the one it found.
        with pytest.raises(ValueError):
            ray.get_actor(f"{prefix}-1")
        assert await transport.identity(0, TIMEOUT_MS) == before
    finally:
        kill_shard_actors(shard_count=2, name_prefix=prefix)


async def test_a_batch_in_flight_when_the_actor_is_killed_is_resent_after_the_restart(
    own_shards: tuple[str, RayShardTransport],
) -> None:
    _, transport = own_shards
    engine = Engine(transport, EngineClient(transport))
    before = await transport.identity(0, TIMEOUT_MS)

    # Stopped, the actor cannot answer, so the batch is surely in flight when it dies.
    os.kill(before.pid, signal.SIGSTOP)
    try:
        pending = asyncio.ensure_future(engine.slot(capacity=2))
        await wait_until(
            lambda: _async(engine.client.statistics()),
            lambda stats: stats.batches_in_flight == (1,),
        )
        # Ray pushes the call to the actor's socket right after submitting it; this
        # margin lets that push happen so the kill hits a call the actor has received.
        await asyncio.sleep(0.3)
    finally:
        os.kill(before.pid, signal.SIGKILL)

    slot_id = await asyncio.wait_for(pending, WAIT_LIMIT_S)

    after = await transport.identity(0, TIMEOUT_MS)
    assert after.restarted
    assert after.pid != before.pid
    stats = engine.client.statistics()
    assert stats.retries >= 1
    assert stats.failed_batches == 0
    held = await engine.reserve(slot_id, "alice")
    assert held.status == 201


async def test_ray_kill_with_restart_comes_back_serving(
    own_shards: tuple[str, RayShardTransport],
) -> None:
    import ray

    _, transport = own_shards
    engine = Engine(transport, EngineClient(transport))
    before = await transport.identity(0, TIMEOUT_MS)

    ray.kill(transport.handle(0), no_restart=False)
    # The kill is asynchronous: this may reach the old process or the new one, and the
    # caller must not notice which.
    assert (await engine.run(p.GetSlot, slot_id=_any_slot_id())).status == 404

    after = await wait_until(
        lambda: _identity_or_none(transport),
        lambda identity: identity is not None and identity.pid != before.pid,
    )
    assert after.restarted
    slot_id = await engine.slot(capacity=1)
    assert (await engine.reserve(slot_id, "alice")).status == 201
    assert engine.client.statistics().failed_batches == 0


async def test_an_actor_killed_for_good_is_replaced_under_its_name(
    own_shards: tuple[str, RayShardTransport],
) -> None:
    import ray

    _, transport = own_shards
    # Patience for the new actor's process to start on a loaded machine: this test is
    # about the replacement, not about how soon a caller gives up.
    engine = Engine(transport, EngineClient(transport, unavailable_patience_ms=WAIT_LIMIT_MS))
    dead = transport.handle(0)
    pid = (await transport.identity(0, TIMEOUT_MS)).pid

    ray.kill(dead, no_restart=True)
    # The kill is asynchronous: until the process is gone the old actor still answers
    # (through Ray, and on its local socket a moment after Ray holds it dead).
    await wait_until(lambda: _died(dead), bool)
    await wait_until(lambda: _async(_process_gone(pid)), bool)
    slot_id = await engine.slot(capacity=1)

    assert transport.handle(0) is not dead
    assert (await engine.reserve(slot_id, "alice")).status == 201
    result = await engine.run(p.GetSlot, slot_id=slot_id)
    assert result.slot.held_count == 1


async def _async(value: Any) -> Any:
    return value


def _process_gone(pid: int) -> bool:
    """Whether the process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _any_slot_id() -> str:
    return make_slot_id("nowhere", uuid.uuid4().hex)


async def _died(handle: Any) -> bool:
    """Whether the actor behind ``handle`` is dead for good (asked directly, not
    through the transport, which would replace it)."""
    import ray

    try:
        await handle.ready.remote()
    except ray.exceptions.ActorDiedError:
        return True
    except ray.exceptions.RayActorError:
        pass  # unavailable for now: dying, or not yet known to be dead
    return False


async def _identity_or_none(transport: RayShardTransport) -> ShardIdentity | None:
    try:
        return await transport.identity(0, TIMEOUT_MS)
    except ShardUnavailable:
        return None


async def test_a_batch_goes_through_ray_while_the_local_socket_cannot_be_reached(
    own_shards: tuple[str, RayShardTransport],
) -> None:
    from engine.shell.local_engine import LocalEngineTransport

    _, transport = own_shards
    # Found by connect: the actor runs on this node.
    assert transport.local_shards() == [0]
    # A socket nobody serves: nothing can be sent there.
    transport._links[0] = LocalEngineTransport("/nonexistent/shard.sock", 1)
    engine = Engine(transport, EngineClient(transport))

    slot_id = await engine.slot(capacity=1)

    stats = engine.client.statistics()
    assert (stats.retries, stats.failed_batches) == (0, 0)

    async def read_then_links() -> list[int]:
        assert (await engine.run(p.GetSlot, slot_id=slot_id)).status == 200
        return transport.local_shards()

    # Calls through Ray ask the actor (at most once a second) for its socket again.
    await wait_until(read_then_links, lambda shards: shards == [0])
    assert (await engine.reserve(slot_id, "alice")).status == 201
