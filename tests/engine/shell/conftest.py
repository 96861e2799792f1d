"""Fixtures for the shell: a real local Ray started once, and hosts of both kinds
(the domain policies are ``tests.support.domain``'s).

The behaviour tests take the ``host`` fixture, which runs them over the
in-process host, over the same host behind the engine socket
(``engine.shell.local_engine``) and over real Ray shard actors; all carry the
same encoded batches into the same ``ShardCore``.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from engine.core import protocol as p
from engine.core.routing import make_slot_id
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.inproc import InProcessHost
from engine.shell.runtime import MemoryEventSink
from engine.shell.transport import ShardTransport
from tests.support.domain import DAY_MS, HOUR_MS, POLICIES

SHARDS = 2
WAIT_LIMIT_S = 20.0


class Engine:
    """A client over one host, with shorthand for the commands the tests send."""

    def __init__(self, transport: ShardTransport, client: EngineClient) -> None:
        self.transport = transport
        self.client = client
        self.ids = RequestIds()

    async def run(self, command_type: Callable[..., p.AnyCommand], **fields: Any) -> Any:
        fields.setdefault("request_id", self.ids.next())
        return await self.client.execute(command_type(**fields))

    async def slot(self, *, capacity: int = 1, domain: str = "default") -> str:
        resource = f"room-{uuid.uuid4().hex}"
        slot_id = make_slot_id(resource, uuid.uuid4().hex)
        start_ms = int(time.time() * 1000) + DAY_MS
        result = await self.run(
            p.CreateSlot,
            slot_id=slot_id,
            resource_id=resource,
            domain=domain,
            start_ms=start_ms,
            end_ms=start_ms + HOUR_MS,
            capacity=capacity,
        )
        assert result.status == 201, result
        return slot_id

    async def view(self, slot_id: str) -> Any:
        result = await self.run(p.GetSlot, slot_id=slot_id)
        assert isinstance(result, p.SlotResult), result
        return result.slot

    async def reserve(self, slot_id: str, user: str) -> Any:
        return await self.run(p.Reserve, slot_id=slot_id, user_id=user)

    async def confirm(self, booking_id: str, user: str) -> Any:
        return await self.run(p.Confirm, booking_id=booking_id, user_id=user)

    async def cancel(self, booking_id: str, user: str) -> Any:
        return await self.run(p.Cancel, booking_id=booking_id, user_id=user)

    async def booking(self, booking_id: str, user: str) -> Any:
        result = await self.run(p.GetBooking, booking_id=booking_id, user_id=user)
        assert isinstance(result, p.BookingResult), result
        return result.booking

    async def position(self, slot_id: str, user: str) -> Any:
        return await self.run(p.QueuePosition, slot_id=slot_id, user_id=user)


class HeldSink(MemoryEventSink):
    """Durable only when the test says so: a commit that has not happened yet."""

    def __init__(self) -> None:
        super().__init__()
        self.durable = 0
        self._commits: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def durable_position(self) -> int:
        return self.durable

    async def wait_durable(self, position: int | None = None) -> None:
        target = self.position if position is None else position
        if target <= self.durable:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commits.append((target, future))
        await future

    def commit(self) -> None:
        self.durable = self.position
        for _, future in self._commits:
            future.set_result(None)
        self._commits = []


async def wait_until(
    probe: Callable[[], Awaitable[Any]],
    done: Callable[[Any], bool],
    timeout_s: float = WAIT_LIMIT_S,
) -> Any:
    """Ask ``probe`` until ``done`` holds for its answer; TimeoutError past the limit.

    Over Ray the only way to observe a timer is to ask the shard, so this polls;
    it never asserts on how long anything took.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            value = await probe()
            if done(value):
                return value
            await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def ray_shards(ray_cluster: str) -> Iterator[list[Any]]:
    """Shard actors shared by the behaviour tests (each test uses its own slots)."""
    import ray

    from engine.shell.ray_actor import kill_shard_actors, spawn_shard_actors

    prefix = f"shared-{uuid.uuid4().hex[:8]}"
    handles = spawn_shard_actors(shard_count=SHARDS, policies=POLICIES, name_prefix=prefix)
    ray.get([handle.ready.remote() for handle in handles], timeout=60)
    try:
        yield handles
    finally:
        kill_shard_actors(shard_count=SHARDS, name_prefix=prefix)


@pytest.fixture(
    params=[
        "inproc",
        "local",
        pytest.param("ray", marks=pytest.mark.ray),
        pytest.param("ray_socket", marks=pytest.mark.ray),
    ]
)
def host_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def transport(
    host_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    if host_kind == "inproc":
        host = InProcessHost(shard_count=SHARDS, policies=POLICIES)
        yield host
        host.close()
    elif host_kind == "local":
        # The in-process host behind the engine socket, as ``serve --engine inproc
        # --workers N`` runs it (there in a process of its own).
        from engine.shell.local_engine import LocalEngineServer, LocalEngineTransport

        host = InProcessHost(shard_count=SHARDS, policies=POLICIES)
        server = LocalEngineServer(host)
        path = str(tmp_path_factory.mktemp("engine") / "engine.sock")
        await server.start(path)
        transport = await LocalEngineTransport.connect(path)
        yield transport
        await transport.close()
        await server.close()
        host.close()
    else:
        from engine.shell.ray_actor import RayShardTransport

        handles = request.getfixturevalue("ray_shards")
        if host_kind == "ray":
            # Ray's calls alone, as a caller on another node makes them.
            yield RayShardTransport(handles, policies=POLICIES, local_sockets=False)
        else:
            # The actors' local sockets, as a caller on their node reaches them.
            ray_transport = RayShardTransport(handles, policies=POLICIES)
            await ray_transport.attach_local_sockets()
            assert ray_transport.local_shards() == list(range(SHARDS))
            yield ray_transport
            await ray_transport.close()


@pytest.fixture
async def engine(transport: Any) -> AsyncIterator[Engine]:
    client = EngineClient(transport)
    yield Engine(transport, client)
    await client.wait_idle(WAIT_LIMIT_S)
    for shard in range(transport.shard_count):
        await transport.check_invariants(shard, timeout_ms=10_000)
