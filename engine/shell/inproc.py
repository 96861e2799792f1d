"""In-process hosts: N shards in the caller's event loop, no Ray.

It serves tests and single-process use (``--engine inproc``) with the same call
surface as the Ray actors: encoded batches in, encoded replies out. It owns the
runtimes and their sinks; it must not bypass the bytes boundary (callers get no
reference to a core), so that what passes here also passes over Ray.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from engine.core.clock import Clock
from engine.core.errors import InvariantViolation
from engine.core.policy import DomainPolicy
from engine.shell.clock import SystemClock
from engine.shell.errors import ShardCallTimeout, ShardFailed, ShardUnavailable
from engine.shell.owner import ShardOwner, StorageSettings
from engine.shell.runtime import EventSink, MemoryEventSink, RuntimeStatistics, ShardRuntime

if TYPE_CHECKING:
    from engine.shell.tracing import Tracing


class InProcessHost:
    def __init__(
        self,
        *,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        clock: Clock | None = None,
        sink_factory: Callable[[int], EventSink] | None = None,
    ) -> None:
        if shard_count < 1:
            raise ValueError("shard_count must be at least 1")
        shared_clock = clock if clock is not None else SystemClock()
        make_sink = sink_factory if sink_factory is not None else (lambda _: MemoryEventSink())
        self._runtimes = [
            ShardRuntime.create(
                shard_id=shard,
                shard_count=shard_count,
                policies=policies,
                clock=shared_clock,
                sink=make_sink(shard),
            )
            for shard in range(shard_count)
        ]

    @property
    def shard_count(self) -> int:
        return len(self._runtimes)

    def sink(self, shard: int) -> EventSink:
        return self._runtimes[shard].sink

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        runtime = self._runtimes[shard]
        # The common case (nothing to wait for after applying) needs no task or timer.
        reply, position, early = runtime.apply(data, early=on_early is not None)
        if early is not None and on_early is not None:
            on_early(early)
        if position <= runtime.sink.durable_position:
            return reply
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                await runtime.wait_durable(position, runtime.last_batch_size)
        except TimeoutError as exc:
            raise ShardCallTimeout(f"shard {shard}: events not durable in {timeout_ms} ms") from exc
        return reply

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        return self._runtimes[shard].statistics()

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        try:
            self._runtimes[shard].check_invariants()
        except InvariantViolation as exc:
            raise ShardFailed(f"shard {shard}: {exc}") from exc

    def close(self) -> None:
        for runtime in self._runtimes:
            runtime.close()


class OwnedInProcessHost:
    """N durable shards in the caller's event loop: a ``ShardOwner`` each.

    The single-process deployment (``serve --engine inproc``): the same owners
    as in the Ray actors (lease, takeover, write-behind, rebuild), without Ray.
    """

    def __init__(
        self,
        *,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        storage: StorageSettings,
        clock: Clock | None = None,
        before_flush: Callable[[int], Awaitable[None]] | None = None,
        tracing: "Tracing | None" = None,
    ) -> None:
        """``before_flush(shard)`` runs before each of a shard's flushes (tests: a
        writer held back). ``tracing``: the caller's (this process's), for the
        spans of the shards' batches and flushes."""
        if shard_count < 1:
            raise ValueError("shard_count must be at least 1")
        self._policies = policies
        self._storage = storage
        self._clock = clock if clock is not None else SystemClock()
        self._before_flush = before_flush
        self._tracing = tracing
        self._owners = [self._new_owner(shard, shard_count) for shard in range(shard_count)]

    def _new_owner(self, shard: int, shard_count: int) -> ShardOwner:
        hook = self._before_flush
        return ShardOwner(
            shard_id=shard,
            shard_count=shard_count,
            policies=self._policies,
            clock=self._clock,
            storage=self._storage,
            before_flush=None if hook is None else _bound(hook, shard),
            tracing=self._tracing,
        )

    @property
    def shard_count(self) -> int:
        return len(self._owners)

    def owner(self, shard: int) -> ShardOwner:
        return self._owners[shard]

    async def start(self) -> None:
        await asyncio.gather(*(owner.start() for owner in self._owners))

    # -- live moves (engine/shell/rebalance.py) -----------------------------------

    async def release(self, shard: int, moves: dict[int, int]) -> list[int]:
        return await self._owners[shard].release(moves)

    async def adopt(self, shard: int) -> list[int]:
        return await self._owners[shard].adopt()

    async def grow(self, shard_count: int) -> None:
        """Start owners for shards ``shard_count()..shard_count-1`` (they serve what the
        map gives them: nothing, until partitions move to them)."""
        added = [
            self._new_owner(shard, shard_count) for shard in range(len(self._owners), shard_count)
        ]
        await asyncio.gather(*(owner.start() for owner in added))
        self._owners.extend(added)

    async def shrink(self, shard_count: int) -> None:
        """Stop the owners of shards ``shard_count..``, which must serve no partition
        any more (``rebalance`` to ``shard_count`` first)."""
        leaving = self._owners[shard_count:]
        for owner in leaving:
            served = owner.partitions
            if served is not None and served.owned:
                raise ValueError(
                    f"shard {owner.shard_id} still serves {len(served.owned)} partitions"
                )
        del self._owners[shard_count:]
        await asyncio.gather(*(owner.close() for owner in leaving))

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        if shard >= len(self._owners):
            raise ShardFailed(f"shard {shard} was scaled away")
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                return await self._owners[shard].execute_batch(data, on_early)
        except TimeoutError as exc:
            raise ShardCallTimeout(f"shard {shard}: no answer in {timeout_ms} ms") from exc

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        runtime = self._owners[shard].runtime
        if runtime is None:
            raise ShardUnavailable(f"shard {shard} is not serving")
        return runtime.statistics()

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        try:
            self._owners[shard].check_invariants()
        except InvariantViolation as exc:
            raise ShardFailed(f"shard {shard}: {exc}") from exc

    async def close(self) -> None:
        await asyncio.gather(*(owner.close() for owner in self._owners))


def _bound(hook: Callable[[int], Awaitable[None]], shard: int) -> Callable[[], Awaitable[None]]:
    return lambda: hook(shard)
