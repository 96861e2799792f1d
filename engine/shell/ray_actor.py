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

The batches of a caller on the actor's own node take a shorter way: each
actor also serves its shard on a Unix socket of its node
(``engine.shell.local_engine``'s frames, mode 0600), on its one event loop,
and says where in its identity. A Ray actor call costs hundreds of
microseconds of CPU across the caller, the actor and Ray's threads; a frame
on a local socket a write and a read on each side. Ray still places, names,
restarts and probes the actors: a call on the socket is probed through Ray
like any other, a socket that cannot be reached sends the batch through Ray
instead (nothing was sent), one that breaks with a batch in flight fails it
as ``ShardUnavailable`` (the coalescer resends the same bytes, through Ray,
and the shard applies them once), and the caller asks the actor for its new
socket once a call through Ray succeeded. Callers on other nodes, or attached
through Ray Client, use Ray's calls alone.

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
import tempfile
import time
import warnings
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, cast

import ray
import ray._private.state
import ray._private.worker
import ray.exceptions
import ray.util.client
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
from engine.shell.local_engine import (
    LocalEngineServer,
    LocalEngineTransport,
    SocketBroke,
    SocketUnreachable,
)
from engine.shell.owner import OwnerStatistics, ShardOwner, StorageSettings
from engine.shell.runtime import MemoryEventSink, RuntimeStatistics, ShardRuntime
from persistence.migrate import database_fingerprint_of
from persistence.partitioning import PartitioningError

if TYPE_CHECKING:
    from engine.shell.tracing import Tracing

__all__ = ["SHARD_ACTOR_PREFIX", "DeploymentMismatch", "ShardIdentity", "actor_name"]

logger = logging.getLogger(__name__)

# zlib's fastest level: ~0.6 us per command of a full batch, a fraction of the
# object store's cost.
REPLY_COMPRESS_LEVEL: Final = 1
_REPLY_RAW: Final = b"\x00"
_REPLY_ZLIB: Final = b"\x01"
# The longest directory an actor's local socket goes in (a path has at most 107 bytes).
UNIX_SOCKET_DIR_MAX: Final = 72
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


def _actor_tracing(telemetry: dict[str, str] | None) -> "Tracing | None":
    """The actor's own tracing, from its creator's OTEL_* variables (over its own
    process's): None unless they turn it on. Variables it cannot follow leave it
    off, with an error logged, rather than the shard down."""
    if telemetry:
        os.environ.update(telemetry)
    if "OTEL_TRACES_EXPORTER" not in os.environ:
        return None
    from engine.shell.tracing import TracingConfigError, configure_tracing

    try:
        return configure_tracing()
    except TracingConfigError as exc:
        logger.error("shard actor traces nothing: %s", exc)
        return None


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

    ``telemetry``: its creator's OTEL_* variables; when they turn tracing on, the
    actor exports the spans of its batches and flushes itself.
    """

    def __init__(
        self,
        shard_id: int,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        storage: StorageSettings | None = None,
        telemetry: dict[str, str] | None = None,
    ) -> None:
        self._shard_id = shard_id
        self._tracing = _actor_tracing(telemetry)
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
        # The Unix socket on which callers of this node reach the shard, once served.
        self._socket_server: LocalEngineServer | None = None
        self._socket_path: str | None = None
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
                tracing=self._tracing,
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
                tracing=self._tracing,
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
        socket = await self._serve_socket()
        return ShardIdentity(
            shard_id=self._shard_id,
            shard_count=self._shard_count,
            pid=os.getpid(),
            restarted=self._restarted,
            deployment=None if storage is None else storage.namespace,
            database=self._database,
            node=ray.get_runtime_context().get_node_id(),
            socket=socket,
        )

    async def _serve_socket(self) -> str | None:
        """The path of the Unix socket serving this shard to callers of its node: served
        from the first call on, on this actor's event loop; None if it cannot be."""
        if self._socket_path is not None or self._stopped:
            return self._socket_path
        path = os.path.join(_socket_dir(), f"shard-{os.getpid()}-{secrets.token_hex(4)}.sock")
        server = LocalEngineServer(_ActorSocketHost(self))
        # Set before the wait: a concurrent call finds it and does not serve a second.
        self._socket_server, self._socket_path = server, path
        try:
            await server.start(path)
        except OSError as exc:
            logger.warning("shard %d serves no local socket: %r", self._shard_id, exc)
            self._socket_server = self._socket_path = None
        return self._socket_path

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
        server, self._socket_server, self._socket_path = self._socket_server, None, None
        if server is not None:
            # Its calls in flight are answered first; later ones find no socket and go
            # through Ray, which refuses them.
            await server.close()
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        if self._owner is None:
            if self._runtime is not None:
                self._runtime.close()
            self._flush_spans()
            return None
        await self._owner.close()
        self._flush_spans()
        return self._owner.statistics()

    def _flush_spans(self) -> None:
        if self._tracing is not None:
            self._tracing.force_flush(limits.ACTOR_END_TIMEOUT_MS // 2)

    async def execute_batch(self, data: bytes) -> bytes:
        """The encoded reply behind a one-byte frame header (see ``unframe_reply``)."""
        return frame_reply(await self._execute(data))

    async def _execute(self, data: bytes, on_early: Callable[[bytes], None] | None = None) -> bytes:
        """The encoded reply of a batch, from a Ray call or the local socket."""
        if self._owner is not None:
            starting = self._starting
            if (
                starting is None
                or not starting.done()
                or starting.cancelled()
                or starting.exception() is not None
            ):
                await self._started(limits.SHARD_UNAVAILABLE_PATIENCE_MS)
            return await self._owner.execute_batch(data, on_early)
        assert self._runtime is not None
        return await self._runtime.execute_batch(data, on_early)

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

    async def release_partitions(self, moves: dict[int, int]) -> list[int]:
        """Hand partitions over to other shards (``ShardOwner.release``)."""
        return await self._moving(lambda owner: owner.release(moves))

    async def adopt_partitions(self) -> list[int]:
        """Take what the partition map gives this shard beyond what it serves
        (``ShardOwner.adopt``)."""
        return await self._moving(lambda owner: owner.adopt())

    async def _moving(self, move: Callable[[ShardOwner], Awaitable[list[int]]]) -> list[int]:
        owner = self._owner
        if owner is None:
            raise ShardFailed(f"shard {self._shard_id} keeps no partitions in storage")
        await self._started(limits.SHARD_UNAVAILABLE_PATIENCE_MS)
        try:
            return await move(owner)
        except PartitioningError as exc:
            raise ShardFailed(str(exc)) from exc

    async def check_invariants(self) -> None:
        try:
            if self._owner is not None:
                self._owner.check_invariants()
            elif self._runtime is not None:
                self._runtime.check_invariants()
        except InvariantViolation as exc:
            # Reported, not fatal here: the caller decides (reconcile, health checks).
            raise ShardFailed(f"shard {self._shard_id}: {exc}") from exc


def _socket_dir() -> str:
    """Where an actor's local socket lives: beside Ray's own sockets on this node (gone
    with Ray's temporary files of the run, also after a crash), else the temp dir."""
    with contextlib.suppress(Exception):
        node: Any = ray._private.worker.global_worker.node
        directory = str(node.get_sockets_dir_path())
        # A Unix socket's path has at most 107 bytes; the name adds about 30.
        if len(directory) <= UNIX_SOCKET_DIR_MAX and os.path.isdir(directory):
            return directory
    return tempfile.gettempdir()


class _ActorSocketHost:
    """What an actor's local socket serves: its one shard, on the actor's event loop
    (the socket's callbacks run there), through the same path as a Ray call."""

    def __init__(self, actor: ShardActor) -> None:
        self._actor = actor

    @property
    def shard_count(self) -> int:
        return self._actor._shard_count

    def _check(self, shard: int) -> None:
        if shard != self._actor._shard_id:
            raise ShardFailed(f"shard {self._actor._shard_id} was sent a call for shard {shard}")

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        self._check(shard)
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                return await self._actor._execute(data, on_early)
        except TimeoutError as exc:
            raise ShardCallTimeout(f"shard {shard}: no answer in {timeout_ms} ms") from exc

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        self._check(shard)
        return await self._actor.statistics()

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        self._check(shard)
        await self._actor.check_invariants()


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


def placement_nodes() -> list[str]:
    """The nodes shard actors go on, in a stable order: the alive nodes that offer
    CPUs (a head started with ``num-cpus 0`` is kept for Ray's own work), or every
    alive node when none does."""
    alive = [node for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
    working = [node for node in alive if node.get("Resources", {}).get("CPU", 0) > 0]
    return sorted(str(node["NodeID"]) for node in (working or alive))


def _placement(shard: int, node: str | None = None) -> Any:
    """Shard ``shard``'s node, round robin over ``placement_nodes``: each node the same
    number of actors, so a lost node takes the fewest shards with it and their
    restarts (a node starts one worker process at a time per CPU) overlap. Soft:
    when that node is gone (a restart after its loss), Ray places the actor on
    another. Ray's SPREAD when the nodes cannot be listed. ``node``: that node
    instead (a rebalance moving the actor), soft likewise."""
    if node is not None:
        return NodeAffinitySchedulingStrategy(node_id=node, soft=True)
    try:
        nodes = placement_nodes()
    except Exception:  # through a Ray Client that cannot list them, say
        return "SPREAD"
    if not nodes:
        return "SPREAD"
    return NodeAffinitySchedulingStrategy(node_id=nodes[shard % len(nodes)], soft=True)


def spawn_shard_actor(
    shard: int,
    *,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    namespace: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
    storage: StorageSettings | None = None,
    on_created: Callable[[Any], None] | None = None,
    node: str | None = None,
) -> Any:
    """The handle of shard ``shard``'s actor, created unless it already exists (Ray's
    ``get_if_exists``, telling ``on_created`` when it was created here); on
    ``node`` if given, else where ``_placement`` puts the shard."""
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
                memory=limits.ACTOR_MEMORY_ASKED_BYTES,
                scheduling_strategy=_placement(shard, node),
                max_restarts=-1,
                max_pending_calls=limits.SHARD_PENDING_CALLS_MAX,
                # Per-call task events feed Ray's dashboard, not us: thousands of batch
                # calls a second would cost both ends and the GCS about 5% (measured).
                enable_task_events=False,
            )
            .remote(shard, shard_count, policies, storage, _telemetry())
        )
    except ValueError:  # ActorAlreadyExistsError: another start created it meanwhile
        return ray.get_actor(name, namespace=namespace)
    if on_created is not None:
        on_created(handle)
    return handle


def _telemetry() -> dict[str, str] | None:
    """This process's OTEL_* variables, which the actors it creates trace by."""
    return {name: value for name, value in os.environ.items() if name.startswith("OTEL_")} or None


def spawn_shard_actors(
    *,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    namespace: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
    storage: StorageSettings | None = None,
    on_created: Callable[[Any], None] | None = None,
    first_shard: int = 0,
) -> list[Any]:
    """The actors of shards ``first_shard..shard_count-1`` (see ``spawn_shard_actor``)."""
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
        for shard in range(first_shard, shard_count)
    ]


async def wait_shards_ready(
    handles: list[Any],
    *,
    timeout_ms: int,
    deployment: str | None = None,
    database: str | None = None,
    name_prefix: str = SHARD_ACTOR_PREFIX,
    first_shard: int = 0,
) -> list[ShardIdentity]:
    """Wait for every actor to serve; fail if one was created for another shard layout.

    Given ``deployment``, every actor first proves, before it is started, that it
    was started with that deployment namespace and reaches the database whose
    fingerprint is ``database``: else ``DeploymentMismatch``, naming both.
    """
    async with asyncio.timeout(timeout_ms / 1000):
        if deployment is not None:
            found = await asyncio.gather(*(h.identify.remote() for h in handles))
            check_identities(found, deployment, database, name_prefix, first_shard=first_shard)
        identities = cast(
            list[ShardIdentity], await asyncio.gather(*(h.ready.remote() for h in handles))
        )
    check_identities(identities, deployment, database, name_prefix, first_shard=first_shard)
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


class _ShardSilent(ShardUnavailable):
    """The shard's actor gave no sign of life while a call to it went unanswered."""


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
                raise _ShardSilent(
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


def _own_node_id() -> str | None:
    """This process's Ray node, None when it has none (attached through Ray Client)."""
    try:
        if ray.util.client.ray.is_connected():  # type: ignore[no-untyped-call]
            return None
        node: str | None = ray.get_runtime_context().get_node_id()
    except Exception:
        return None
    return node


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
        local_sockets: bool = True,
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
        # Per shard, the connection to its actor's local socket while it has one usable
        # (the actor runs on this process's Ray node), else None: then Ray's calls.
        self._links: list[LocalEngineTransport | None] = [None] * len(self._handles)
        self._node = _own_node_id() if local_sockets else None
        # Per shard: when its actor may next be asked for its socket, and whether it is.
        self._ask_socket_after = [0.0] * len(self._handles)
        self._asking: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Per shard: the probe through Ray that callers whose socket broke wait for.
        self._reviving: dict[int, asyncio.Future[Any]] = {}
        # Shards scaled away (``retire_shards``): never respawned.
        self._retired: set[int] = set()

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
        local_sockets: bool = True,
    ) -> "RayShardTransport":
        """Find or spawn every shard actor, check that each is this deployment's, and
        wait until all serve. With ``local_sockets`` (the default), batches to the
        actors of this process's node go over their local sockets.

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
            identities = await wait_shards_ready(
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
        transport = cls(
            handles,
            policies=policies,
            namespace=namespace,
            name_prefix=name_prefix,
            storage=storage,
            local_sockets=local_sockets,
        )
        for shard, identity in enumerate(identities):
            transport._adopt_socket(shard, identity)
        return transport

    @property
    def shard_count(self) -> int:
        return len(self._handles)

    def handle(self, shard: int) -> Any:
        return self._handles[shard]

    async def connect_shards(
        self, shard_count: int, timeout_ms: int = limits.ACTOR_CALL_TIMEOUT_MS
    ) -> None:
        """Reach shards up to ``shard_count``: the actors ``slotengine cluster scale``
        added (found by name, never created here; a shard scaled away before has a
        new actor), each proving it is this deployment's. Raises
        ``ShardUnreachable`` for one not found."""
        known = len(self._handles)
        wanted = [s for s in range(shard_count) if s >= known or s in self._retired]
        if not wanted:
            return
        handles = []
        for shard in wanted:
            try:
                handles.append(
                    ray.get_actor(actor_name(shard, self._name_prefix), namespace=self._namespace)
                )
            except ValueError:
                raise ShardUnreachable(f"shard {shard} has no actor (yet)") from None
        async with asyncio.timeout(timeout_ms / 1000):
            found: list[ShardIdentity] = await asyncio.gather(
                *(h.identify.remote() for h in handles)
            )
        storage = self._storage
        if storage is not None:
            database = await database_fingerprint_of(storage.database_url)
            for shard, identity in zip(wanted, found, strict=True):
                check_identities(
                    [identity],
                    storage.namespace,
                    database,
                    self._name_prefix,
                    first_shard=shard,
                )
        if len(self._handles) != known:
            return  # another call connected them meanwhile
        grown = max(0, shard_count - known)
        self._handles.extend([None] * grown)
        self._links.extend([None] * grown)
        self._ask_socket_after.extend([0.0] * grown)
        for shard, handle, identity in zip(wanted, handles, found, strict=True):
            link = self._links[shard]
            if link is not None:
                self._drop_link(shard, link)
            self._handles[shard] = handle
            self._retired.discard(shard)
            self._adopt_socket(shard, identity)

    def retire_shards(self, shard_count: int) -> None:
        """Shards from ``shard_count`` on were scaled away: an actor of theirs that
        died stays dead (no replacement is spawned for it)."""
        self._retired.update(range(shard_count, len(self._handles)))

    async def attach_local_sockets(self, timeout_ms: int = limits.ACTOR_CALL_TIMEOUT_MS) -> None:
        """Ask every actor where its local socket is, and use those of this node."""
        async with asyncio.timeout(timeout_ms / 1000):
            identities = await asyncio.gather(*(h.identify.remote() for h in self._handles))
        for shard, identity in enumerate(identities):
            self._adopt_socket(shard, identity)

    def local_shards(self) -> list[int]:
        """The shards whose batches go over their actor's local socket now."""
        return [shard for shard, link in enumerate(self._links) if link is not None]

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        link = self._links[shard]
        if link is not None:
            try:
                return await self._call_link(shard, link, data, timeout_ms, on_early)
            except SocketUnreachable:
                # Nothing was sent: this batch goes through Ray.
                self._drop_link(shard, link)
        # An actor call has one answer: every read leaves with the reply (on_early unused).
        framed = cast(bytes, await self._call(shard, "execute_batch", data, timeout_ms=timeout_ms))
        if self._node is not None and self._links[shard] is None:
            self._ask_socket(shard)
        return unframe_reply(framed)

    async def _call_link(
        self,
        shard: int,
        link: LocalEngineTransport,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None,
    ) -> bytes:
        """A batch over the actor's local socket, its actor probed through Ray while the
        answer is slow (as a Ray call's): ``ShardUnavailable`` if it shows no life."""
        handle = self._handles[shard]
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            reply = await _answer_while_alive(
                shard, handle, link.call_batch(shard, data, timeout_ms, on_early)
            )
        except SocketBroke:
            # May have been applied: the coalescer resends the same bytes, through Ray.
            self._drop_link(shard, link)
            # The socket breaks the instant the process dies, long before Ray fails a
            # call to it; the resends' patience starts with this failure. So the failure
            # waits, within the call's own bound, for Ray to answer a probe of the actor
            # again (a restarted actor answers once it is back; one dead for good at
            # once, with an error): the resends then find the new incarnation.
            await self._revived(shard, handle, deadline)
            raise
        except _ShardSilent:
            self._drop_link(shard, link)
            self._silent.add(shard)
            raise
        self._silent.discard(shard)
        return cast(bytes, reply)

    async def _revived(self, shard: int, handle: Any, deadline: float) -> None:
        """Wait until the actor answers a probe through Ray (or fails it), until
        ``deadline`` at most; one probe at a time per shard."""
        probe = self._reviving.get(shard)
        if probe is None or probe.done():
            probe = asyncio.ensure_future(handle.alive.remote())
            self._reviving[shard] = probe
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.shield(probe)

    def _adopt_socket(self, shard: int, identity: ShardIdentity) -> None:
        """Use the actor's local socket from now on if it serves one on this node."""
        if (
            self._node is None
            or identity.node != self._node
            or identity.socket is None
            or identity.shard_id != shard
            or not os.path.exists(identity.socket)
        ):
            return
        if self._links[shard] is None:
            self._links[shard] = LocalEngineTransport(
                identity.socket, max(len(self._handles), shard + 1)
            )

    def _drop_link(self, shard: int, link: LocalEngineTransport) -> None:
        if self._links[shard] is link:
            self._links[shard] = None
            self._ask_socket_after[shard] = time.monotonic() + limits.ACTOR_SOCKET_ASK_MS / 1000
        self._spawn_task(link.close())

    def _ask_socket(self, shard: int) -> None:
        """Ask the actor (again, once a while) where its local socket is: a restarted
        actor serves a new one."""
        if shard in self._asking or time.monotonic() < self._ask_socket_after[shard]:
            return
        self._asking.add(shard)
        self._ask_socket_after[shard] = time.monotonic() + limits.ACTOR_SOCKET_ASK_MS / 1000
        handle = self._handles[shard]

        async def ask() -> None:
            try:
                async with asyncio.timeout(limits.ACTOR_PROBE_TIMEOUT_MS / 1000):
                    identity = await handle.identify.remote()
                if self._handles[shard] is handle:
                    self._adopt_socket(shard, identity)
            except Exception as exc:
                logger.debug("shard %d did not say where its socket is: %r", shard, exc)
            finally:
                self._asking.discard(shard)

        self._spawn_task(ask())

    def _spawn_task(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close the connections to the actors' local sockets (the actors go on)."""
        links = [link for link in self._links if link is not None]
        self._links = [None] * len(self._handles)
        self._node = None
        for link in links:
            await link.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

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
        link = self._links[shard]
        if link is not None:
            self._drop_link(shard, link)
        if shard in self._retired:
            return
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
