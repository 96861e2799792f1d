"""ShardOwner: one shard with its lease, its durable state, and its recovery.

The owner takes the shard's lease in Redis (a fencing token with it), takes
the shard over in PostgreSQL (the token goes to the fence row in the same
transaction as the reload), restores a ``ShardCore`` from what it loaded, and
serves batches through a ``ShardRuntime`` whose events go to a
``ShardWriter`` (write-behind, group commit). A renewal task keeps the lease.

States: STARTING -> SERVING <-> REBUILDING, SERVING -> DEGRADED -> SERVING,
and STOPPED for good; the table of allowed transitions is
``engine/shell/owner_states.py``, and the owner moves only along it.
- A flush that fails because PostgreSQL is unreachable (down, or frozen past
  the flush timeout): the waiting replies get 503 with their outcome unknown (a
  flush that timed out may still commit) and the owner goes DEGRADED. Its state
  in memory stays, frozen: no timer fires (an expiry could not commit), no
  change is taken (503 with a retry hint), and reads are answered from it
  unless they could show a change whose commit is in doubt (the failed
  flush's and every later one's: ``InDoubt``), so a read shows only committed
  state, and only while the lease holds. Meanwhile the owner reloads the shard
  from PostgreSQL with a new fencing token, retrying until it can (the failed
  flush, should it still be running, is fenced off rather than landing after
  the reload); the reload gives every hold whose deadline fell after the
  shard's last commit at least ``outage_hold_grace_ms`` after the recovery
  (``ShardCore.grant_grace``, trigger ``outage_grace``), and replaces the
  frozen state. ``{ns}:shard:{n}:storage_lost`` in Redis tells an owner that
  reloads after a failover that the outage happened.
- Any other failed flush (a safety net of the database refused it), or the
  core raised: the in-memory state is dropped (it is ahead of the database or
  broken) and the owner reloads, REBUILDING; meanwhile every command is
  answered 503.
- The lease cannot be renewed (Redis down): changes are refused with 503
  before the lease could lapse; reads and timers go on. When Redis answers
  again, a still-held lease just continues; a lapsed one is taken again with a
  new token and the shard is reloaded (another owner may have written). A
  load never serves under a lease lost while it ran (Redis lost the key, in a
  failover or a restart): it takes a new one first.
- A reload is retried, the pause doubling from ``rebuild_retry_ms`` up to
  ``rebuild_retry_max_ms``, whatever Redis, Sentinel or PostgreSQL raise, until
  the owner serves, stops or is closed; the lease's upkeep starts another
  should none be running while the owner needs one.
- A flush refused by the fence, or the lease held by another owner: this
  owner stops at once (``on_stopped``) and answers nothing any more.

It must never apply a batch while STARTING or REBUILDING, never keep a core
whose changes failed to commit, and never write with a token the fence row
has moved past.
"""

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final

import asyncpg
import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from config.redis_client import redis_client
from config.redis_keys import NAMESPACE_DEFAULT, RedisKeys
from engine.core.clock import Clock
from engine.core.errors import InvariantViolation
from engine.core.policy import DomainPolicy
from engine.core.protocol import READ_ONLY_COMMANDS, BatchCodec
from engine.core.routing import PartitionSet
from engine.core.shard import ShardCore
from engine.shell import limits
from engine.shell.errors import ShardFailed, ShardUnreachable
from engine.shell.events import EventPublisher, PublisherStatistics
from engine.shell.lease import Renewal, ShardLease
from engine.shell.maintenance import MAINTENANCE_EVERY_DEFAULT_S, run_periodically
from engine.shell.owner_states import (
    OwnerEvent,
    OwnerState,
    OwnerTransitionRefused,
    next_owner_state,
)
from engine.shell.runtime import InDoubt, RuntimeStatistics, ShardRuntime, service_unavailable
from persistence import limits as storage_limits
from persistence.migrate import migrate_url
from persistence.partitioning import PartitioningError, ensure_partition_map
from persistence.store import (
    NotPartitioned,
    PartitionsMoved,
    ShardSnapshot,
    StaleToken,
    fence_token,
    hand_over,
    take_over,
    take_partitions,
)
from persistence.timings import (
    DATABASE_FENCE_READ,
    DATABASE_HAND_OVER,
    DATABASE_SHARD_LOAD,
    DATABASE_TAKE_PARTITIONS,
    Timings,
    TimingsSnapshot,
)
from persistence.writer import ShardWriter, StorageUnavailable, WriterStatistics

if TYPE_CHECKING:
    from engine.shell.tracing import Tracing

logger = logging.getLogger(__name__)

_REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
_READ_ONLY: Final = frozenset(READ_ONLY_COMMANDS)
_DATABASE_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# PostgreSQL is down, unreachable, shutting down, refuses connections, or is
# frozen past a timeout (the connection then broken under the client), as
# against refusing a statement (a safety net, a constraint) or fencing the
# owner off: the shard's state in memory is still right.
_UNREACHABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, _UNREACHABLE)


class StorageSettings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str
    redis_url: str
    relaxed: bool = False
    # Off only for the benches' commit-per-command baseline.
    group_commit: bool = True
    namespace: str = NAMESPACE_DEFAULT
    lease_ttl_ms: int = storage_limits.LEASE_TTL_MS
    lease_renew_every_ms: int = limits.LEASE_RENEW_EVERY_MS
    lease_margin_ms: int = limits.LEASE_DRIFT_MARGIN_MS
    lease_acquire_timeout_ms: int = limits.LEASE_ACQUIRE_TIMEOUT_MS
    rebuild_retry_ms: int = limits.REBUILD_RETRY_MS
    # The pause between reload attempts doubles from rebuild_retry_ms up to this.
    rebuild_retry_max_ms: int = limits.REBUILD_RETRY_MAX_MS
    # Committed events go to Redis pub/sub for the gateways' live subscribers.
    publish_events: bool = True
    # Each flush appends its notifiable events to the transactional outbox
    # (SLOTENGINE_NOTIFICATIONS; off: no notification of any kind leaves the engine
    # but over live connections).
    outbox: bool = True
    # The owner of shard 0 (one process in the whole engine, by its lease) runs
    # the reconciliation report and the retention purge this often; 0 turns it off.
    maintenance_every_s: float = MAINTENANCE_EVERY_DEFAULT_S
    # P for a database that has no partition map yet (None: PARTITIONS_DEFAULT);
    # a start normally records it first (persistence/partitioning.py).
    partitions: int | None = None
    # After PostgreSQL was unreachable, each hold whose deadline fell after the
    # shard's last commit lasts at least this long after the recovery
    # (SLOTENGINE_OUTAGE_HOLD_GRACE_SECONDS).
    outage_hold_grace_ms: int = limits.OUTAGE_HOLD_GRACE_DEFAULT_MS


class OwnerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    shard_id: int
    owner: str
    state: str
    token: int | None
    lease_valid_for_ms: int
    rebuilds: int
    stop_reason: str | None
    writer: WriterStatistics | None
    runtime: RuntimeStatistics | None
    events: PublisherStatistics | None = None
    # The partitions the owner serves (None until its first load), and the
    # generation of that set its flushes carry.
    partitions: int | None = None
    partitions_generation: int | None = None
    # Holds given grace after storage outages, since the owner started.
    outage_grace_holds: int = 0
    # The durations of its Redis and database work, its flushes' sizes and commit
    # lag, its connections' use (since the owner started).
    timings: TimingsSnapshot | None = None


class ShardOwner:
    def __init__(
        self,
        *,
        shard_id: int,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        clock: Clock,
        storage: StorageSettings,
        owner: str | None = None,
        succeeds: str = "",
        on_stopped: Callable[[str], None] | None = None,
        before_flush: Callable[[], Awaitable[None]] | None = None,
        fence_check: bool = True,
        tracing: "Tracing | None" = None,
    ) -> None:
        self.shard_id = shard_id
        # With tracing on: spans of its batches and flushes (engine/shell/tracing.py).
        self._tracing = tracing
        self._shard_count = shard_count
        self._policies = policies
        self._clock = clock
        self._storage = storage
        self.owner = owner or f"{secrets.token_hex(6)}"
        # Owner ids whose lease this owner takes at once (see ShardLease.acquire).
        self._succeeds = succeeds
        self._on_stopped = on_stopped
        self._before_flush = before_flush
        self._fence_check = fence_check
        self._codec = BatchCodec()
        self.state = OwnerState.STARTING
        self._redis: aioredis.Redis | None = None
        self._lease: ShardLease | None = None
        self._connection: asyncpg.Connection | None = None
        self._runtime: ShardRuntime | None = None
        self._writer: ShardWriter | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._rebuilder: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._publisher: EventPublisher | None = None
        self._rebuilds = 0
        self._stop_reason: str | None = None
        # The partitions served (None before the first load), and the generation
        # of that set its flushes carry.
        self._partitions: PartitionSet | None = None
        self._generation = 0
        # One live move at a time (release or adopt): each runs with the generation
        # the previous one left.
        self._moving = asyncio.Lock()
        # DEGRADED: what the frozen state's reads may not show.
        self._in_doubt: InDoubt | None = None
        # PostgreSQL was found unreachable since the last load: the next load gives
        # holds their grace (with the marker in Redis, for another owner's load).
        self._storage_lost = False
        self._outage_grace_holds = 0
        self._marker_cleared: asyncio.Task[None] | None = None
        self._marking: asyncio.Task[None] | None = None
        # Its own connection (the load's, then the writer's); shard 0's maintenance
        # opens another for a round.
        self._timings = Timings()
        self._timings.connections_max = 1
        self._fence_timing = self._timings.database(DATABASE_FENCE_READ)
        self._load_timing = self._timings.database(DATABASE_SHARD_LOAD)

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Bring the schema up to date, take the lease (waiting for a previous
        owner's to lapse) and load the shard."""
        # Idempotent and serialised by an advisory lock: every start may run it.
        applied = await migrate_url(self._storage.database_url)
        if applied:
            logger.info("shard %d applied migrations %s", self.shard_id, applied)
        # A Redis call fails fast and is not retried by the client (the lease's and
        # the publisher's loops try again themselves): the lease is judged by the
        # local clock, so a hung call must not outlast a renewal period.
        redis_timeout_s = limits.REDIS_CALL_TIMEOUT_MS / 1000
        self._redis = redis_client(
            self._storage.redis_url,
            socket_timeout=redis_timeout_s,
            socket_connect_timeout=redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        if self._storage.publish_events:
            self._publisher = EventPublisher(
                self._redis, self._storage.namespace, self.shard_id, self._timings
            )
        self._lease = ShardLease(
            self._redis,
            shard=self.shard_id,
            owner=self.owner,
            namespace=self._storage.namespace,
            ttl_ms=self._storage.lease_ttl_ms,
            margin_ms=self._storage.lease_margin_ms,
            timings=self._timings,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._storage.lease_acquire_timeout_ms / 1000
        while True:
            try:
                await self._load_with_new_lease()
                break
            except _DATABASE_ERRORS as exc:
                if _unreachable(exc):
                    await self._note_storage_lost()
                raise
            except _LeaseBusy:
                if loop.time() > deadline:
                    raise ShardUnreachable(
                        f"shard {self.shard_id}: another owner holds the lease"
                    ) from None
                await asyncio.sleep(self._storage.lease_renew_every_ms / 1000 / 4)
        self._renewer = loop.create_task(self._keep_lease(), name=f"lease-{self.shard_id}")
        if self.shard_id == 0 and self._storage.maintenance_every_s > 0:
            self._timings.connections_max += 1
            self._maintenance = loop.create_task(self._maintain(), name="maintenance")

    async def _maintain(self) -> None:
        """Reconciliation report and retention purge, every ``maintenance_every_s``."""
        every_s = self._storage.maintenance_every_s
        await asyncio.sleep(every_s)

        async def connect() -> asyncpg.Connection:
            # Its statements are bounded by the round's own timeout.
            return await asyncpg.connect(
                self._storage.database_url,
                timeout=storage_limits.DATABASE_CONNECT_TIMEOUT_MS / 1000,
            )

        await run_periodically(connect, every_s, timings=self._timings)

    async def close(self) -> None:
        """Flush what is pending, release the lease, and stop."""
        if self._renewer is not None:
            self._renewer.cancel()
        if self._rebuilder is not None:
            self._rebuilder.cancel()
        if self._maintenance is not None:
            self._maintenance.cancel()
        for chore in (self._marker_cleared, self._marking):
            if chore is not None:
                chore.cancel()
        if self._runtime is not None:
            self._runtime.close()
        if self._writer is not None:
            await self._writer.close()
        if self._publisher is not None:
            await self._publisher.close()
        if self._lease is not None and self.state is not OwnerState.STOPPED:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._lease.release()
        self._take(OwnerEvent.CLOSE)
        if self._connection is not None:
            with contextlib.suppress(*_DATABASE_ERRORS):
                await self._connection.close()
        if self._redis is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._redis.aclose()

    # -- serving --------------------------------------------------------------

    async def execute_batch(
        self, data: bytes, on_early: Callable[[bytes], None] | None = None
    ) -> bytes:
        """The batch's reply; ``on_early`` as in ``ShardRuntime.execute_batch``."""
        runtime = self._runtime
        if self.state is OwnerState.SERVING and runtime is not None:
            try:
                return await runtime.execute_batch(data, on_early)
            except StorageUnavailable as exc:
                # Applied, handed to a flush that failed: it may have committed all the same.
                return self._refuse_all(data, f"storage failed: {exc}", outcome_unknown=True)
        if self.state is OwnerState.DEGRADED and runtime is not None:
            return self._answer_degraded(runtime, data)
        if self.state is OwnerState.REBUILDING:
            return self._refuse_all(data, "the shard is reloading from storage")
        if self.state is OwnerState.STARTING:
            raise ShardUnreachable(f"shard {self.shard_id} is starting")
        raise ShardFailed(f"shard {self.shard_id} stopped: {self._stop_reason}")

    def _answer_degraded(self, runtime: ShardRuntime, data: bytes) -> bytes:
        """PostgreSQL is unreachable: reads from the frozen state, changes refused.
        Only while the lease holds: another owner may have taken the shard over."""
        lease = self._lease
        if lease is None or not lease.holds():
            return self._refuse_all(data, "the shard's lease could not be confirmed")
        in_doubt = self._in_doubt if self._in_doubt is not None else InDoubt(())
        return runtime.answer_frozen(
            data, in_doubt, "the shard's storage (PostgreSQL) is unreachable"
        )

    def statistics(self) -> OwnerStatistics:
        loaded = self._partitions
        return OwnerStatistics(
            shard_id=self.shard_id,
            owner=self.owner,
            state=self.state.value,
            token=self._lease.token if self._lease is not None else None,
            lease_valid_for_ms=self._lease.valid_for_ms if self._lease is not None else 0,
            rebuilds=self._rebuilds,
            stop_reason=self._stop_reason,
            writer=self._writer.statistics() if self._writer is not None else None,
            runtime=self._runtime.statistics() if self._runtime is not None else None,
            events=self._publisher.statistics() if self._publisher is not None else None,
            partitions=len(loaded.owned) if loaded is not None else None,
            partitions_generation=self._generation if loaded is not None else None,
            outage_grace_holds=self._outage_grace_holds,
            timings=self._timings.snapshot(),
        )

    def check_invariants(self) -> None:
        if self._runtime is not None and self.state is OwnerState.SERVING:
            self._runtime.check_invariants()

    @property
    def runtime(self) -> ShardRuntime | None:
        return self._runtime

    def _refuse_all(self, data: bytes, reason: str, *, outcome_unknown: bool = False) -> bytes:
        """503 to every command of a batch; with ``outcome_unknown``, its changes (not
        its reads) say that they may have been applied."""
        commands = self._codec.decode_batch(data)
        unavailable = service_unavailable(reason)
        if not outcome_unknown:
            return self._codec.encode_reply([unavailable] * len(commands))
        unknown = service_unavailable(reason, outcome_unknown=True)
        return self._codec.encode_reply(
            [unavailable if type(command) in _READ_ONLY else unknown for command in commands]
        )

    def _write_gate(self) -> str | None:
        lease = self._lease
        if lease is None or not lease.holds():
            return "the shard's lease could not be renewed (Redis unreachable)"
        writer = self._writer
        if writer is None or not writer.accepting:
            return "the shard's storage is behind or failing"
        return None

    # -- live moves -------------------------------------------------------------

    @property
    def partitions(self) -> PartitionSet | None:
        """The partitions this owner serves now (None before its first load)."""
        return self._partitions

    async def release(self, moves: Mapping[int, int]) -> list[int]:
        """Hand partitions over to other shards while serving the rest: the old
        owner's side of a live move. ``moves``: partition -> its new shard.

        The core forgets the partitions at once (their commands get 503
        ``partitionNotServed`` from now on), then, once every change of them
        handed to the writer has committed, ``hand_over`` reassigns them in the
        map and raises this shard's generation, on the writer's connection
        between two flushes. The new shards take them with ``adopt``. If that
        transaction fails, the writer fails and the owner reloads what the map
        says (with or without the partitions, as it committed or not). Returns
        the partitions handed over.
        """
        async with self._moving:
            runtime, writer, lease, served = self._serving()
            moving = frozenset(moves)
            if not moving <= served.owned:
                raise PartitioningError(
                    f"shard {self.shard_id} does not serve partitions"
                    f" {sorted(moving - served.owned)}"
                )
            if self.shard_id in moves.values():
                raise PartitioningError(f"shard {self.shard_id} cannot hand a partition to itself")
            if not moving:
                return []
            token, generation = lease.token, self._generation
            assert token is not None
            runtime.release_partitions(moving)
            self._partitions = PartitionSet(served.partitions, served.owned - moving)

            async def job(connection: asyncpg.Connection) -> int:
                with self._timings.database(DATABASE_HAND_OVER).time():
                    raised = await hand_over(
                        connection, self.shard_id, token, self.owner, generation, moves
                    )
                writer.set_generation(raised)
                return raised

            self._generation = await writer.exclusive(job)
            logger.info(
                "shard %d handed %d partitions over (generation %d): %s",
                self.shard_id,
                len(moving),
                self._generation,
                _ranges(moving),
            )
            return sorted(moving)

    async def adopt(self) -> list[int]:
        """Take the partitions the map gives this shard beyond those it serves: the
        new owner's side of a live move. Loads only those partitions
        (``take_partitions``, on the writer's connection between two flushes),
        merges them into the running core and re-arms their timers. Returns the
        partitions taken (none if the map gives it nothing new)."""
        async with self._moving:
            runtime, writer, lease, served = self._serving()
            token = lease.token
            assert token is not None
            now_ms = self._clock.now_ms()

            async def job(connection: asyncpg.Connection) -> ShardSnapshot:
                with self._timings.database(DATABASE_TAKE_PARTITIONS).time():
                    snapshot = await take_partitions(
                        connection, self.shard_id, token, self.owner, served, now_ms
                    )
                writer.set_generation(snapshot.generation)
                return snapshot

            # Its flushes wait meanwhile: a step moves a fraction of a shard's data.
            snapshot = await writer.exclusive(job, storage_limits.SHARD_LOAD_TIMEOUT_MS)
            self._generation = snapshot.generation
            added = snapshot.partitions.owned
            if not added:
                return []
            joined = PartitionSet(served.partitions, served.owned | added)
            runtime.adopt_partitions(
                joined,
                slots=snapshot.slots,
                bookings=snapshot.bookings,
                entries=snapshot.entries,
                keys=snapshot.keys,
                outcomes=snapshot.outcomes,
            )
            self._partitions = joined
            logger.info(
                "shard %d took %d partitions (generation %d): %s; %d slots, %d bookings,"
                " %d queue entries",
                self.shard_id,
                len(added),
                snapshot.generation,
                _ranges(added),
                len(snapshot.slots),
                len(snapshot.bookings),
                len(snapshot.entries),
            )
            return sorted(added)

    def _serving(self) -> tuple[ShardRuntime, ShardWriter, ShardLease, PartitionSet]:
        runtime, writer, lease, served = self._runtime, self._writer, self._lease, self._partitions
        if (
            self.state is not OwnerState.SERVING
            or runtime is None
            or writer is None
            or lease is None
            or lease.token is None
            or served is None
        ):
            raise ShardUnreachable(f"shard {self.shard_id} is not serving: no partition moves")
        return runtime, writer, lease, served

    # -- taking over and rebuilding ---------------------------------------------

    async def _load_with_new_lease(self) -> None:
        """Acquire the lease, then take the shard over from PostgreSQL. Raises _LeaseBusy."""
        assert self._lease is not None
        connection = await self._connect()
        with self._fence_timing.time():
            floor = await fence_token(connection, self.shard_id)
        token = await self._lease.acquire(floor, self._succeeds)
        if token is None:
            raise _LeaseBusy
        await self._load(token)

    async def _load(self, token: int) -> None:
        connection = await self._connect()
        storage_lost = self._storage_lost or await self._marked_storage_lost()
        try:
            try:
                snapshot = await self._take_over(connection, token)
            except NotPartitioned:
                # A database nobody has started on yet gets its partitions here (a start
                # normally records them first, with SLOTENGINE_PARTITIONS).
                await ensure_partition_map(
                    connection, partitions=self._storage.partitions, shard_count=self._shard_count
                )
                snapshot = await self._take_over(connection, token)
        except StaleToken as exc:
            # Redis forgot its counter: the next acquire starts above the fence.
            assert self._lease is not None
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._lease.release()
            self._lease.forget()
            raise _LeaseBusy from exc
        if self._lease is None or self._lease.token != token:
            # The lease was lost while the shard loaded (Redis lost the key in a
            # failover or a restart, and the renewal found it gone): serving now would
            # take no change ever again, nobody renewing a lease this owner forgot.
            # The next attempt takes a new one, above the fence this load wrote.
            raise _LeaseLost
        self._serve(snapshot, connection, storage_lost=storage_lost)

    async def _take_over(self, connection: asyncpg.Connection, token: int) -> ShardSnapshot:
        """``take_over``, timed, its connection counted in use meanwhile."""
        self._timings.connections_in_use += 1
        try:
            with self._load_timing.time():
                return await take_over(
                    connection, self.shard_id, token, self.owner, self._clock.now_ms()
                )
        finally:
            self._timings.connections_in_use -= 1

    def _serve(
        self, snapshot: ShardSnapshot, connection: asyncpg.Connection, *, storage_lost: bool = False
    ) -> None:
        # Refused, before anything is built, once the owner has stopped.
        next_owner_state(self.state, OwnerEvent.LOADED)
        # A DEGRADED owner's frozen state answered reads until now.
        self._drop_state()
        core = ShardCore(
            shard_id=self.shard_id,
            shard_count=self._shard_count,
            policies=self._policies,
            now_ms=self._clock.now_ms(),
            partitions=snapshot.partitions,
        )
        core.restore(
            slots=snapshot.slots,
            bookings=snapshot.bookings,
            entries=snapshot.entries,
            outcomes=snapshot.outcomes,
            keys=snapshot.keys,
        )
        graced = 0
        if storage_lost:
            # Holds whose deadline fell after the shard's last commit could not be
            # confirmed meanwhile: each lasts the grace after this load at least.
            # The transitions go to the writer with the first timer firing below.
            now_ms = core.now_ms
            since_ms = snapshot.committed_at_ms or 0
            graced = len(
                core.grant_grace(since_ms, now_ms + self._storage.outage_hold_grace_ms, now_ms)
            )
            self._outage_grace_holds += graced
        writer = ShardWriter(
            connection,
            shard=self.shard_id,
            token=snapshot.token,
            owner=self.owner,
            generation=snapshot.generation,
            relaxed=self._storage.relaxed,
            on_failed=self._on_storage_failed,
            on_fenced=self._on_fenced,
            before_flush=self._before_flush,
            fence_check=self._fence_check,
            group_commit=self._storage.group_commit,
            outbox=self._storage.outbox,
            on_committed=self._publisher.committed if self._publisher is not None else None,
            tracing=self._tracing,
            timings=self._timings,
        )
        runtime = ShardRuntime(
            core,
            shard_id=self.shard_id,
            clock=self._clock,
            sink=writer,
            on_fatal=self._on_core_failed,
            write_gate=self._write_gate,
            on_watched=self._publisher.watched if self._publisher is not None else None,
            tracing=self._tracing,
        )
        self._writer = writer
        self._runtime = runtime
        self._partitions = snapshot.partitions
        self._generation = snapshot.generation
        writer.start()
        runtime.start()
        self._take(OwnerEvent.LOADED)
        self._in_doubt = None
        if storage_lost:
            self._storage_lost = False
            if self._marker_cleared is not None:
                self._marker_cleared.cancel()
            self._marker_cleared = asyncio.get_running_loop().create_task(
                self._clear_storage_lost(writer), name=f"storage-lost-{self.shard_id}"
            )
            logger.warning(
                "shard %d: storage reachable again; %d holds given %d ms of grace",
                self.shard_id,
                graced,
                self._storage.outage_hold_grace_ms,
            )
        logger.info(
            "shard %d served by %s with token %d: %d partitions (generation %d), %d slots,"
            " %d bookings, %d queue entries",
            self.shard_id,
            self.owner,
            snapshot.token,
            len(snapshot.partitions.owned),
            snapshot.generation,
            len(snapshot.slots),
            len(snapshot.bookings),
            len(snapshot.entries),
        )

    async def _connect(self) -> asyncpg.Connection:
        connection = self._connection
        if connection is None or connection.is_closed():
            # Every statement on it is bounded: the flushes by the writer's timeout,
            # the load by its own, anything else (a BEGIN, a ROLLBACK) by this one.
            connection = await asyncpg.connect(
                self._storage.database_url,
                timeout=storage_limits.DATABASE_CONNECT_TIMEOUT_MS / 1000,
                command_timeout=storage_limits.DATABASE_STATEMENT_TIMEOUT_MS / 1000,
            )
            self._connection = connection
        return connection

    def _drop_state(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
        self._runtime = None
        writer, self._writer = self._writer, None
        if writer is not None:
            asyncio.get_running_loop().create_task(writer.close(flush=False))

    def _on_storage_failed(self, exc: BaseException) -> None:
        if _unreachable(exc):
            self._drop_connection()
            if self._degrade(exc):
                return
        self._reload_after(exc)

    def _reload_after(self, exc: BaseException) -> None:
        self._drop_connection()
        self._begin_rebuild(f"a flush failed: {exc!r}")

    def _drop_connection(self) -> None:
        # The connection may be mid-transaction or broken: the reload opens a new one.
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.terminate()

    def _degrade(self, exc: BaseException) -> bool:
        """PostgreSQL is unreachable: keep the state, frozen, for the reads that show
        only committed state, and reload. False if there is no state to keep."""
        runtime, writer = self._runtime, self._writer
        if self.state is not OwnerState.SERVING or runtime is None or writer is None:
            return False
        self._take(OwnerEvent.STORAGE_LOST)
        logger.error(
            "shard %d: PostgreSQL unreachable (%r); serving reads of committed state,"
            " refusing changes, deferring expiries, reloading",
            self.shard_id,
            exc,
        )
        runtime.freeze()
        self._in_doubt = InDoubt(writer.in_doubt)
        # Known before the reload below first looks (the marker in Redis follows).
        self._storage_lost = True
        # The failed writer stays (its statistics say what failed) until the reload.
        self._marking = asyncio.get_running_loop().create_task(
            self._note_storage_lost(), name=f"storage-lost-{self.shard_id}"
        )
        self._rebuilds += 1
        self._start_rebuilder()
        return True

    async def _note_storage_lost(self) -> None:
        """PostgreSQL was unreachable: the next load, this owner's or another's after a
        failover, gives holds their grace."""
        self._storage_lost = True
        if self._redis is None:
            return
        key = RedisKeys(self._storage.namespace).shard_storage_lost(self.shard_id)
        try:
            async with asyncio.timeout(limits.REDIS_CALL_TIMEOUT_MS / 1000):
                await self._redis.set(key, self._clock.now_ms(), nx=True)
        except _REDIS_ERRORS as exc:
            logger.warning("shard %d: could not mark the storage outage: %r", self.shard_id, exc)

    async def _marked_storage_lost(self) -> bool:
        if self._redis is None:
            return False
        key = RedisKeys(self._storage.namespace).shard_storage_lost(self.shard_id)
        try:
            async with asyncio.timeout(limits.REDIS_CALL_TIMEOUT_MS / 1000):
                return bool(await self._redis.exists(key))
        except _REDIS_ERRORS:
            return False

    async def _clear_storage_lost(self, writer: ShardWriter) -> None:
        """Once the grace given at a load has committed, the outage's marker goes."""
        try:
            await writer.wait_durable()
            assert self._redis is not None
            async with asyncio.timeout(limits.REDIS_CALL_TIMEOUT_MS / 1000):
                await self._redis.delete(
                    RedisKeys(self._storage.namespace).shard_storage_lost(self.shard_id)
                )
        except (StorageUnavailable, *_REDIS_ERRORS) as exc:
            # A failed flush marks the outage again; a lost delete only means a
            # later load looks for holds to give grace once more.
            logger.warning("shard %d: the outage's marker stays: %r", self.shard_id, exc)

    def _on_core_failed(self, exc: BaseException) -> None:
        self._begin_rebuild(f"the core raised {exc!r}")

    def _begin_rebuild(self, why: str) -> None:
        if not self._take(OwnerEvent.REBUILD):
            return
        logger.error("shard %d: %s; reloading from PostgreSQL", self.shard_id, why)
        self._drop_state()
        self._in_doubt = None
        self._rebuilds += 1
        self._start_rebuilder()

    def _start_rebuilder(self) -> None:
        # A DEGRADED owner that must drop its state keeps the reload it runs.
        if self._rebuilder is not None and not self._rebuilder.done():
            return
        self._rebuilder = asyncio.get_running_loop().create_task(
            self._rebuild(), name=f"rebuild-{self.shard_id}"
        )
        self._rebuilder.add_done_callback(self._rebuild_ended)

    def _rebuild_ended(self, task: "asyncio.Task[None]") -> None:
        # The reload returns once the owner serves or stops; anything else that ended
        # it is said here (the lease's upkeep starts another, see _keep_reloading).
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("shard %d: the reload ended: %r", self.shard_id, exc)

    def _keep_reloading(self) -> None:
        """An owner that is not STOPPED gets its shard back, whatever ended a reload:
        REBUILDING or DEGRADED, a reload runs; SERVING, it holds a lease."""
        rebuilding = self._rebuilder is not None and not self._rebuilder.done()
        if rebuilding or self.state is OwnerState.STOPPED:
            return
        lease = self._lease
        if self.state is OwnerState.SERVING and lease is not None and lease.token is None:
            self._begin_rebuild("the lease was lost")
        elif self.state in (OwnerState.REBUILDING, OwnerState.DEGRADED):
            logger.error("shard %d: no reload was running; starting one", self.shard_id)
            self._start_rebuilder()

    def _retry_after_s(self, attempt: int) -> float:
        """The pause after the ``attempt``-th failed reload: doubling from
        ``rebuild_retry_ms`` up to ``rebuild_retry_max_ms``, less up to a quarter
        at random (owners of many shards do not retry in step)."""
        first_ms = self._storage.rebuild_retry_ms
        most_ms = max(first_ms, self._storage.rebuild_retry_max_ms)
        pause_ms: int = min(most_ms, first_ms << min(attempt - 1, 30))
        return pause_ms * random.uniform(0.75, 1.0) / 1000

    async def _rebuild(self) -> None:
        """Reload the shard until it serves, the owner stops, or it is closed: any
        error of Redis, Sentinel or PostgreSQL, or any other, is retried with backoff."""
        attempt = 0
        while self.state in (OwnerState.REBUILDING, OwnerState.DEGRADED):
            try:
                lease = self._lease
                assert lease is not None
                # A new token even while the lease holds: a flush of the dropped state
                # may still be running in PostgreSQL (one that timed out may yet
                # commit), and the fence must refuse it rather than let it land
                # after the reload, unseen by the reloaded state.
                token = None
                if lease.token is not None and lease.holds():
                    token = await lease.advance()
                if token is None:
                    await self._load_with_new_lease()
                else:
                    await self._load(token)
                return
            except _LeaseLost:
                logger.warning(
                    "shard %d: the lease was lost while the shard loaded; taking it again",
                    self.shard_id,
                )
            except _LeaseBusy:
                if not await self._lease_free_or_mine():
                    self._stop("another owner holds the shard's lease")
                    return
            except (*_DATABASE_ERRORS, *_REDIS_ERRORS) as exc:
                logger.warning("shard %d: reload failed: %r", self.shard_id, exc)
                if (
                    _unreachable(exc)
                    and not isinstance(exc, redis.exceptions.RedisError)
                    and not self._storage_lost
                ):
                    await self._note_storage_lost()
                self._drop_connection()
            except (PartitioningError, NotPartitioned) as exc:
                logger.warning("shard %d: reload failed: %s", self.shard_id, exc)
            except InvariantViolation as exc:
                # The database itself holds contradicting records: nothing to serve.
                self._stop(f"stored state breaks an invariant: {exc}")
                return
            except OwnerTransitionRefused:
                # The owner stopped while the reload ran: it never serves again (the
                # loop's condition ends it).
                pass
            except Exception as exc:
                # Whatever else a client raised: the owner keeps trying, it is never
                # left without a reload.
                logger.exception("shard %d: reload failed: %r", self.shard_id, exc)
                self._drop_connection()
            attempt += 1
            await asyncio.sleep(self._retry_after_s(attempt))

    async def _lease_free_or_mine(self) -> bool:
        assert self._lease is not None
        try:
            holder = await self._lease.holder()
        except _REDIS_ERRORS:
            return True  # unknown yet: keep trying
        return holder is None or holder in (self.owner, self.owner.encode())

    def _on_fenced(self, exc: BaseException) -> None:
        if isinstance(exc, PartitionsMoved):
            # Still this shard's owner: it reloads the partitions the map gives it now.
            self._reload_after(exc)
            return
        self._stop(f"fenced off: {exc}")

    def _stop(self, reason: str) -> None:
        if not self._take(OwnerEvent.STOP):
            return
        logger.critical("shard %d owner %s stops: %s", self.shard_id, self.owner, reason)
        self._stop_reason = reason
        self._drop_state()
        if self._lease is not None:
            self._lease.forget()
        if self._renewer is not None:
            self._renewer.cancel()
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self._on_stopped is not None:
            self._on_stopped(reason)

    def _take(self, event: OwnerEvent) -> bool:
        """Move along the owner's table (``OwnerTransitionRefused`` off it); False for a
        late event, which changes nothing."""
        following = next_owner_state(self.state, event)
        if following is None:
            return False
        self.state = following
        return True

    # -- the lease ----------------------------------------------------------------

    def pause_lease_renewal(self) -> None:
        """Stop renewing the lease, as a paused process would (fault tests only)."""
        if self._renewer is not None:
            self._renewer.cancel()

    async def _keep_lease(self) -> None:
        lease = self._lease
        assert lease is not None
        while self.state is not OwnerState.STOPPED:
            await asyncio.sleep(self._storage.lease_renew_every_ms / 1000)
            try:
                await self._renew(lease)
                self._keep_reloading()
            except Exception as exc:
                # The renewals go on whatever one of them raised.
                logger.exception("shard %d: lease upkeep failed: %r", self.shard_id, exc)

    async def _renew(self, lease: ShardLease) -> None:
        token = lease.token
        if token is None:
            return  # a reload is taking a new lease (_keep_reloading makes sure)
        try:
            renewal = await lease.renew()
        except _REDIS_ERRORS as exc:
            logger.warning("shard %d: lease renewal failed: %r", self.shard_id, exc)
            return
        if lease.token != token:
            return  # a reload took a new lease meanwhile: the answer was of the old one
        if renewal is Renewal.TAKEN:
            self._stop("another owner took the shard's lease")
        elif renewal is Renewal.LAPSED:
            # Nobody holds it, but someone may have held it meanwhile: reload (a
            # reload in progress does not serve under the lease forgotten here).
            lease.forget()
            self._begin_rebuild("the lease lapsed")


class _LeaseBusy(Exception):
    """Another owner holds the lease (or the token was stale): try again later."""


class _LeaseLost(_LeaseBusy):
    """The lease a load ran under was lost before it could serve: take a new one."""


def _ranges(partitions: frozenset[int]) -> str:
    """``0-3,7,9-10``: a set of partitions for a log line."""
    spans: list[list[int]] = []
    for partition in sorted(partitions):
        if spans and spans[-1][1] == partition - 1:
            spans[-1][1] = partition
        else:
            spans.append([partition, partition])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "-"
