"""Shards as Ray actors: the actor class, spawning and finding them, and their transport.

``ShardActor`` wraps one ``ShardRuntime``: one Ray actor (one OS process) owns
one shard and all of its slots. Actors are named ``<prefix>-<n>``, detached
(a restarted gateway finds them again), restart without limit after a crash,
reserve no CPU (a shard is mostly idle between batches), and bound their
pending calls so callers get backpressure instead of an unbounded queue.

``RayShardTransport`` is the caller's adapter: it maps Ray's exceptions onto
``engine.shell.errors`` here and nowhere else.

This module must never mutate shard state outside the actor's default
concurrency group (its one event loop), and must not build msgspec codecs at
module level (Ray pickles the class with its module globals).
"""

import asyncio
import functools
import logging
import os
import secrets
import warnings
import zlib
from collections.abc import Callable
from typing import Any, Final, cast

import msgspec
import ray
import ray.exceptions

from engine.core.errors import InvariantViolation
from engine.core.policy import DomainPolicy
from engine.shell import limits
from engine.shell.clock import SystemClock
from engine.shell.errors import (
    ShardBusy,
    ShardCallTimeout,
    ShardFailed,
    ShardUnavailable,
    ShardUnreachable,
    ShellError,
)
from engine.shell.gc_tuning import tune_gc
from engine.shell.owner import OwnerStatistics, ShardOwner, StorageSettings
from engine.shell.runtime import MemoryEventSink, RuntimeStatistics, ShardRuntime

logger = logging.getLogger(__name__)

SHARD_ACTOR_PREFIX: Final = "slotengine-shard"
# zlib's fastest level: ~0.6 us per command of a full batch, a fraction of the
# object store's cost.
REPLY_COMPRESS_LEVEL: Final = 1
_REPLY_RAW: Final = b"\x00"
_REPLY_ZLIB: Final = b"\x01"
# Exit status of a shard that stopped on a broken invariant: not 0, so Ray restarts it.
FATAL_EXIT_STATUS: Final = 70


class ShardIdentity(msgspec.Struct, frozen=True, kw_only=True):
    shard_id: int
    shard_count: int
    pid: int
    # True when Ray rebuilt this actor after its process died.
    restarted: bool


def _exit_after_failure(exc: BaseException) -> None:
    # The core's state may be half-changed: only a fresh process (rebuilt by Ray, then
    # from storage) is trustworthy. Ray sends replies from another thread, so exiting
    # at once could kill the process before the failing call's ShardFailed leaves; the
    # caller would then see the actor die and resend the same batch into the next
    # incarnation. Until the exit, the runtime refuses every call with ShardFailed.
    logger.critical("shard actor exits after %r", exc)
    asyncio.get_running_loop().call_later(
        limits.FATAL_EXIT_DELAY_MS / 1000, os._exit, FATAL_EXIT_STATUS
    )


def _exit_after_stop(reason: str) -> None:
    # Fenced off, or another owner holds the lease: this process must not serve the shard
    # again. Ray starts a fresh incarnation, which waits for the lease like any new owner.
    logger.critical("shard actor exits: %s", reason)
    asyncio.get_running_loop().call_later(
        limits.FATAL_EXIT_DELAY_MS / 1000, os._exit, FATAL_EXIT_STATUS
    )


class ShardActor:
    """One shard in a Ray actor. Every method runs on the actor's single event loop.

    Without ``storage`` the shard lives in memory only (tests, benches). With
    it, a ``ShardOwner`` takes the shard's lease and loads it from PostgreSQL
    on the first call, and every change is committed before its reply.
    """

    def __init__(
        self,
        shard_id: int,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        storage: StorageSettings | None = None,
    ) -> None:
        self._shard_id = shard_id
        self._shard_count = shard_count
        tune_gc()
        context = ray.get_runtime_context()
        with warnings.catch_warnings():
            # Ray's own property reads a deprecated attribute internally; the flag is not.
            warnings.simplefilter("ignore", DeprecationWarning)
            self._restarted = bool(context.was_current_actor_reconstructed)
        self._owner: ShardOwner | None = None
        self._starting: asyncio.Task[None] | None = None
        self._runtime: ShardRuntime | None = None
        if storage is None:
            # Built here, in the actor's process: the runtime owns the msgspec codecs.
            self._runtime = ShardRuntime.create(
                shard_id=shard_id,
                shard_count=shard_count,
                policies=policies,
                clock=SystemClock(),
                sink=MemoryEventSink(events_max=limits.ACTOR_RECENT_EVENTS_MAX),
                on_fatal=_exit_after_failure,
            )
        else:
            # The actor id survives restarts: a restarted incarnation replaces its
            # predecessor's lease at once instead of waiting for it to lapse.
            actor_id = context.get_actor_id() or secrets.token_hex(8)
            self._owner = ShardOwner(
                shard_id=shard_id,
                shard_count=shard_count,
                policies=policies,
                clock=SystemClock(),
                storage=storage,
                owner=f"{actor_id}/{secrets.token_hex(4)}",
                succeeds=f"{actor_id}/",
                on_stopped=_exit_after_stop,
            )

    async def _started(self, wait_ms: int | None = None) -> None:
        """Start the shard's owner (once), and wait for it: up to ``wait_ms`` if given.

        Raises ``ShardUnreachable`` (nothing applied) if the start failed, or is
        still under way after ``wait_ms``: a batch does not wait out a start that
        waits for a lease or a database, its caller answers 503 meanwhile.
        """
        owner = self._owner
        if owner is None:
            assert self._runtime is not None
            self._runtime.start()
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(owner.start())
        starting = self._starting
        try:
            async with asyncio.timeout(None if wait_ms is None else wait_ms / 1000):
                await asyncio.shield(starting)
        except Exception as exc:
            if not starting.done():
                raise ShardUnreachable(f"shard {self._shard_id} is still starting") from None
            self._starting = None
            raise ShardUnreachable(f"shard {self._shard_id} could not start: {exc!r}") from exc

    async def ready(self) -> ShardIdentity:
        """Start serving (idempotent) and say who this actor is."""
        await self._started()
        return ShardIdentity(
            shard_id=self._shard_id,
            shard_count=self._shard_count,
            pid=os.getpid(),
            restarted=self._restarted,
        )

    async def execute_batch(self, data: bytes) -> bytes:
        """The encoded reply behind a one-byte frame header (see ``unframe_reply``)."""
        if self._owner is not None:
            starting = self._starting
            if (
                starting is None
                or not starting.done()
                or starting.cancelled()
                or starting.exception() is not None
            ):
                await self._started(limits.SHARD_UNAVAILABLE_PATIENCE_MS)
            return frame_reply(await self._owner.execute_batch(data))
        assert self._runtime is not None
        return frame_reply(await self._runtime.execute_batch(data))

    async def statistics(self) -> RuntimeStatistics:
        runtime = self._runtime if self._owner is None else self._owner.runtime
        if runtime is None:
            raise ShardUnavailable(f"shard {self._shard_id} is not serving yet")
        return runtime.statistics()

    async def owner_statistics(self) -> OwnerStatistics | None:
        return self._owner.statistics() if self._owner is not None else None

    async def check_invariants(self) -> None:
        try:
            if self._owner is not None:
                self._owner.check_invariants()
            elif self._runtime is not None:
                self._runtime.check_invariants()
        except InvariantViolation as exc:
            # Reported, not fatal here: the caller decides (reconcile, health checks).
            raise ShardFailed(f"shard {self._shard_id}: {exc}") from exc


def frame_reply(reply: bytes) -> bytes:
    if len(reply) > limits.REPLY_COMPRESS_ABOVE_BYTES:
        return _REPLY_ZLIB + zlib.compress(reply, REPLY_COMPRESS_LEVEL)
    return _REPLY_RAW + reply


def unframe_reply(framed: bytes) -> bytes:
    header = framed[:1]
    if header == _REPLY_RAW:
        return framed[1:]
    if header == _REPLY_ZLIB:
        return zlib.decompress(framed[1:])
    raise ShardFailed(f"a shard reply with an unknown frame header {header!r}")


@functools.cache
def _remote_class() -> Any:
    return ray.remote(ShardActor)


def actor_name(shard: int, name_prefix: str = SHARD_ACTOR_PREFIX) -> str:
    return f"{name_prefix}-{shard}"


def spawn_shard_actor(
    shard: int,
    *,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    namespace: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
    storage: StorageSettings | None = None,
) -> Any:
    """The handle of shard ``shard``'s actor, created unless it already exists."""
    return (
        _remote_class()
        .options(
            name=actor_name(shard, name_prefix),
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_pending_calls=limits.SHARD_PENDING_CALLS_MAX,
            # Per-call task events feed Ray's dashboard, not us: thousands of batch calls a
            # second would cost both ends and the GCS about 5% (measured).
            enable_task_events=False,
        )
        .remote(shard, shard_count, policies, storage)
    )


def spawn_shard_actors(
    *,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    namespace: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
    storage: StorageSettings | None = None,
) -> list[Any]:
    return [
        spawn_shard_actor(
            shard,
            shard_count=shard_count,
            policies=policies,
            namespace=namespace,
            name_prefix=name_prefix,
            storage=storage,
        )
        for shard in range(shard_count)
    ]


async def wait_shards_ready(handles: list[Any], *, timeout_ms: int) -> list[ShardIdentity]:
    """Wait for every actor to serve; fail if one was created for another shard layout."""
    async with asyncio.timeout(timeout_ms / 1000):
        identities = cast(
            list[ShardIdentity], await asyncio.gather(*(h.ready.remote() for h in handles))
        )
    for shard, identity in enumerate(identities):
        if identity.shard_id != shard or identity.shard_count != len(handles):
            raise ShardFailed(
                f"actor for shard {shard} serves shard {identity.shard_id} of "
                f"{identity.shard_count}, expected {shard} of {len(handles)}"
            )
    return identities


def kill_shard_actors(
    *,
    shard_count: int,
    namespace: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
) -> int:
    """Kill the named shard actors for good (tests, teardown); returns how many were found."""
    killed = 0
    for shard in range(shard_count):
        try:
            handle = ray.get_actor(actor_name(shard, name_prefix), namespace=namespace)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)
        killed += 1
    return killed


class RayShardTransport:
    """Calls shard actors through their handles; Ray's failures become ``ShellError``s."""

    def __init__(
        self,
        handles: list[Any],
        *,
        policies: dict[str, DomainPolicy],
        namespace: str | None = None,
        name_prefix: str = SHARD_ACTOR_PREFIX,
        storage: StorageSettings | None = None,
    ) -> None:
        self._handles = list(handles)
        self._policies = policies
        self._namespace = namespace
        self._name_prefix = name_prefix
        self._storage = storage

    @classmethod
    async def connect(
        cls,
        *,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        namespace: str | None = None,
        name_prefix: str = SHARD_ACTOR_PREFIX,
        timeout_ms: int = limits.ACTOR_CALL_TIMEOUT_MS,
        storage: StorageSettings | None = None,
    ) -> "RayShardTransport":
        """Spawn (or find) every shard actor and wait until all serve."""
        handles = spawn_shard_actors(
            shard_count=shard_count,
            policies=policies,
            namespace=namespace,
            name_prefix=name_prefix,
            storage=storage,
        )
        await wait_shards_ready(handles, timeout_ms=timeout_ms)
        return cls(
            handles,
            policies=policies,
            namespace=namespace,
            name_prefix=name_prefix,
            storage=storage,
        )

    @property
    def shard_count(self) -> int:
        return len(self._handles)

    def handle(self, shard: int) -> Any:
        return self._handles[shard]

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        # An actor call has one answer: every read leaves with the reply (on_early unused).
        framed = cast(bytes, await self._call(shard, "execute_batch", data, timeout_ms=timeout_ms))
        return unframe_reply(framed)

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        return cast(RuntimeStatistics, await self._call(shard, "statistics", timeout_ms=timeout_ms))

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        await self._call(shard, "check_invariants", timeout_ms=timeout_ms)

    async def owner_statistics(self, shard: int, timeout_ms: int) -> OwnerStatistics | None:
        return cast(
            OwnerStatistics | None,
            await self._call(shard, "owner_statistics", timeout_ms=timeout_ms),
        )

    async def identity(self, shard: int, timeout_ms: int) -> ShardIdentity:
        return cast(ShardIdentity, await self._call(shard, "ready", timeout_ms=timeout_ms))

    async def _call(self, shard: int, method: str, *args: Any, timeout_ms: int) -> Any:
        try:
            ref = getattr(self._handles[shard], method).remote(*args)
            async with asyncio.timeout(timeout_ms / 1000):
                return await ref
        except ray.exceptions.PendingCallsLimitExceeded as exc:
            raise ShardBusy(f"shard {shard}: too many pending calls") from exc
        except TimeoutError as exc:
            raise ShardCallTimeout(f"shard {shard}: no answer in {timeout_ms} ms") from exc
        except ray.exceptions.ActorDiedError as exc:
            # Died for good (killed without restart): a fresh actor takes the name.
            self._respawn(shard)
            raise ShardUnavailable(f"shard {shard}: actor died") from exc
        except ray.exceptions.RayActorError as exc:
            # Includes ActorUnavailableError: restarting, the call may or may not have run.
            raise ShardUnavailable(f"shard {shard}: actor unavailable") from exc
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, ShellError):
                raise type(cause)(str(cause)) from exc
            raise ShardFailed(f"shard {shard}: {method} raised {cause!r}") from exc

    def _respawn(self, shard: int) -> None:
        try:
            self._handles[shard] = spawn_shard_actor(
                shard,
                shard_count=len(self._handles),
                policies=self._policies,
                namespace=self._namespace,
                name_prefix=self._name_prefix,
                storage=self._storage,
            )
        except Exception:
            # The caller still gets ShardUnavailable and retries; the next death respawns.
            logger.exception("could not replace the actor of shard %d", shard)
