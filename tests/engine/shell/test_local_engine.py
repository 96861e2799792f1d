"""The engine socket: frames, failures carried across it, a broken connection, reconnecting."""

import asyncio
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.core import protocol as p
from engine.shell import errors
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import InProcessHost
from engine.shell.local_engine import (
    Call,
    LocalEngineServer,
    LocalEngineTransport,
    _frame,
    _Framer,
)
from engine.shell.runtime import RuntimeStatistics
from tests.engine.shell.conftest import SHARDS, WAIT_LIMIT_S, Engine, HeldSink
from tests.support.domain import POLICIES

ROOT = Path(__file__).resolve().parents[3]
# An engine process: in-process shards served on the socket named by argv[1].
ENGINE_PROCESS = """
import asyncio, sys
from engine.shell.inproc import InProcessHost
from engine.shell.local_engine import LocalEngineServer
from tests.engine.shell.conftest import SHARDS
from tests.support.domain import POLICIES

async def main():
    await LocalEngineServer(InProcessHost(shard_count=SHARDS, policies=POLICIES)).start(sys.argv[1])
    print("listening", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _start_engine_process(path: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", ENGINE_PROCESS, path], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "listening"
    return process


class _Scripted:
    """A host whose batches answer as the test says: an error, a delay, an echo."""

    shard_count = SHARDS

    def __init__(self) -> None:
        self.raise_next: errors.ShellError | None = None
        self.delay_s = 0.0
        self.calls = 0
        # Per call: whether the caller asked for answers ahead of the reply.
        self.early_asked: list[bool] = []

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        self.calls += 1
        self.early_asked.append(on_early is not None)
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error
        if on_early is not None:
            on_early(b"early:" + data)
        await asyncio.sleep(self.delay_s)
        return b"echo:" + data

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        raise errors.ShardUnavailable(f"shard {shard} is not serving")

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        raise errors.ShardFailed(f"shard {shard}: broken")


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    return str(tmp_path / "engine.sock")


@pytest.fixture
async def scripted(socket_path: str) -> AsyncIterator[tuple[_Scripted, LocalEngineTransport]]:
    host = _Scripted()
    server = LocalEngineServer(host)
    await server.start(socket_path)
    transport = await LocalEngineTransport.connect(socket_path)
    yield host, transport
    await transport.close()
    await server.close()


def test_frames_are_cut_out_of_any_chunking() -> None:
    encoder = msgspec.msgpack.Encoder()
    calls = [Call(n, 0, n % 2, 1000, bytes([n]) * n) for n in range(1, 40)]
    stream = b"".join(_frame(encoder.encode(call)) for call in calls)
    for chunk_size in (1, 3, 7, 64, len(stream)):
        framer = _Framer()
        frames: list[bytes] = []
        for start in range(0, len(stream), chunk_size):
            frames.extend(framer.feed(stream[start : start + chunk_size]))
        decoded = [msgspec.msgpack.decode(frame, type=Call) for frame in frames]
        assert decoded == calls, chunk_size


async def test_a_batch_crosses_the_socket_and_the_socket_is_the_owners_alone(
    scripted: tuple[_Scripted, LocalEngineTransport], socket_path: str
) -> None:
    _, transport = scripted
    assert transport.shard_count == SHARDS
    assert await transport.call_batch(1, b"batch", 1000) == b"echo:batch"
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600


async def test_the_shells_failures_arrive_as_the_same_exceptions(
    scripted: tuple[_Scripted, LocalEngineTransport],
) -> None:
    host, transport = scripted
    for error in (errors.ShardBusy("busy"), errors.BatchRejected("too big")):
        host.raise_next = error
        with pytest.raises(type(error), match=str(error)):
            await transport.call_batch(0, b"x", 1000)
    with pytest.raises(errors.ShardUnavailable, match="not serving"):
        await transport.statistics(0, 1000)
    with pytest.raises(errors.ShardFailed, match="broken"):
        await transport.check_invariants(1, 1000)
    # A host without shard owners has no owner statistics; a shard out of range is refused.
    assert await transport.owner_statistics(0, 1000) is None
    with pytest.raises(errors.ShardFailed, match="no shard 9"):
        await transport.owner_statistics(9, 1000)
    # The connection is still good after every refusal.
    assert await transport.call_batch(0, b"ok", 1000) == b"echo:ok"


async def test_a_slow_answer_times_out_and_its_late_reply_harms_nothing(
    scripted: tuple[_Scripted, LocalEngineTransport],
) -> None:
    host, transport = scripted
    host.delay_s = 0.3
    with pytest.raises(errors.ShardCallTimeout):
        await transport.call_batch(0, b"slow", 50)
    host.delay_s = 0.0
    await asyncio.sleep(0.4)  # the late reply arrives and is dropped
    assert await transport.call_batch(0, b"next", 1000) == b"echo:next"


async def test_calls_in_flight_run_concurrently_and_each_gets_its_own_reply(
    scripted: tuple[_Scripted, LocalEngineTransport],
) -> None:
    host, transport = scripted
    host.delay_s = 0.05
    replies = await asyncio.gather(
        *(transport.call_batch(n % SHARDS, str(n).encode(), 5000) for n in range(200))
    )
    assert replies == [b"echo:" + str(n).encode() for n in range(200)]


async def test_a_killed_engine_is_unavailable_and_its_replacement_is_found_again(
    socket_path: str,
) -> None:
    first = _start_engine_process(socket_path)
    transport = await LocalEngineTransport.connect(socket_path)
    engine = Engine(transport, EngineClient(transport))
    slot_id = await engine.slot(capacity=1)
    try:
        first.send_signal(signal.SIGKILL)
        first.wait()
        # Its connection broke and nobody listens any more: unavailable, never a hang.
        with pytest.raises(errors.ShardUnavailable):
            await transport.call_batch(0, b"", 1000)
        second = _start_engine_process(socket_path)
        try:
            # Its replacement listens on the same path: the next call reconnects.
            # (In-memory shards: the slot went with the first process; owned
            # shards reload theirs from PostgreSQL.)
            gone = await engine.run(p.GetSlot, slot_id=slot_id)
            assert isinstance(gone, p.Failure) and gone.status == 404
            again = await engine.slot(capacity=1)
            assert (await engine.reserve(again, "ann")).status == 201
        finally:
            second.kill()
            second.wait()
    finally:
        await transport.close()
        if first.poll() is None:
            first.kill()


async def test_connect_waits_for_the_engine_to_listen(socket_path: str) -> None:
    host = InProcessHost(shard_count=SHARDS, policies=POLICIES)
    server = LocalEngineServer(host)
    connecting = asyncio.ensure_future(LocalEngineTransport.connect(socket_path, timeout_s=10))
    await asyncio.sleep(0.5)
    assert not connecting.done()
    await server.start(socket_path)
    transport = await connecting
    engine = Engine(transport, EngineClient(transport))
    slot_id = await engine.slot(capacity=1)
    assert (await engine.reserve(slot_id, "ann")).status == 201
    await transport.close()
    await server.close()
    host.close()


async def test_connect_gives_up_when_no_engine_listens(socket_path: str) -> None:
    with pytest.raises(errors.ShardUnavailable):
        await LocalEngineTransport.connect(socket_path, timeout_s=0.5)


async def test_answers_ahead_of_the_reply_reach_the_caller_first(
    scripted: tuple[_Scripted, LocalEngineTransport],
) -> None:
    host, transport = scripted
    host.delay_s = 0.05
    early: list[bytes] = []

    reply = asyncio.ensure_future(transport.call_batch(0, b"mixed", 1000, early.append))
    async with asyncio.timeout(WAIT_LIMIT_S):
        while not early:
            await asyncio.sleep(0.001)

    assert early == [b"early:mixed"]
    assert await reply == b"echo:mixed"
    assert await transport.call_batch(1, b"plain", 1000) == b"echo:plain"
    assert host.early_asked == [True, False]


async def test_a_caller_that_fails_on_an_early_answer_still_gets_its_reply(
    scripted: tuple[_Scripted, LocalEngineTransport],
) -> None:
    _, transport = scripted

    def broken(data: bytes) -> None:
        raise ValueError(data)

    assert await transport.call_batch(0, b"x", 1000, broken) == b"echo:x"
    assert await transport.call_batch(0, b"y", 1000) == b"echo:y"  # the connection is intact


async def test_a_position_beside_a_change_leaves_before_the_change_commits(
    socket_path: str,
) -> None:
    sinks: list[HeldSink] = []

    def held(_: int) -> HeldSink:
        sinks.append(HeldSink())
        return sinks[-1]

    host = InProcessHost(shard_count=1, policies=POLICIES, sink_factory=held)
    server = LocalEngineServer(host)
    await server.start(socket_path)
    transport = await LocalEngineTransport.connect(socket_path)
    engine = Engine(transport, EngineClient(transport))
    (sink,) = sinks

    async def committed(call: Any) -> Any:
        task = asyncio.ensure_future(call)
        async with asyncio.timeout(WAIT_LIMIT_S):
            while not task.done():
                sink.commit()
                await asyncio.sleep(0.001)
        return task.result()

    try:
        quiet = await committed(engine.slot(capacity=1))
        busy = await committed(engine.slot(capacity=1))
        await committed(engine.reserve(quiet, "alice"))

        # One batch (submitted in one turn): a change of `busy`, reads of `quiet`.
        change = asyncio.ensure_future(engine.reserve(busy, "bob"))
        position = asyncio.ensure_future(engine.position(quiet, "carol"))
        view = asyncio.ensure_future(engine.view(quiet))
        async with asyncio.timeout(WAIT_LIMIT_S):
            await asyncio.wait({position, view}, return_when=asyncio.ALL_COMPLETED)

        assert not change.done()  # its commit has not happened
        assert (await position).status == 404  # carol is in no queue: a real answer
        assert (await view).held_count == 1
        statistics = engine.client.statistics()
        assert statistics.batches_sent == 4 and statistics.answered_early == 2
        sink.commit()
        async with asyncio.timeout(WAIT_LIMIT_S):
            assert (await change).status == 201
        assert host.sink(0) is sink
    finally:
        await transport.close()
        await server.close()
        host.close()
