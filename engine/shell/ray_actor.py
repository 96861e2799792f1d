"""Shards as Ray actors: the actor class, spawning and finding them, and their transport.

``ShardActor`` wraps one ``ShardRuntime``: one Ray actor (one OS process) owns
one shard and all of its slots. Actors are named ``<prefix>-<n>``, the prefix
naming the deployment (``engine.shell.actor_identity``), detached (a restarted
gateway finds them again), restart without limit after a crash, reserve no
CPU (a shard is mostly idle between batches), and bound their pending calls so
callers get backpressure instead of an unbounded queue.

An actor found by name proves it is this deployment's before it is used: its
identity carries the shard layout, the deployment namespace it was started
with and the fingerprint of the database it reaches itself
(``persistence.migrate.database_fingerprint``); a mismatch fails the start
with one line naming both. A start that fails removes the actors it created
(never those it found), so it leaves nothing behind for the next start.

``RayShardTransport`` is the caller's adapter: it maps Ray's exceptions onto
``engine.shell.errors`` here and nowhere else, and probes an actor whose call
is slow to answer, so that a call to an actor on a lost node fails within a
second instead of waiting for Ray's failure detection.

This module must never mutate shard state outside the actor's default
concurrency group (its one event loop), must not build msgspec codecs at
module level (Ray pickles the class with its module globals), and must never
end, on a failed start, an actor that start did not create.
"""

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import warnings
import zlib
from collections.abc import Callable
from typing import Any, Final, cast

import ray
import ray._private.state
import ray.exceptions

from engine.core.errors import InvariantViolation
from engine.core.policy import DomainPolicy
from engine.shell import limits
from engine.shell.actor_identity import (
    SHARD_ACTOR_PREFIX,
    DeploymentMismatch,
    ShardIdentity,
    actor_name,
    check_identities,
    deployment_prefix,
)
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
from persistence.migrate import database_fingerprint_of

__all__ = ["SHARD_ACTOR_PREFIX", "DeploymentMismatch", "ShardIdentity", "actor_name"]

logger = logging.getLogger(__name__)

# zlib's fastest level: ~0.6 us per command of a full batch, a fraction of the
# object store's cost.
REPLY_COMPRESS_LEVEL: Final = 1
_REPLY_RAW: Final = b"\x00"
_REPLY_ZLIB: Final = b"\x01"
# Exit status of a shard that stopped on a broken invariant: not 0, so Ray restarts it.
FATAL_EXIT_STATUS: Final = 70
# The concurrency group of the liveness probe: a thread and event loop of its own in
# the actor, so that a probe is answered while the shard's loop is busy.
_PROBE_GROUP: Final = "liveness"


def ray_health_check_config() -> dict[str, int]:
    """Ray's system config that finds a lost node within ``limits.NODE_FAILOVER_MS``
    (read by the head's GCS: ``_system_config``, or ``RAY_<name>`` in its environment)."""
    return {
        "health_check_period_ms": limits.RAY_HEALTH_CHECK_PERIOD_MS,
        "health_check_timeout_ms": limits.RAY_HEALTH_CHECK_TIMEOUT_MS,
        "health_check_failure_threshold": limits.RAY_HEALTH_CHECK_FAILURE_THRESHOLD,
    }


def default_ray_health_checks() -> None:
    """Put ``ray_health_check_config`` in this process's environment where the
    operator set nothing, so that a Ray this process starts (``ray.init`` without
    an address) inherits it; a Ray it joins keeps its head's own."""
    for name, value in ray_health_check_config().items():
        os.environ.setdefault(f"RAY_{name}", str(value))


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
    it, a ``ShardOwner`` takes the shard's lease and loads it from PostgreSQL on
    ``ready`` (its creator calls it once the actor proved its identity), or at
    once when Ray re-created the actor after a crash (no call needed: the
    shard's timers expire its holds and offers on time), and every change is
    committed before its reply.
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
        self._storage = storage
        # The fingerprint of the database this actor reaches, once measured.
        self._database: str | None = None
        # Stopped by the operator (``stop``): it never starts again.
        self._stopped = False
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
            if self._restarted:
                # Re-created by Ray after its process died: it was proven this
                # deployment's before (a fresh actor starts on ``ready``, once its
                # creator checked ``identify``), and its shard's timers must run
                # whether or not anything calls it. Ray runs an async actor's
                # constructor on the actor's event loop: the start runs there next.
                asyncio.get_running_loop().call_soon(self._start_owner)

    def _start_owner(self) -> "asyncio.Task[None]":
        """The owner's start, begun unless one is under way or done already."""
        starting = self._starting
        if starting is None:
            assert self._owner is not None
            starting = asyncio.get_running_loop().create_task(self._owner.start())
            starting.add_done_callback(self._after_start)
            self._starting = starting
        return starting

    def _after_start(self, starting: "asyncio.Task[None]") -> None:
        # A start that failed (the database, Redis or the lease unavailable) is tried
        # again by itself: no call may come to a restarted shard for a long time, and
        # its timers must run all the same.
        if starting.cancelled() or starting.exception() is None:
            return
        logger.warning(
            "shard %d could not start: %r; trying again", self._shard_id, starting.exception()
        )
        if self._starting is starting:
            self._starting = None
            asyncio.get_running_loop().call_later(limits.REBUILD_RETRY_MS / 1000, self._start_again)

    def _start_again(self) -> None:
        if not self._stopped:
            self._start_owner()

    async def _started(self, wait_ms: int | None = None) -> None:
        """Start the shard's owner (once), and wait for it: up to ``wait_ms`` if given.

        Raises ``ShardUnreachable`` (nothing applied) if the start failed, or is
        still under way after ``wait_ms``: a batch does not wait out a start that
        waits for a lease or a database, its caller answers 503 meanwhile.
        """
        if self._stopped:
            raise ShardUnavailable(f"shard {self._shard_id} was stopped")
        owner = self._owner
        if owner is None:
            assert self._runtime is not None
            self._runtime.start()
            return
        starting = self._start_owner()
        try:
            async with asyncio.timeout(None if wait_ms is None else wait_ms / 1000):
                await asyncio.shield(starting)
        except Exception as exc:
            if not starting.done():
                raise ShardUnreachable(f"shard {self._shard_id} is still starting") from None
            if self._starting is starting:
                self._starting = None
            raise ShardUnreachable(f"shard {self._shard_id} could not start: {exc!r}") from exc

    async def identify(self) -> ShardIdentity:
        """Say who this actor is, without starting it: a caller checks that it is
        its own deployment's before it lets it take a lease or serve."""
        storage = self._storage
        if storage is not None and self._database is None:
            try:
                self._database = await database_fingerprint_of(storage.database_url)
            except Exception as exc:
                raise ShardUnavailable(
                    f"shard {self._shard_id} cannot reach its database: {exc!r}"
                ) from exc
        return ShardIdentity(
            shard_id=self._shard_id,
            shard_count=self._shard_count,
            pid=os.getpid(),
            restarted=self._restarted,
            deployment=None if storage is None else storage.namespace,
            database=self._database,
        )

    async def ready(self) -> ShardIdentity:
        """Start serving (idempotent) and say who this actor is."""
        await self._started()
        return await self.identify()

    async def stop(self) -> OwnerStatistics | None:
        """Stop for good, gracefully: flush what is pending and release the lease.

        Every later call is refused (``ShardUnavailable``); the caller then ends
        the actor (``ray.kill`` without restart). Returns the owner's last
        statistics (its writer's pending events, whether it failed), None for an
        in-memory shard.
        """
        self._stopped = True
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        if self._owner is None:
            if self._runtime is not None:
                self._runtime.close()
            return None
        await self._owner.close()
        return self._owner.statistics()

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

    @ray.method(concurrency_group=_PROBE_GROUP)
    async def alive(self) -> None:
        """Answers at once, on a thread of its own: the caller's sign of life (the
        process runs and can be reached), whatever the shard's loop is doing."""

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
    # Ray's stubs leave out the actor options of the decorator form.
    remote: Any = ray.remote
    return remote(concurrency_groups={_PROBE_GROUP: 1})(ShardActor)


def spawn_shard_actor(
    shard: int,
    *,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    namespace: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
    storage: StorageSettings | None = None,
    on_created: Callable[[Any], None] | None = None,
) -> Any:
    """The handle of shard ``shard``'s actor, created unless it already exists (Ray's
    ``get_if_exists``, telling ``on_created`` when it was created here)."""
    name = actor_name(shard, name_prefix)
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass
    try:
        handle = (
            _remote_class()
            .options(
                name=name,
                namespace=namespace,
                lifetime="detached",
                num_cpus=0,
                max_restarts=-1,
                max_pending_calls=limits.SHARD_PENDING_CALLS_MAX,
                # Per-call task events feed Ray's dashboard, not us: thousands of batch
                # calls a second would cost both ends and the GCS about 5% (measured).
                enable_task_events=False,
            )
            .remote(shard, shard_count, policies, storage)
        )
    except ValueError:  # ActorAlreadyExistsError: another start created it meanwhile
        return ray.get_actor(name, namespace=namespace)
    if on_created is not None:
        on_created(handle)
    return handle


def spawn_shard_actors(
    *,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    namespace: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
    storage: StorageSettings | None = None,
    on_created: Callable[[Any], None] | None = None,
) -> list[Any]:
    return [
        spawn_shard_actor(
            shard,
            shard_count=shard_count,
            policies=policies,
            namespace=namespace,
            name_prefix=name_prefix,
            storage=storage,
            on_created=on_created,
        )
        for shard in range(shard_count)
    ]


async def wait_shards_ready(
    handles: list[Any],
    *,
    timeout_ms: int,
    deployment: str | None = None,
    database: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
) -> list[ShardIdentity]:
    """Wait for every actor to serve; fail if one was created for another shard layout.

    Given ``deployment``, every actor first proves, before it is started, that it
    was started with that deployment namespace and reaches the database whose
    fingerprint is ``database``: else ``DeploymentMismatch``, naming both.
    """
    async with asyncio.timeout(timeout_ms / 1000):
        if deployment is not None:
            found = await asyncio.gather(*(h.identify.remote() for h in handles))
            check_identities(found, deployment, database, name_prefix)
        identities = cast(
            list[ShardIdentity], await asyncio.gather(*(h.ready.remote() for h in handles))
        )
    check_identities(identities, deployment, database, name_prefix)
    return identities


async def end_shard_actors(handles: list[Any], *, timeout_ms: int) -> None:
    """End the actors for good, whatever their state, and return once Ray has them
    dead (their names free for new actors); ``TimeoutError`` past ``timeout_ms``."""
    for handle in handles:
        ray.kill(handle, no_restart=True)

    async def dead(handle: Any) -> None:
        # Ray kills asynchronously: a call may still be answered by the process, or
        # find the actor unavailable, until Ray reports it dead.
        while True:
            try:
                await handle.identify.remote()
            except ray.exceptions.ActorDiedError:
                return
            except (ray.exceptions.RayError, ShellError):
                pass
            await asyncio.sleep(limits.ACTOR_DEATH_POLL_MS / 1000)

    async with asyncio.timeout(timeout_ms / 1000):
        await asyncio.gather(*(dead(handle) for handle in handles))


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


async def _answer_while_alive(shard: int, handle: Any, ref: Any) -> Any:
    """The answer of the call ``ref``, as long as its actor shows signs of life.

    Ray fails a call to an actor on a lost node only once its health checks find
    the node dead (seconds, or a minute with Ray's defaults): a call unanswered for
    ``ACTOR_PROBE_AFTER_MS`` is followed by a probe, and one that goes unanswered
    for ``ACTOR_PROBE_TIMEOUT_MS`` fails the call as ``ShardUnavailable`` (it may
    have been applied: the coalescer resends the same batch, which the shard
    applies once), unless Ray already knows the actor's process is gone (it
    restarts the actor): then Ray answers the call itself, as before probes
    existed, and the coalescer's resends start from that answer. While the probes
    answer, the call is waited for.
    """
    answer = asyncio.ensure_future(ref)
    try:
        while True:
            done, _ = await asyncio.wait((answer,), timeout=limits.ACTOR_PROBE_AFTER_MS / 1000)
            if done:
                return answer.result()
            if not await _shows_life(handle) and not await _known_gone(handle):
                raise ShardUnavailable(
                    f"shard {shard}: its actor gave no sign of life in"
                    f" {limits.ACTOR_PROBE_TIMEOUT_MS} ms (its node may be lost)"
                )
    finally:
        if not answer.done():
            answer.cancel()


async def _shows_life(handle: Any) -> bool:
    """Whether the actor answers a probe within ``ACTOR_PROBE_TIMEOUT_MS``."""
    try:
        async with asyncio.timeout(limits.ACTOR_PROBE_TIMEOUT_MS / 1000):
            await handle.alive.remote()
    except (ray.exceptions.PendingCallsLimitExceeded, AttributeError):
        # No verdict (calls fill its queue here; an actor of an earlier release has
        # no probe): the call waits on.
        return True
    except (TimeoutError, ray.exceptions.RayActorError):
        return False
    return True


async def _known_gone(handle: Any) -> bool:
    """Whether Ray's GCS knows the actor's process is gone (restarting, dead): Ray
    fails a call in flight to it by itself, within about a second. False when the
    GCS holds it alive, or cannot say within ``ACTOR_PROBE_TIMEOUT_MS``."""
    try:
        # The GCS's actor table, without the dashboard's state API (the engine runs
        # Ray without a dashboard); a blocking call, so in a thread.
        actor_id = handle._actor_id.hex()
        async with asyncio.timeout(limits.ACTOR_PROBE_TIMEOUT_MS / 1000):
            info = await asyncio.to_thread(ray._private.state.actors, actor_id)
    except Exception:
        return False
    return isinstance(info, dict) and info.get("State") not in (None, "ALIVE")


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
        # Shards whose actor gave no sign of life at their latest call: their
        # abandoned calls stay pending in Ray until it finds the node dead, and fill
        # the handle's max_pending_calls; a full queue then means silence, not load.
        self._silent: set[int] = set()

    @classmethod
    async def connect(
        cls,
        *,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        namespace: str | None = None,
        name_prefix: str | None = None,
        timeout_ms: int = limits.ACTOR_START_TIMEOUT_MS,
        storage: StorageSettings | None = None,
    ) -> "RayShardTransport":
        """Find or spawn every shard actor, check that each is this deployment's, and
        wait until all serve.

        The names are the deployment's (``deployment_prefix(storage.namespace)``)
        unless ``name_prefix`` is given. A start that fails removes the actors it
        created, and leaves those it found (another start's, which it must not
        stop) to ``slotengine cluster reset``.
        """
        if name_prefix is None:
            name_prefix = (
                SHARD_ACTOR_PREFIX if storage is None else deployment_prefix(storage.namespace)
            )
        database = None
        if storage is not None:
            # Before any actor exists: a database this process cannot reach fails here.
            database = await database_fingerprint_of(storage.database_url)
        created: list[Any] = []
        try:
            handles = spawn_shard_actors(
                shard_count=shard_count,
                policies=policies,
                namespace=namespace,
                name_prefix=name_prefix,
                storage=storage,
                on_created=created.append,
            )
            await wait_shards_ready(
                handles,
                timeout_ms=timeout_ms,
                deployment=None if storage is None else storage.namespace,
                database=database,
                name_prefix=name_prefix,
            )
        except BaseException:
            if created:
                logger.error("the start failed: removing the %d actors it created", len(created))
                try:
                    await end_shard_actors(created, timeout_ms=limits.ACTOR_END_TIMEOUT_MS)
                except Exception:
                    logger.exception("the actors this start created did not all end")
            raise
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
            handle = self._handles[shard]
            ref = getattr(handle, method).remote(*args)
            try:
                async with asyncio.timeout(timeout_ms / 1000):
                    answer = await _answer_while_alive(shard, handle, ref)
            except ShardUnavailable:
                self._silent.add(shard)
                raise
            self._silent.discard(shard)
            return answer
        except ray.exceptions.PendingCallsLimitExceeded as exc:
            if shard in self._silent:
                # Waiting as for backpressure would outlast the caller's bound.
                raise ShardUnreachable(
                    f"shard {shard}: calls to its silent actor fill the queue"
                ) from exc
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
