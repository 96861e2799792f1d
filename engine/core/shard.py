"""One shard of the engine: many slots, their holds, bookings, queues and timers.

Theory of operation
-------------------
``ShardCore`` is the single writer of its slots. ``execute(command, now_ms)``
first fires every timer due at ``now_ms`` (so a hold whose deadline passed is
EXPIRED before anyone can confirm it), then decides the command. Each handler
does all of its checks before its first mutation: a refused command raises an
``EngineError``, which ``execute`` turns into a ``Failure`` result with the
state untouched. The refusals a storm produces by the thousand (a full queue,
leaving a queue one is not in) are returned as ``Failure`` values instead:
raising costs more than granting a hold, most of all in the compiled build.
Successful changes append events to an outbox that the shell drains
(``drain_events``) and hands to storage and the fan-out bus.

Capacity frees when a hold expires, a booking is cancelled, capacity is
raised or a slot is unblocked; ``_offer_free_capacity`` then pops the head of
the slot's waiting line and gives that user a hold with the domain's claim
TTL, as long as the slot takes holds and has room. New arrivals never
overtake waiting users: a reserve only gets a fresh hold when nobody waits.

A shard serves a set of partitions (``self.partitions``), and partitions move
between shards live: ``release`` forgets a partition's slots, bookings, lines,
timers and idempotency keys without an event (storage keeps them), and
``adopt`` merges a partition's stored records into the running state the way
``restore`` loads a whole shard (restore is an adopt into an empty core).

Every state-changing request id's outcome is remembered for a while, so a
batch retried after an actor failure returns its first results instead of
applying twice. Client idempotency keys are remembered per (user, command,
key) with a fingerprint of the command for 24 h.

What lives beside this module, each owning one part of the shard:
  * ``engine/core/remembered.py``: the request-outcome and idempotency memory;
  * ``engine/core/fingerprint.py``: what "the same request" is for a key;
  * ``engine/core/slot_state.py``: a slot's mutable state and count check;
  * ``engine/core/slot_admin.py``: the slots' index and the rules of creating,
    changing, deleting and listing them;
  * ``engine/core/views.py``: the slot and queue views replies carry;
  * ``engine/core/invariants.py``: every invariant, checked in full.
This module keeps the single writer's command dispatch and what every command
shares: the booking and queue handlers, the timers, and the steps they all
call (holds, expiries, cancellations, offers, transitions, events). It is
longer than the ~600 lines a module should be because those steps are one
unit: they change the same indexes (bookings, a slot's counts, its line) and
emit their events in the order replies and subscribers rely on, and each one
calls the others. Spread over modules they would either reach into this
class's private state from outside or cost an extra indirection on every
command of the compiled hot path.

It must never read a clock, wait, or touch the disk or the network (the time
comes in as ``now_ms``; ``tests/engine/core/test_purity.py`` and an import
contract hold the core so), never mutate a shard before a command's last
check, and never apply a state-changing request twice while its outcome is
remembered.
"""

import os
import random
import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar, cast

import msgspec
from msgspec import UNSET

from engine.core import errors
from engine.core.errors import EngineError, InvariantViolation, require
from engine.core.fingerprint import fingerprint
from engine.core.invariants import check_invariants
from engine.core.limits import (
    ENDED_SLOT_RETENTION_MS,
    FINAL_BOOKING_RETENTION_MS,
    IDEMPOTENCY_RETENTION_MS,
    LIST_LIMIT_MAX,
)
from engine.core.policy import DomainPolicy
from engine.core.protocol import (
    NOT_SERVED_DETAIL,
    READ_ONLY_COMMANDS,
    ROUTING_FIELD,
    AnyCommand,
    AnyEvent,
    AnyResult,
    AttemptRefused,
    BookingChanged,
    BookingPage,
    BookingResult,
    Cancel,
    Confirm,
    CreateSlot,
    DeleteSlot,
    Done,
    ExtendHold,
    Failure,
    GetBooking,
    GetSlot,
    JoinQueue,
    KeyRecord,
    LeaveQueue,
    ListBookings,
    ListSlots,
    Origin,
    OutcomeRecord,
    QueueChanged,
    QueueMoved,
    QueuePosition,
    QueueResult,
    ReleaseHold,
    Reserve,
    SlotChanged,
    SlotPage,
    SlotResult,
    TouchWaiting,
    UpdateSlot,
)
from engine.core.records import Booking, QueueEntry, ShardStatistics, SlotView, StoredSlot
from engine.core.remembered import RequestMemory
from engine.core.routing import (
    PartitionSet,
    outcome_partition,
    partition_of,
    partition_of_resource,
)
from engine.core.slot_admin import SlotDirectory
from engine.core.slot_state import SlotState, TimerKey
from engine.core.states import (
    BOOKING_FINAL,
    SLOT_TAKES_HOLDS,
    BookingEvent,
    BookingStatus,
    QueueEvent,
    QueueStatus,
    next_booking_status,
    next_queue_status,
)
from engine.core.storable import command_problems
from engine.core.timer_wheel import TimerWheel
from engine.core.views import queue_view, slot_view, wait_per_place_ms

SYSTEM: Final = "system"
# A booking id's unique part: 128 random bits, drawn for this many bookings at a time.
BOOKING_ID_UNIQUE_BYTES: Final = 16
BOOKING_IDS_PER_DRAW: Final = 256

_R = TypeVar("_R", Booking, QueueEntry)


_READ_ONLY: Final[frozenset[type[Any]]] = frozenset(READ_ONLY_COMMANDS)
# The records and results the core builds, bound once for the same reason.
_BookingResult: Final = BookingResult
_QueueResult: Final = QueueResult
_BookingChanged: Final = BookingChanged
_QueueChanged: Final = QueueChanged
_QueueMoved: Final = QueueMoved
_SlotChanged: Final = SlotChanged
_Failure: Final = Failure
_AttemptRefused: Final = AttemptRefused
_OutcomeRecord: Final = OutcomeRecord
_Booking: Final = Booking
_QueueEntry: Final = QueueEntry
_Done: Final = Done
_SlotResult: Final = SlotResult
# The command kinds, bound once: a compiled build reads a Final as a constant,
# where an imported name is a lookup in the module's dict on every use.
_RESERVE: Final = Reserve
_CONFIRM: Final = Confirm
_QUEUE_POSITION: Final = QueuePosition
_CANCEL: Final = Cancel
_GET_BOOKING: Final = GetBooking
_JOIN_QUEUE: Final = JoinQueue
_GET_SLOT: Final = GetSlot
_LEAVE_QUEUE: Final = LeaveQueue
_LIST_BOOKINGS: Final = ListBookings
_LIST_SLOTS: Final = ListSlots
_CREATE_SLOT: Final = CreateSlot
_UPDATE_SLOT: Final = UpdateSlot
_DELETE_SLOT: Final = DeleteSlot
_EXTEND_HOLD: Final = ExtendHold
_RELEASE_HOLD: Final = ReleaseHold
_TOUCH_WAITING: Final = TouchWaiting
# Bound once: a compiled build reads a Final as a constant, where
# ``msgspec.structs.replace`` would be two attribute lookups per call.
_replace: Final = msgspec.structs.replace


class ShardCore:
    def __init__(
        self,
        *,
        shard_id: int,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        now_ms: int,
        id_seed: str | None = None,
        new_unique: Callable[[], str] | None = None,
        partitions: PartitionSet | None = None,
    ) -> None:
        """``partitions``: the ones this shard serves (by default partition
        ``shard_id`` of ``shard_count``, one per shard)."""
        require(0 <= shard_id < shard_count, "shard id out of range")
        require("default" in policies, "the default domain must exist")
        self.shard_id = shard_id
        self.shard_count = shard_count
        self.partitions = (
            PartitionSet.single(shard_id, shard_count) if partitions is None else partitions
        )
        self._policies = dict(policies)
        # The unique part of a booking id: 128 random bits from the operating
        # system's generator, drawn a block of BOOKING_IDS_PER_DRAW at a time (a
        # system call per block, not per booking). Unique across restarts and
        # shards, and unguessable: one's own booking ids tell nothing of the
        # next. (``id_seed`` draws from a seeded generator instead, so that
        # replays name bookings alike; ``new_unique`` replaces the scheme, for tests.)
        self._draw_random: Callable[[int], bytes] = (
            os.urandom if id_seed is None else random.Random(id_seed).randbytes
        )
        self._id_block = b""
        self._id_block_at = 0
        self._new_unique = new_unique
        # Names this incarnation in slot views and queue moves: after a restart,
        # live subscribers see another epoch and read their state afresh.
        self._epoch = secrets.token_hex(6)
        self._now_ms = now_ms
        self._timers: TimerWheel[TimerKey] = TimerWheel(now_ms)
        self._directory = SlotDirectory(
            partitions=self.partitions, policies=self._policies, timers=self._timers
        )
        # The directory's own dict, read on every command without going through it.
        self._slots = self._directory.slots
        self._bookings: dict[str, Booking] = {}
        self._bookings_by_user: dict[str, set[str]] = {}
        self._memory = RequestMemory()
        # request id -> first result: the memory's own dict, read on every change.
        self._outcomes = self._memory.outcomes
        self._events: list[AnyEvent] = []
        # For the audit only (``drain_audit``): origins by request id, refused attempts.
        self._origins: dict[str, Origin] = {}
        self._refused: list[AttemptRefused] = []
        # Set by a read that a live watch follows (``watch=True``), cleared by
        # the host once it has told its event publisher to publish again.
        self.watched = False
        # The slots changed since the last drain, each once, in order of first change.
        self._dirty_slots: list[SlotState] = []
        self._commands_total = 0
        self._failures_total = 0
        self._replays_total = 0
        self._events_total = 0
        self._expirations_total = 0
        self._offers_total = 0
        self._timer_handlers: dict[str, Callable[[TimerKey, int], None]] = {
            "hold": self._on_hold_deadline,
            "end": self._on_slot_end,
            "idle": self._on_queue_idle,
            "forget-booking": self._on_forget_booking,
            "forget-slot": self._on_forget_slot,
        }

    # == the shell's interface ==================================================

    def execute(self, command: AnyCommand, now_ms: int) -> AnyResult:
        """Decide one command at ``now_ms``; never raises for a refused command."""
        if now_ms != self._now_ms:
            self.advance(now_ms)
            # Decide at the shard's time: a caller's clock that lags must not
            # give birth to a hold whose deadline has already passed.
            now_ms = self._now_ms
        self._commands_total += 1
        if type(command) in _READ_ONLY:
            return self._decide(command, now_ms)
        problems = command_problems(command)
        if problems is not None:
            # Refused before it is applied or remembered: its request id or key
            # may be the very value the database would refuse in the flush.
            return self._refuse(
                errors.ValidationFailed, f"cannot be stored: {', '.join(problems)}", problems
            )
        request_id = command.request_id
        prior = self._outcomes.get(request_id)
        if prior is not None:
            self._replays_total += 1
            return prior
        key = getattr(command, "idempotency_key", None)
        if key is not None:
            replays = self._replays_total
            result = self._execute_with_key(command, key, now_ms)
            replayed = replays != self._replays_total
        else:
            result = self._decide(command, now_ms)
            replayed = False
        if type(result) is _Failure:
            if NOT_SERVED_DETAIL in result.details:
                return result  # applied nothing: a resend to the right shard must not replay it
            kind = type(command)
            if (kind is _RESERVE or kind is _JOIN_QUEUE) and result.status < 500 and not replayed:
                self._refused.append(
                    _AttemptRefused(now_ms, cast(Reserve | JoinQueue, command), result.code)
                )
        else:
            origin = command.origin
            if origin is not UNSET:
                self._origins[request_id] = origin
        self._memory.remember_outcome(request_id, result, now_ms)
        return result

    def _execute_with_key(self, command: AnyCommand, key: str, now_ms: int) -> AnyResult:
        """The client's Idempotency-Key: the first outcome per (user, command, key) stands."""
        scope = (getattr(command, "user_id", ""), type(command).__name__, key)
        request_fingerprint = fingerprint(command)
        stored = self._memory.keys.get(scope)
        if stored is not None and stored[0] + IDEMPOTENCY_RETENTION_MS > now_ms:
            if stored[1] != request_fingerprint:
                # The key's record may be of a partition served here while this
                # command's is not: then its own shard decides, after a resend.
                return self._not_served(command) or self._refusal(
                    errors.IdempotencyKeyReused(
                        "this Idempotency-Key was used for a different request"
                    )
                )
            self._replays_total += 1
            return stored[2]
        result = self._decide(command, now_ms)
        if result.status < 500:
            # The record moves with the partition of the command's routing id.
            partition = -1
            field = ROUTING_FIELD.get(type(command))
            if field is not None:
                routed = partition_of(getattr(command, field), self.partitions.partitions)
                if routed is not None:
                    partition = routed
            self._memory.remember_key(
                scope, request_fingerprint, result, now_ms, partition=partition
            )
        return result

    def _decide(self, command: AnyCommand, now_ms: int) -> AnyResult:
        """Run the command's handler; a refused command becomes a ``Failure``.

        The kinds are tested most frequent first, so that a compiled build calls
        each handler directly, where a table of bound methods would be a
        generic call every time.
        """
        kind = type(command)
        try:
            if kind is _RESERVE:
                return self._reserve(cast(Reserve, command), now_ms)
            if kind is _CONFIRM:
                return self._confirm(cast(Confirm, command), now_ms)
            if kind is _QUEUE_POSITION:
                return self._queue_position(cast(QueuePosition, command), now_ms)
            if kind is _CANCEL:
                return self._cancel(cast(Cancel, command), now_ms)
            if kind is _GET_BOOKING:
                return self._get_booking(cast(GetBooking, command), now_ms)
            if kind is _JOIN_QUEUE:
                return self._join_queue(cast(JoinQueue, command), now_ms)
            if kind is _GET_SLOT:
                return self._get_slot(cast(GetSlot, command), now_ms)
            if kind is _LEAVE_QUEUE:
                return self._leave_queue(cast(LeaveQueue, command), now_ms)
            if kind is _LIST_BOOKINGS:
                return self._list_bookings(cast(ListBookings, command), now_ms)
            if kind is _LIST_SLOTS:
                return self._list_slots(cast(ListSlots, command), now_ms)
            if kind is _CREATE_SLOT:
                return self._create_slot(cast(CreateSlot, command), now_ms)
            if kind is _UPDATE_SLOT:
                return self._update_slot(cast(UpdateSlot, command), now_ms)
            if kind is _DELETE_SLOT:
                return self._delete_slot(cast(DeleteSlot, command), now_ms)
            if kind is _TOUCH_WAITING:
                return self._touch_waiting(cast(TouchWaiting, command), now_ms)
            if kind is _EXTEND_HOLD:
                return self._extend_hold(cast(ExtendHold, command), now_ms)
            if kind is _RELEASE_HOLD:
                return self._release_hold(cast(ReleaseHold, command), now_ms)
        except EngineError as refused:
            return self._not_served(command) or self._refusal(refused)
        raise TypeError(f"not a command: {kind.__name__}")

    def _not_served(self, command: AnyCommand) -> Failure | None:
        """A 503 for a command about a partition this shard does not serve (its
        sender's partition map is older than this shard's), else None. Asked only
        on the way to a refusal, so the commands served pay nothing for it."""
        field = ROUTING_FIELD.get(type(command))
        if field is not None:
            partition = partition_of(getattr(command, field), self.partitions.partitions)
        elif type(command) is ListSlots and command.resource_id is not None:
            partition = partition_of_resource(command.resource_id, self.partitions.partitions)
        else:
            return None
        if partition is None or partition in self.partitions.owned:
            return None
        self._failures_total += 1
        return _Failure(
            status=errors.ServiceUnavailable.status,
            code=errors.ServiceUnavailable.code,
            message=f"partition {partition} is not served by shard {self.shard_id}",
            details={NOT_SERVED_DETAIL: partition},
        )

    def _refusal(self, refused: EngineError) -> Failure:
        return self._refuse(type(refused), refused.message, refused.details)

    def _refuse(
        self, kind: type[EngineError], message: str, details: dict[str, Any] | None = None
    ) -> Failure:
        """The ``Failure`` that raising ``kind`` would give, without building an exception."""
        self._failures_total += 1
        return _Failure(status=kind.status, code=kind.code, message=message, details=details or {})

    def advance(self, now_ms: int) -> None:
        """Fire every timer due at ``now_ms`` (expiries, offers, slot ends)."""
        # A clock that steps back must not un-expire anything.
        now_ms = max(now_ms, self._now_ms)
        self._now_ms = now_ms
        for key in self._timers.advance(now_ms):
            self._timer_handlers[key[0]](key, now_ms)

    def next_deadline_ms(self) -> int | None:
        return self._timers.next_wakeup_ms()

    def drain_events(self) -> list[AnyEvent]:
        if self._dirty_slots:
            now_ms = self._now_ms
            for slot in self._dirty_slots:
                # A slot dropped since it changed is no longer dirty.
                if slot.dirty:
                    slot.dirty = False
                    self._emit(
                        _SlotChanged(
                            at_ms=now_ms,
                            request_id="",
                            actor=SYSTEM,
                            slot=slot_view(slot, now_ms, self._epoch),
                            change="counts",
                        )
                    )
            self._dirty_slots = []
        events, self._events = self._events, []
        return events

    def drain_remembered(self) -> tuple[list[OutcomeRecord], list[KeyRecord]]:
        """Request outcomes and idempotency records remembered since the last call."""
        return self._memory.drain()

    def drain_audit(self) -> tuple[dict[str, Origin] | None, list[AttemptRefused] | None]:
        """What storage audits beside the events, since the last call (None: nothing):
        the origins of the changes that carried one, by request id, and the
        reservation attempts refused. Never part of an event: not published."""
        origins: dict[str, Origin] | None = None
        refused: list[AttemptRefused] | None = None
        if self._origins:
            origins, self._origins = self._origins, {}
        if self._refused:
            refused, self._refused = self._refused, []
        return origins, refused

    @property
    def now_ms(self) -> int:
        """The shard's time: the latest ``now_ms`` it advanced to."""
        return self._now_ms

    def grant_grace(self, since_ms: int, until_ms: int, now_ms: int) -> list[Booking]:
        """Holds and queue offers whose deadline fell while the shard could not commit
        (after ``since_ms``) last at least until ``until_ms``: the outage's grace.

        Each one moved is a RESERVED -> RESERVED transition with the trigger
        ``outage_grace`` (a new version, an audit row); it does not count as one of
        the user's extensions. A hold of a slot that has ended by ``now_ms`` is
        left to the slot's end. Called on a freshly restored core, before the
        deadlines already past fire. Returns the bookings extended.
        """
        extended: list[Booking] = []
        slots = self._slots
        for booking in self._bookings.values():
            if booking.status is not BookingStatus.RESERVED:
                continue
            if not since_ms < booking.expires_at_ms < until_ms:
                continue
            if slots[booking.slot_id].end_ms <= now_ms:
                continue
            to_status = next_booking_status(booking.status, BookingEvent.EXTEND)
            booking.expires_at_ms = until_ms
            self._timers.schedule(("hold", booking.id), until_ms)
            extended.append(
                self._transition(booking, to_status, "outage_grace", now_ms, "", SYSTEM)
            )
        return extended

    def restore(
        self,
        *,
        slots: Iterable[StoredSlot],
        bookings: Iterable[Booking],
        entries: Iterable[QueueEntry],
        outcomes: Iterable[OutcomeRecord] = (),
        keys: Iterable[KeyRecord] = (),
    ) -> None:
        """Rebuild the state storage kept, into a core that has executed nothing yet.

        Every deadline is re-armed from the stored records; the ones already
        past fire on the next ``advance`` or ``execute``, as if the shard had
        never stopped. Waiting users count as seen at the restore (position
        polls are not stored), so an outage never times anyone out of a queue.
        A slot whose domain is no longer configured keeps its domain name and
        follows the default policy. Raises ``InvariantViolation`` on records
        that contradict each other (two active bookings of one user, a NOTIFIED
        entry without its hold, more bookings than capacity).
        """
        require(
            not self._slots and not self._bookings and not self._outcomes,
            "restore into a core that already has state",
        )
        self._load(self.partitions.owned, list(slots), list(bookings), list(entries))
        self._memory.restore(outcomes, keys)

    def release(self, partitions: frozenset[int]) -> None:
        """Stop serving ``partitions``: forget their slots, bookings, queues, timers
        and idempotency keys, as if they had never been loaded here.

        Nothing changes durably (storage keeps all of it for the shard that
        adopts them), so no event is emitted, and none may be pending: the host
        drains first. Request outcomes stay (they are keyed by request id alone).
        Commands about these partitions get the 503 of a partition not served.
        """
        owned = self.partitions.owned
        require(
            partitions <= owned, f"release of partitions not served: {sorted(partitions - owned)}"
        )
        require(not self._events and not self._dirty_slots, "release with events not drained")
        count = self.partitions.partitions
        timers = self._timers
        for booking in [
            b for b in self._bookings.values() if partition_of(b.slot_id, count) in partitions
        ]:
            timers.cancel(("hold", booking.id))
            timers.cancel(("forget-booking", booking.id))
            del self._bookings[booking.id]
            user_ids = self._bookings_by_user[booking.user_id]
            user_ids.discard(booking.id)
            if not user_ids:
                del self._bookings_by_user[booking.user_id]
        for slot in [s for s in self._slots.values() if partition_of(s.id, count) in partitions]:
            timers.cancel(("end", slot.id))
            timers.cancel(("forget-slot", slot.id))
            self._directory.drop(slot)
        self._memory.forget_keys(partitions)
        self._serve(PartitionSet(count, owned - partitions))

    def adopt(
        self,
        partitions: PartitionSet,
        *,
        slots: Iterable[StoredSlot],
        bookings: Iterable[Booking],
        entries: Iterable[QueueEntry],
        keys: Iterable[KeyRecord] = (),
        outcomes: Iterable[OutcomeRecord] = (),
    ) -> None:
        """Start serving ``partitions`` (the new full set: more of the same P), merging
        the stored records of the partitions it adds into the running state.

        The records are loaded as ``restore`` loads them (deadlines re-armed,
        past ones firing on the next ``advance``, waiting users seen now); the
        state of the partitions served already is left as it is. Every record
        must belong to an added partition, else ``InvariantViolation`` and
        nothing changes. ``outcomes``: the request outcomes of the added
        partitions their previous shard remembered lately (``outcome_partition``
        names theirs), so that a change resent across the move gets its first
        answer.
        """
        current = self.partitions
        require(
            partitions.partitions == current.partitions,
            f"adopt of {partitions.partitions} partitions by a shard of {current.partitions}",
        )
        require(current.owned <= partitions.owned, "adopt must not drop served partitions")
        added = partitions.owned - current.owned
        count = current.partitions
        slot_list = list(slots)
        booking_list = list(bookings)
        entry_list = list(entries)
        key_list = list(keys)
        for stored in slot_list:
            require(partition_of(stored.id, count) in added, f"slot {stored.id} not adopted")
        for booking in booking_list:
            require(
                partition_of(booking.slot_id, count) in added, f"booking {booking.id} not adopted"
            )
        for entry in entry_list:
            require(
                partition_of(entry.slot_id, count) in added,
                f"queue entry of {entry.slot_id} not adopted",
            )
        for key in key_list:
            require(key.partition in added, f"idempotency key of partition {key.partition}")
        outcome_list = list(outcomes)
        for outcome in outcome_list:
            of = outcome_partition(outcome.result, count)
            require(of in added, f"request outcome {outcome.request_id} of partition {of}")
        self._serve(partitions)
        self._load(added, slot_list, booking_list, entry_list)
        self._memory.merge_keys(key_list)
        self._memory.merge_outcomes(outcome_list, self._now_ms)

    def _serve(self, partitions: PartitionSet) -> None:
        self.partitions = partitions
        self._directory.serve(partitions)

    def _load(
        self,
        partitions: frozenset[int],
        slots: list[StoredSlot],
        bookings: list[Booking],
        entries: list[QueueEntry],
    ) -> None:
        """Merge stored records of ``partitions``, none of them loaded yet, into the state."""
        now_ms = self._now_ms
        count = self.partitions.partitions
        loaded: list[SlotState] = []
        for stored in slots:
            require(
                partition_of(stored.id, count) in partitions and stored.id not in self._slots,
                f"slot {stored.id} loaded twice or misrouted",
            )
            loaded.append(self._directory.restore(stored))
        for stored_booking in bookings:
            booking = _copy(stored_booking)
            slot = self._slots.get(booking.slot_id)
            require(slot is not None, f"booking {booking.id} of an unknown slot")
            assert slot is not None
            require(booking.id not in self._bookings, f"booking {booking.id} loaded twice")
            self._bookings[booking.id] = booking
            self._bookings_by_user.setdefault(booking.user_id, set()).add(booking.id)
            status = booking.status
            if status is BookingStatus.RESERVED or status is BookingStatus.CONFIRMED:
                require(
                    booking.user_id not in slot.active_by_user,
                    f"slot {slot.id}: two active bookings of {booking.user_id}",
                )
                slot.active_by_user[booking.user_id] = booking
                if status is BookingStatus.RESERVED:
                    slot.held += 1
                    self._timers.schedule(("hold", booking.id), booking.expires_at_ms)
                else:
                    slot.confirmed += 1
                slot.check_counts()
            else:
                require(status in BOOKING_FINAL, f"booking {booking.id} stored as {status}")
                final_ms = max(
                    booking.completed_at_ms or 0,
                    booking.cancelled_at_ms or 0,
                    booking.expires_at_ms if status is BookingStatus.EXPIRED else 0,
                )
                self._timers.schedule(
                    ("forget-booking", booking.id), final_ms + FINAL_BOOKING_RETENTION_MS
                )
        for stored_entry in sorted(entries, key=lambda e: e.seq):
            entry = _copy(stored_entry)
            entry_slot = self._slots.get(entry.slot_id)
            require(
                entry_slot is not None and partition_of(entry.slot_id, count) in partitions,
                f"queue entry of an unknown slot {entry.slot_id}",
            )
            assert entry_slot is not None
            slot = entry_slot
            slot.line.skip_past(entry.seq)
            slot.entries[entry.user_id] = entry
            if entry.status is QueueStatus.WAITING:
                entry.last_seen_ms = max(entry.last_seen_ms, now_ms)
                slot.line.restore(entry.user_id, entry.seq)
                slot.idle[entry.user_id] = None
            elif entry.status is QueueStatus.NOTIFIED:
                offered = slot.active_by_user.get(entry.user_id)
                require(
                    offered is not None and offered.id == entry.booking_id,
                    f"slot {slot.id}: NOTIFIED {entry.user_id} without its offered hold",
                )
        for slot in loaded:
            if slot.idle:
                first = slot.entries[next(iter(slot.idle))]
                self._timers.schedule(
                    ("idle", slot.id), first.last_seen_ms + slot.queue_inactivity_ms
                )

    def statistics(self) -> ShardStatistics:
        slots = self._slots.values()
        return ShardStatistics(
            shard_id=self.shard_id,
            slots=len(self._slots),
            bookings_in_memory=len(self._bookings),
            holds=sum(s.held for s in slots),
            confirmed=sum(s.confirmed for s in slots),
            waiting=sum(len(s.line) for s in slots),
            timers=len(self._timers),
            idempotency_records=len(self._memory.keys),
            request_outcomes=len(self._outcomes),
            commands_total=self._commands_total,
            failures_total=self._failures_total,
            replays_total=self._replays_total,
            events_total=self._events_total,
            expirations_total=self._expirations_total,
            offers_total=self._offers_total,
            next_deadline_ms=self._timers.next_wakeup_ms(),
        )

    # == slots ==================================================================

    def _create_slot(self, command: CreateSlot, now_ms: int) -> AnyResult:
        slot = self._directory.create(command, now_ms)
        view = slot_view(slot, now_ms, self._epoch)
        self._emit(
            _SlotChanged(
                at_ms=now_ms,
                request_id=command.request_id,
                actor=command.actor,
                slot=view,
                change="created",
            )
        )
        return _SlotResult(status=201, slot=view)

    def _update_slot(self, command: UpdateSlot, now_ms: int) -> AnyResult:
        slot = self._directory.update(command, now_ms)
        self._changed(slot)
        self._emit(
            _SlotChanged(
                at_ms=now_ms,
                request_id=command.request_id,
                actor=command.actor,
                slot=slot_view(slot, now_ms, self._epoch),
                change="updated",
            )
        )
        # Raised capacity or an unblock frees room for the waiting line.
        self._offer_free_capacity(slot, now_ms, command.request_id, command.actor)
        return _SlotResult(status=200, slot=slot_view(slot, now_ms, self._epoch))

    def _delete_slot(self, command: DeleteSlot, now_ms: int) -> AnyResult:
        slot = self._directory.deletable(command.slot_id, command.force)
        request_id, actor = command.request_id, command.actor
        for booking in list(slot.active_by_user.values()):
            if booking.status is BookingStatus.RESERVED:
                self._expire_hold(slot, booking, now_ms, "slot_deleted", request_id, actor)
            else:
                self._cancel_booking(
                    slot, booking, now_ms, "slot deleted", actor, 100, request_id, actor
                )
        self._expire_waiting(slot, now_ms, "slot_deleted", request_id, actor)
        self._timers.cancel(("end", slot.id))
        view = slot_view(slot, now_ms, self._epoch)
        self._directory.drop(slot)
        self._emit(
            _SlotChanged(
                at_ms=now_ms, request_id=request_id, actor=actor, slot=view, change="deleted"
            )
        )
        return _Done(status=204)

    def _get_slot(self, command: GetSlot, now_ms: int) -> AnyResult:
        if command.watch:
            self.watched = True
        slot = self._directory.get(command.slot_id)
        return _SlotResult(status=200, slot=slot_view(slot, now_ms, self._epoch))

    def _list_slots(self, command: ListSlots, now_ms: int) -> AnyResult:
        if command.resource_id is not None:
            not_served = self._not_served(command)
            if not_served is not None:
                return not_served
        epoch = self._epoch
        items = [slot_view(slot, now_ms, epoch) for slot in self._directory.page(command, now_ms)]
        return SlotPage(status=200, items=items)

    # == bookings ===============================================================

    def _reserve(self, command: Reserve, now_ms: int) -> AnyResult:
        user_id = command.user_id
        slot, existing = self._open_slot_for(command.slot_id, user_id, now_ms)
        if existing is not None:
            return _BookingResult(status=200, booking=_copy(existing))
        if slot.available > 0 and not slot.line.size:
            held = self._take_hold(
                slot, user_id, now_ms, slot.hold_ttl_ms, False, command.request_id, user_id
            )
            return _BookingResult(status=201, booking=held)
        if not slot.queue_enabled:
            raise errors.SlotFull("the slot is full and its domain has no waiting queue")
        entry = slot.entries.get(user_id)
        if entry is not None and entry.status is QueueStatus.WAITING:
            self._touch(slot, entry, now_ms)
            return _QueueResult(
                status=200, entry=queue_view(slot, entry, now_ms, self._epoch, self._bookings)
            )
        if slot.line.size >= slot.queue_size_max:
            return self._queue_full(slot)
        entry = self._join(slot, user_id, now_ms, command.request_id)
        return _QueueResult(
            status=202, entry=queue_view(slot, entry, now_ms, self._epoch, self._bookings)
        )

    def _confirm(self, command: Confirm, now_ms: int) -> AnyResult:
        user_id = command.user_id
        booking_id = command.booking_id
        booking = self._booking_or_404(booking_id, user_id, as_admin=False)
        # Each field read once: every read is a lookup when compiled.
        status = booking.status
        if status is BookingStatus.CONFIRMED:
            return _BookingResult(status=200, booking=_copy(booking))
        expires_at_ms = booking.expires_at_ms
        if status is BookingStatus.EXPIRED:
            raise errors.ReservationExpired(
                "the hold lapsed before it was confirmed", {"expiresAt": expires_at_ms}
            )
        to_status = next_booking_status(status, BookingEvent.CONFIRM)
        slot = self._slots[booking.slot_id]
        if expires_at_ms <= now_ms:
            raise InvariantViolation(f"hold {booking_id} outlived its deadline")

        self._timers.cancel(("hold", booking_id))
        slot.held -= 1
        slot.confirmed += 1
        slot.check_counts()
        booking.confirmed_at_ms = now_ms
        request_id = command.request_id
        confirmed = self._transition(booking, to_status, "confirm", now_ms, request_id, user_id)
        if booking.via_queue:
            entry = slot.entries.get(user_id)
            if entry is not None and entry.booking_id == booking_id:
                self._queue_transition(
                    entry, QueueEvent.CONVERT, "converted", now_ms, request_id, user_id
                )
        self._changed(slot)
        return _BookingResult(status=200, booking=confirmed)

    def _cancel(self, command: Cancel, now_ms: int) -> AnyResult:
        booking = self._booking_or_404(command.booking_id, command.user_id, command.as_admin)
        if command.as_admin and not (command.reason and command.reason.strip()):
            raise errors.ValidationFailed(
                "an admin cancellation needs a reason", {"reason": "required for admins"}
            )
        next_booking_status(booking.status, BookingEvent.CANCEL)
        slot = self._slots[booking.slot_id]
        policy = slot.policy
        if command.as_admin:
            # The business cancels: the customer is refunded in full.
            refund = 100
            actor = f"admin:{command.user_id}"
        else:
            closes_at_ms = slot.start_ms - policy.cancel_allowed_until_ms
            if now_ms >= slot.start_ms or now_ms > closes_at_ms:
                raise errors.CancellationWindowClosed(
                    "this booking can no longer be cancelled",
                    {"allowedUntilMs": closes_at_ms},
                )
            refund = policy.refund_percentage
            actor = command.user_id
        cancelled = self._cancel_booking(
            slot, booking, now_ms, command.reason, actor, refund, command.request_id, actor
        )
        self._offer_free_capacity(slot, now_ms, command.request_id, actor)
        return _BookingResult(status=200, booking=cancelled)

    def _extend_hold(self, command: ExtendHold, now_ms: int) -> AnyResult:
        """The hold's deadline + the domain's extension, capped at the slot's start."""
        user_id = command.user_id
        booking = self._booking_or_404(command.booking_id, user_id, as_admin=False)
        status = booking.status
        if status is BookingStatus.EXPIRED:
            raise errors.ReservationExpired(
                "the hold lapsed before it was extended", {"expiresAt": booking.expires_at_ms}
            )
        to_status = next_booking_status(status, BookingEvent.EXTEND)
        slot = self._slots[booking.slot_id]
        policy = slot.policy
        extensions = booking.extensions
        if extensions >= policy.hold_extensions_max:
            raise errors.ExtensionLimitReached(
                "this hold cannot be extended again",
                {"extensions": extensions, "maxExtensions": policy.hold_extensions_max},
            )
        start_ms = slot.start_ms
        if booking.expires_at_ms >= start_ms:
            raise errors.HoldAtSlotStart(
                "this hold already lasts until the slot starts", {"startTimeMs": start_ms}
            )
        expires_at_ms = min(booking.expires_at_ms + policy.hold_extension_ms, start_ms)
        booking.expires_at_ms = expires_at_ms
        booking.extensions = extensions + 1
        self._timers.schedule(("hold", booking.id), expires_at_ms)
        extended = self._transition(
            booking, to_status, "extended", now_ms, command.request_id, user_id
        )
        return _BookingResult(status=200, booking=extended)

    def _release_hold(self, command: ReleaseHold, now_ms: int) -> AnyResult:
        """The owner gives the hold up: EXPIRED now, the place offered to the line."""
        user_id = command.user_id
        booking = self._booking_or_404(command.booking_id, user_id, as_admin=False)
        next_booking_status(booking.status, BookingEvent.EXPIRE)
        slot = self._slots[booking.slot_id]
        request_id = command.request_id
        self._expire_hold(slot, booking, now_ms, "released", request_id, user_id)
        released = _copy(booking)
        self._offer_free_capacity(slot, now_ms, request_id, user_id)
        return _BookingResult(status=200, booking=released)

    def _get_booking(self, command: GetBooking, now_ms: int) -> AnyResult:
        booking = self._booking_or_404(command.booking_id, command.user_id, command.as_admin)
        return _BookingResult(status=200, booking=_copy(booking))

    def _list_bookings(self, command: ListBookings, now_ms: int) -> AnyResult:
        if command.watch:
            self.watched = True
        limit = max(1, min(command.limit, LIST_LIMIT_MAX))
        ids = self._bookings_by_user.get(command.user_id, ())
        bookings = sorted(
            (self._bookings[i] for i in ids),
            key=lambda b: (b.reserved_at_ms, b.id),
            reverse=True,
        )
        items: list[Booking] = []
        for booking in bookings:
            if command.after is not None and (booking.reserved_at_ms, booking.id) >= command.after:
                continue
            if command.status is not None and booking.status != command.status:
                continue
            items.append(_copy(booking))
            if len(items) >= limit:
                break
        return BookingPage(status=200, items=items)

    # == the waiting queue ======================================================

    def _join_queue(self, command: JoinQueue, now_ms: int) -> AnyResult:
        user_id = command.user_id
        slot, existing = self._open_slot_for(command.slot_id, user_id, now_ms)
        entry = slot.entries.get(user_id)
        if entry is not None and entry.status in (QueueStatus.WAITING, QueueStatus.NOTIFIED):
            if entry.status is QueueStatus.WAITING:
                self._touch(slot, entry, now_ms)
            return _QueueResult(
                status=200, entry=queue_view(slot, entry, now_ms, self._epoch, self._bookings)
            )
        if existing is not None:
            raise errors.AlreadyHeld("you already hold this slot: confirm your hold instead")
        if not slot.queue_enabled:
            raise errors.QueueDisabled("this slot's domain has no waiting queue")
        if slot.available > 0 and not slot.line.size:
            return self._refuse(
                errors.SlotAvailable, "the slot has free capacity: reserve it instead"
            )
        if slot.line.size >= slot.queue_size_max:
            return self._queue_full(slot)
        entry = self._join(slot, user_id, now_ms, command.request_id)
        return _QueueResult(
            status=201, entry=queue_view(slot, entry, now_ms, self._epoch, self._bookings)
        )

    def _leave_queue(self, command: LeaveQueue, now_ms: int) -> AnyResult:
        slot = self._directory.get(command.slot_id)
        user_id = command.user_id
        entry = slot.entries.get(user_id)
        if entry is None or entry.status not in (QueueStatus.WAITING, QueueStatus.NOTIFIED):
            return self._refuse(errors.NotFound, "you are not in this slot's queue")
        request_id = command.request_id
        if entry.status is QueueStatus.WAITING:
            self._remove_from_line(slot, entry, now_ms, request_id, user_id)
        else:
            # Leaving while NOTIFIED gives the offered hold up.
            booking = self._bookings[entry.booking_id or ""]
            self._expire_hold(slot, booking, now_ms, "offer_declined", request_id, user_id)
        del slot.entries[user_id]
        self._emit(
            _QueueChanged(
                at_ms=now_ms,
                request_id=request_id,
                actor=user_id,
                entry=_copy(entry),
                change="left",
            )
        )
        self._offer_free_capacity(slot, now_ms, request_id, user_id)
        return _Done(status=204)

    def _queue_position(self, command: QueuePosition, now_ms: int) -> AnyResult:
        if command.watch:
            self.watched = True
        slot = self._directory.get(command.slot_id)
        entry = slot.entries.get(command.user_id)
        if entry is None:
            raise errors.NotFound("you have not joined this slot's queue")
        if entry.status is QueueStatus.WAITING:
            self._touch(slot, entry, now_ms)
        return _QueueResult(
            status=200, entry=queue_view(slot, entry, now_ms, self._epoch, self._bookings)
        )

    def _touch_waiting(self, command: TouchWaiting, now_ms: int) -> AnyResult:
        """Watched places count as seen; those not WAITING here are skipped."""
        slots = self._slots
        for slot_id, user_id in command.places:
            slot = slots.get(slot_id)
            if slot is None:
                continue
            entry = slot.entries.get(user_id)
            if entry is not None and entry.status is QueueStatus.WAITING:
                self._touch(slot, entry, now_ms)
        return _Done(status=204)

    # == timers =================================================================

    def _on_hold_deadline(self, key: TimerKey, now_ms: int) -> None:
        booking = self._bookings.get(key[1])
        if booking is None or booking.status is not BookingStatus.RESERVED:
            return
        if booking.expires_at_ms > now_ms:
            self._timers.schedule(key, booking.expires_at_ms)
            return
        slot = self._slots[booking.slot_id]
        trigger = "claim_ttl" if booking.via_queue else "hold_ttl"
        self._expire_hold(slot, booking, now_ms, trigger, "", SYSTEM)
        self._offer_free_capacity(slot, now_ms, "", SYSTEM)

    def _on_slot_end(self, key: TimerKey, now_ms: int) -> None:
        slot = self._slots.get(key[1])
        if slot is None or slot.ended:
            return
        if slot.end_ms > now_ms:
            self._timers.schedule(key, slot.end_ms)
            return
        for booking in list(slot.active_by_user.values()):
            if booking.status is BookingStatus.RESERVED:
                self._expire_hold(slot, booking, now_ms, "slot_ended", "", SYSTEM)
            else:
                del slot.active_by_user[booking.user_id]
                slot.confirmed -= 1
                booking.completed_at_ms = now_ms
                to_status = next_booking_status(booking.status, BookingEvent.COMPLETE)
                self._transition(booking, to_status, "slot_ended", now_ms, "", SYSTEM)
                self._timers.schedule(
                    ("forget-booking", booking.id), now_ms + FINAL_BOOKING_RETENTION_MS
                )
        self._expire_waiting(slot, now_ms, "slot_ended", "", SYSTEM)
        slot.ended = True
        slot.version += 1
        slot.check_counts()
        self._changed(slot)
        self._timers.schedule(("forget-slot", slot.id), now_ms + ENDED_SLOT_RETENTION_MS)

    def _on_queue_idle(self, key: TimerKey, now_ms: int) -> None:
        """Expire the users at the front of the slot's idle order whose time is up."""
        slot = self._slots.get(key[1])
        if slot is None:
            return
        inactivity_ms = slot.queue_inactivity_ms
        while slot.idle:
            entry = slot.entries[next(iter(slot.idle))]
            idle_until_ms = entry.last_seen_ms + inactivity_ms
            if idle_until_ms > now_ms:
                # The front showed up since the timer was armed: wait for it.
                self._timers.schedule(key, idle_until_ms)
                return
            self._remove_from_line(slot, entry, now_ms, "", SYSTEM)
            entry.ended_at_ms = now_ms
            self._queue_transition(entry, QueueEvent.EXPIRE, "expired", now_ms, "", SYSTEM)

    def _on_forget_booking(self, key: TimerKey, now_ms: int) -> None:
        booking = self._bookings.get(key[1])
        if booking is None or booking.status not in BOOKING_FINAL:
            return
        del self._bookings[booking.id]
        user_ids = self._bookings_by_user.get(booking.user_id)
        if user_ids is not None:
            user_ids.discard(booking.id)
            if not user_ids:
                del self._bookings_by_user[booking.user_id]

    def _on_forget_slot(self, key: TimerKey, now_ms: int) -> None:
        slot = self._slots.get(key[1])
        if slot is not None and slot.ended:
            self._directory.drop(slot)

    # == shared steps ===========================================================

    def _take_hold(
        self,
        slot: SlotState,
        user_id: str,
        now_ms: int,
        ttl_ms: int,
        via_queue: bool,
        request_id: str,
        actor: str,
    ) -> Booking:
        """A new hold for ``user_id``; returns its snapshot (the copy its event carries)."""
        if slot.available <= 0:
            raise InvariantViolation(f"slot {slot.id}: hold without free capacity")
        if user_id in slot.active_by_user:
            raise InvariantViolation(f"slot {slot.id}: second hold for {user_id}")
        if self._new_unique is None:
            at = self._id_block_at
            if at >= len(self._id_block):
                self._id_block = self._draw_random(BOOKING_ID_UNIQUE_BYTES * BOOKING_IDS_PER_DRAW)
                at = 0
            self._id_block_at = at + BOOKING_ID_UNIQUE_BYTES
            unique = self._id_block[at : at + BOOKING_ID_UNIQUE_BYTES].hex()
        else:
            unique = self._new_unique()
        booking = _Booking(
            id=f"{slot.id[:8]}-b{unique}",
            user_id=user_id,
            slot_id=slot.id,
            status=BookingStatus.PENDING,
            reserved_at_ms=now_ms,
            expires_at_ms=now_ms + ttl_ms,
            via_queue=via_queue,
        )
        self._bookings[booking.id] = booking
        user_bookings = self._bookings_by_user.get(user_id)
        if user_bookings is None:
            self._bookings_by_user[user_id] = {booking.id}
        else:
            user_bookings.add(booking.id)
        slot.active_by_user[user_id] = booking
        slot.held += 1
        slot.check_counts()
        self._timers.schedule(("hold", booking.id), booking.expires_at_ms)
        to_status = next_booking_status(BookingStatus.PENDING, BookingEvent.TAKE_HOLD)
        trigger = "queue_offer" if via_queue else "reserve"
        held = self._transition(booking, to_status, trigger, now_ms, request_id, actor, bump=False)
        self._changed(slot)
        return held

    def _expire_hold(
        self,
        slot: SlotState,
        booking: Booking,
        now_ms: int,
        trigger: str,
        request_id: str,
        actor: str,
    ) -> None:
        to_status = next_booking_status(booking.status, BookingEvent.EXPIRE)
        self._timers.cancel(("hold", booking.id))
        del slot.active_by_user[booking.user_id]
        slot.held -= 1
        slot.check_counts()
        self._expirations_total += 1
        self._transition(booking, to_status, trigger, now_ms, request_id, actor)
        self._timers.schedule(("forget-booking", booking.id), now_ms + FINAL_BOOKING_RETENTION_MS)
        if booking.via_queue:
            entry = slot.entries.get(booking.user_id)
            if entry is not None and entry.booking_id == booking.id:
                entry.ended_at_ms = now_ms
                self._queue_transition(
                    entry, QueueEvent.EXPIRE, "expired", now_ms, request_id, actor
                )
        self._changed(slot)

    def _cancel_booking(
        self,
        slot: SlotState,
        booking: Booking,
        now_ms: int,
        reason: str | None,
        cancelled_by: str,
        refund_percentage: int,
        request_id: str,
        actor: str,
    ) -> Booking:
        to_status = next_booking_status(booking.status, BookingEvent.CANCEL)
        del slot.active_by_user[booking.user_id]
        slot.confirmed -= 1
        slot.check_counts()
        booking.cancelled_at_ms = now_ms
        booking.cancel_reason = reason
        booking.cancelled_by = cancelled_by
        booking.refund_percentage = refund_percentage
        cancelled = self._transition(booking, to_status, "cancel", now_ms, request_id, actor)
        self._timers.schedule(("forget-booking", booking.id), now_ms + FINAL_BOOKING_RETENTION_MS)
        self._changed(slot)
        return cancelled

    def _offer_free_capacity(
        self, slot: SlotState, now_ms: int, request_id: str, actor: str
    ) -> None:
        """Give freed capacity to the head of the line, one hold per free place."""
        while slot.line and slot.available > 0 and slot.status(now_ms) in SLOT_TAKES_HOLDS:
            user_id = slot.line.pop_head(now_ms)
            entry = slot.entries[user_id]
            del slot.idle[user_id]
            # The line moves first, then the entry changes, as when a user leaves:
            # a subscriber's totals are current when it hears of the offer.
            self._moved(slot, entry, now_ms, request_id, actor)
            booking = self._take_hold(
                slot, user_id, now_ms, slot.claim_ttl_ms, True, request_id, actor
            )
            entry.notified_at_ms = now_ms
            entry.booking_id = booking.id
            self._offers_total += 1
            self._queue_transition(
                entry,
                QueueEvent.OFFER,
                "notified",
                now_ms,
                request_id,
                actor,
                offer_expires_at_ms=booking.expires_at_ms,
            )

    def _join(self, slot: SlotState, user_id: str, now_ms: int, request_id: str) -> QueueEntry:
        seq = slot.line.push(user_id)
        entry = _QueueEntry(
            slot_id=slot.id,
            user_id=user_id,
            status=QueueStatus.WAITING,
            seq=seq,
            joined_at_ms=now_ms,
            last_seen_ms=now_ms,
        )
        slot.entries[user_id] = entry
        slot.idle[user_id] = None
        if len(slot.idle) == 1:
            # The first waiting user: the slot's idle timer starts with them.
            self._timers.schedule(("idle", slot.id), now_ms + slot.queue_inactivity_ms)
        self._emit(
            _QueueChanged(
                at_ms=now_ms,
                request_id=request_id,
                actor=user_id,
                entry=_copy(entry),
                change="joined",
            )
        )
        self._changed(slot)
        return entry

    def _remove_from_line(
        self, slot: SlotState, entry: QueueEntry, now_ms: int, request_id: str, actor: str
    ) -> None:
        slot.line.remove(entry.user_id, now_ms)
        del slot.idle[entry.user_id]
        self._moved(slot, entry, now_ms, request_id, actor)
        self._changed(slot)

    def _moved(
        self, slot: SlotState, entry: QueueEntry, now_ms: int, request_id: str, actor: str
    ) -> None:
        """The line moved: ``entry`` just left it (departure number ``line.departures``)."""
        self._emit(
            _QueueMoved(
                at_ms=now_ms,
                request_id=request_id,
                actor=actor,
                slot_id=slot.id,
                removed_seq=entry.seq,
                total_in_queue=slot.line.size,
                epoch=self._epoch,
                departures=slot.line.departures,
                wait_per_place_ms=wait_per_place_ms(slot, now_ms),
            )
        )

    def _expire_waiting(
        self, slot: SlotState, now_ms: int, trigger: str, request_id: str, actor: str
    ) -> None:
        for user_id in list(slot.line):
            entry = slot.entries[user_id]
            self._remove_from_line(slot, entry, now_ms, request_id, actor)
            entry.ended_at_ms = now_ms
            self._queue_transition(entry, QueueEvent.EXPIRE, "expired", now_ms, request_id, actor)

    def _touch(self, slot: SlotState, entry: QueueEntry, now_ms: int) -> None:
        """A waiting user showed up: the inactivity timeout starts over."""
        entry.last_seen_ms = now_ms
        slot.idle.move_to_end(entry.user_id)
        # The slot's idle timer re-arms itself from the new front when it fires.

    def _transition(
        self,
        booking: Booking,
        to_status: BookingStatus,
        trigger: str,
        now_ms: int,
        request_id: str,
        actor: str,
        *,
        bump: bool = True,
    ) -> Booking:
        """Move ``booking`` on; returns the snapshot its event carries, for a reply to share."""
        from_status = booking.status
        booking.status = to_status
        if bump:
            booking.version += 1
        snapshot = _copy(booking)
        self._emit(
            _BookingChanged(
                at_ms=now_ms,
                request_id=request_id,
                actor=actor,
                booking=snapshot,
                from_status=from_status,
                to_status=to_status,
                trigger=trigger,
            )
        )
        return snapshot

    def _queue_transition(
        self,
        entry: QueueEntry,
        event: QueueEvent,
        change: str,
        now_ms: int,
        request_id: str,
        actor: str,
        *,
        offer_expires_at_ms: int | None = None,
    ) -> None:
        entry.status = next_queue_status(entry.status, event)
        entry.version += 1
        self._emit(
            _QueueChanged(
                at_ms=now_ms,
                request_id=request_id,
                actor=actor,
                entry=_copy(entry),
                change=change,
                offer_expires_at_ms=offer_expires_at_ms,
            )
        )

    def _changed(self, slot: SlotState) -> None:
        """Every change to a slot's counts, line or settings passes here."""
        slot.view = None
        slot.revision += 1
        if not slot.dirty:
            slot.dirty = True
            self._dirty_slots.append(slot)

    def _emit(self, event: AnyEvent) -> None:
        self._events.append(event)
        self._events_total += 1

    # == checks =================================================================

    def _booking_or_404(self, booking_id: str, user_id: str, as_admin: bool) -> Booking:
        booking = self._bookings.get(booking_id)
        # Another user's booking answers exactly like a missing one.
        if booking is None or (not as_admin and booking.user_id != user_id):
            raise errors.NotFound("no such booking")
        return booking

    def _open_slot_for(
        self, slot_id: str, user_id: str, now_ms: int
    ) -> tuple[SlotState, Booking | None]:
        """The checks reserve and join share, in API order; returns the user's active hold."""
        slot = self._directory.get(slot_id)
        self._check_reservable(slot, now_ms)
        existing = slot.active_by_user.get(user_id)
        if existing is not None and existing.status is BookingStatus.CONFIRMED:
            raise errors.AlreadyBooked("you already have a confirmed booking for this slot")
        return slot, existing

    def _check_reservable(self, slot: SlotState, now_ms: int) -> None:
        if slot.blocked or slot.ended or now_ms >= slot.end_ms:
            status = slot.status(now_ms)
            raise errors.SlotNotReservable(
                f"the slot is {status.value.lower()}", {"status": status.value}
            )
        if slot.start_ms > now_ms + slot.advance_booking_ms:
            raise errors.OutsideBookingWindow(
                "the slot starts too far ahead to book yet",
                {"bookableFromMs": slot.start_ms - slot.advance_booking_ms},
            )

    def _queue_full(self, slot: SlotState) -> Failure:
        # A storm refuses thousands alike: the slot keeps its last refusal and
        # hands it out again while the line is as long as it said.
        size = slot.line.size
        failure = slot.queue_full
        if failure is not None and slot.queue_full_at == size:
            self._failures_total += 1
            return failure
        failure = self._refuse(
            errors.QueueFull,
            "the slot and its waiting queue are full",
            {"queueLength": size, "maxSize": slot.queue_size_max},
        )
        slot.queue_full = failure
        slot.queue_full_at = size
        return failure

    # == invariants ===========================================================

    def check_invariants(self, now_ms: int) -> None:
        """Verify every invariant (``engine/core/invariants.py``); O(state)."""
        check_invariants(self._slots, self._bookings, self._timers, now_ms)

    def slots(self) -> Iterator[SlotView]:
        now_ms = self._now_ms
        return (slot_view(slot, now_ms, self._epoch) for slot in self._slots.values())


def _copy(record: _R) -> _R:
    """A detached copy: replies and events must not change with later commands."""
    return _replace(record)
