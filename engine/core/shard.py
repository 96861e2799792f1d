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

Every state-changing request id's outcome is remembered for a while, so a
batch retried after an actor failure returns its first results instead of
applying twice. Client idempotency keys are remembered per (user, command,
key) with a fingerprint of the command for 24 h.

Invariants, per slot (``check_invariants`` verifies them all; the cheap ones
are also asserted where counts change):
  * 0 <= held, 0 <= confirmed, confirmed + held <= capacity;
  * ``active_by_user`` holds exactly the slot's RESERVED and CONFIRMED
    bookings, one per user, and the counts agree with it;
  * the waiting line holds exactly the WAITING entries; each NOTIFIED entry
    points at a RESERVED hold offered from the queue;
  * if the slot takes holds, it has no free capacity or nobody waits;
  * every RESERVED booking has a hold timer at its ``expires_at_ms``.
"""

import os
import random
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar, cast

import msgspec
from sortedcontainers import SortedList

from engine.core import errors
from engine.core.errors import EngineError, InvariantViolation, require
from engine.core.limits import (
    ENDED_SLOT_RETENTION_MS,
    FINAL_BOOKING_RETENTION_MS,
    IDEMPOTENCY_RECORDS_MAX,
    IDEMPOTENCY_RETENTION_MS,
    LIST_LIMIT_MAX,
    REQUEST_OUTCOMES_MAX,
    REQUEST_OUTCOMES_RETENTION_MS,
    SLOT_CAPACITY_MAX,
    SLOT_DURATION_MAX_MS,
)
from engine.core.policy import DomainPolicy
from engine.core.protocol import (
    READ_ONLY_COMMANDS,
    AnyCommand,
    AnyEvent,
    AnyResult,
    BookingChanged,
    BookingPage,
    BookingResult,
    Cancel,
    Confirm,
    CreateSlot,
    DeleteSlot,
    Done,
    Failure,
    GetBooking,
    GetSlot,
    JoinQueue,
    KeyRecord,
    LeaveQueue,
    ListBookings,
    ListSlots,
    OutcomeRecord,
    QueueChanged,
    QueueMoved,
    QueuePosition,
    QueueResult,
    Reserve,
    SlotChanged,
    SlotPage,
    SlotResult,
    UpdateSlot,
)
from engine.core.records import (
    Booking,
    QueueEntry,
    QueueView,
    ShardStatistics,
    SlotView,
    StoredSlot,
    pack_metadata,
)
from engine.core.routing import shard_of
from engine.core.states import (
    BOOKING_FINAL,
    SLOT_TAKES_HOLDS,
    BookingEvent,
    BookingStatus,
    QueueEvent,
    QueueStatus,
    SlotStatus,
    next_booking_status,
    next_queue_status,
    slot_status,
)
from engine.core.storable import command_problems
from engine.core.timer_wheel import TimerWheel
from engine.core.waiting_line import WaitingLine, describe_wait

SYSTEM: Final = "system"
# A booking id's unique part: 128 random bits, drawn for this many bookings at a time.
BOOKING_ID_UNIQUE_BYTES: Final = 16
BOOKING_IDS_PER_DRAW: Final = 256

TimerKey = tuple[str, ...]
IdempotencyScope = tuple[str, str, str]
_R = TypeVar("_R", Booking, QueueEntry)


class _Slot:
    """A slot's mutable state. Only ``ShardCore`` touches it."""

    __slots__ = (
        "active_by_user",
        "advance_booking_ms",
        "blocked",
        "capacity",
        "claim_ttl_ms",
        "confirmed",
        "dirty",
        "domain",
        "end_ms",
        "ended",
        "entries",
        "held",
        "hold_ttl_ms",
        "id",
        "idle",
        "last_view",
        "line",
        "metadata",
        "policy",
        "queue_enabled",
        "queue_full",
        "queue_full_at",
        "queue_inactivity_ms",
        "queue_size_max",
        "resource_id",
        "revision",
        "start_ms",
        "version",
        "view",
        "view_ended",
    )

    def __init__(self, stored: StoredSlot, policy: DomainPolicy) -> None:
        self.id = stored.id
        self.resource_id = stored.resource_id
        self.domain = stored.domain
        self.policy = policy
        # The policy's numbers the hot paths read, as native fields: a compiled
        # build reads these directly, where the policy's are generic lookups.
        self.hold_ttl_ms = policy.hold_ttl_ms
        self.claim_ttl_ms = policy.claim_ttl_ms
        self.queue_enabled = policy.queue_enabled
        self.queue_size_max = policy.queue_size_max
        self.queue_inactivity_ms = policy.queue_inactivity_ms
        self.advance_booking_ms = policy.advance_booking_ms
        self.start_ms = stored.start_ms
        self.end_ms = stored.end_ms
        self.capacity = stored.capacity
        self.blocked = stored.blocked
        self.metadata = stored.metadata
        self.version = stored.version
        # Every change of this slot in this incarnation counts one (ShardCore._changed).
        self.revision = 0
        self.confirmed = 0
        self.held = 0
        # user id -> that user's RESERVED or CONFIRMED booking of this slot
        self.active_by_user: dict[str, Booking] = {}
        self.line = WaitingLine()
        # user id -> that user's latest queue entry, whatever its status
        self.entries: dict[str, QueueEntry] = {}
        # The waiting users, least recently seen first: one timer per slot, at
        # the front user's inactivity deadline, serves them all.
        self.idle: OrderedDict[str, None] = OrderedDict()
        self.ended = False
        # The last view built, shared until the slot changes (ShardCore._changed
        # drops it) or the clock crosses its end (view_ended no longer matches).
        self.view: SlotView | None = None
        self.view_ended = False
        # The last view built, kept after a change: while the slot's settings
        # (its version) stay the same, the next view copies it with new counts.
        self.last_view: SlotView | None = None
        # Changed since the shard last reported its counts (ShardCore.drain_events).
        self.dirty = False
        # The last QueueFull refusal and the line length it reported.
        self.queue_full: Failure | None = None
        self.queue_full_at = -1

    @property
    def available(self) -> int:
        # Never negative: check_counts keeps confirmed + held <= capacity.
        return self.capacity - self.confirmed - self.held

    def status(self, now_ms: int) -> SlotStatus:
        return slot_status(
            blocked=self.blocked,
            ended=self.ended or now_ms >= self.end_ms,
            capacity=self.capacity,
            confirmed=self.confirmed,
            held=self.held,
        )

    def check_counts(self) -> None:
        # Formatted only on failure: this runs on every change of a count.
        if not (
            self.held >= 0 and self.confirmed >= 0 and self.confirmed + self.held <= self.capacity
        ):
            raise InvariantViolation(
                f"slot {self.id}: confirmed {self.confirmed} + held {self.held}"
                f" exceeds capacity {self.capacity}"
            )


_READ_ONLY: Final[frozenset[type[Any]]] = frozenset(READ_ONLY_COMMANDS)
# The records and results the core builds, bound once for the same reason.
_BookingResult: Final = BookingResult
_QueueResult: Final = QueueResult
_QueueView: Final = QueueView
_SlotView: Final = SlotView
_BookingChanged: Final = BookingChanged
_QueueChanged: Final = QueueChanged
_QueueMoved: Final = QueueMoved
_SlotChanged: Final = SlotChanged
_Failure: Final = Failure
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
# Bound once: a compiled build reads a Final as a constant, where
# ``msgspec.structs.replace`` would be two attribute lookups per call.
_replace: Final = msgspec.structs.replace


def fingerprint(command: AnyCommand) -> bytes:
    """The request a command stands for: all of it but its request id and idempotency key."""
    neutral = msgspec.structs.replace(command, request_id="", idempotency_key=None)
    return msgspec.msgpack.encode(neutral)


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
    ) -> None:
        require(0 <= shard_id < shard_count, "shard id out of range")
        require("default" in policies, "the default domain must exist")
        self.shard_id = shard_id
        self.shard_count = shard_count
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
        self._slots: dict[str, _Slot] = {}
        self._slots_by_resource: dict[str, set[str]] = {}
        self._slot_order: SortedList[tuple[int, str]] = SortedList()
        self._bookings: dict[str, Booking] = {}
        self._bookings_by_user: dict[str, set[str]] = {}
        self._timers: TimerWheel[TimerKey] = TimerWheel(now_ms)
        # request id -> first result, and (when, request id) oldest first for pruning
        self._outcomes: dict[str, AnyResult] = {}
        # The same request ids grouped by the millisecond they were remembered
        # in, oldest first: a command appends to the current group, and only a
        # new millisecond (once per batch, not per command) prunes.
        self._outcome_groups: deque[tuple[int, list[str]]] = deque()
        self._outcome_group: list[str] = []
        self._outcome_group_ms = -1
        # (user, command, key) -> (when, fingerprint, first result), and the same
        # oldest first: every record has the same retention, so the oldest
        # expires first and pruning never scans.
        self._idempotency: dict[IdempotencyScope, tuple[int, bytes, AnyResult]] = {}
        self._idempotency_order: deque[tuple[int, IdempotencyScope]] = deque()
        self._events: list[AnyEvent] = []
        # Set by a read that a live watch follows (``watch=True``), cleared by
        # the host once it has told its event publisher to publish again.
        self.watched = False
        # What was remembered since the last drain_remembered, for storage.
        self._outcome_log: list[OutcomeRecord] = []
        self._key_log: list[KeyRecord] = []
        # The slots changed since the last drain, each once, in order of first change.
        self._dirty_slots: list[_Slot] = []
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
            result = self._execute_with_key(command, key, now_ms)
        else:
            result = self._decide(command, now_ms)
        self._remember_outcome(request_id, result, now_ms)
        return result

    def _execute_with_key(self, command: AnyCommand, key: str, now_ms: int) -> AnyResult:
        """The client's Idempotency-Key: the first outcome per (user, command, key) stands."""
        scope = (getattr(command, "user_id", ""), type(command).__name__, key)
        request_fingerprint = fingerprint(command)
        stored = self._idempotency.get(scope)
        if stored is not None and stored[0] + IDEMPOTENCY_RETENTION_MS > now_ms:
            if stored[1] != request_fingerprint:
                return self._refusal(
                    errors.IdempotencyKeyReused(
                        "this Idempotency-Key was used for a different request"
                    )
                )
            self._replays_total += 1
            return stored[2]
        result = self._decide(command, now_ms)
        if result.status < 500:
            self._remember_idempotency(scope, request_fingerprint, result, now_ms)
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
        except EngineError as refused:
            return self._refusal(refused)
        raise TypeError(f"not a command: {kind.__name__}")

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
                            slot=self._slot_view(slot, now_ms),
                            change="counts",
                        )
                    )
            self._dirty_slots = []
        events, self._events = self._events, []
        return events

    def drain_remembered(self) -> tuple[list[OutcomeRecord], list[KeyRecord]]:
        """Request outcomes and idempotency records remembered since the last call."""
        outcomes, self._outcome_log = self._outcome_log, []
        keys, self._key_log = self._key_log, []
        return outcomes, keys

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
        now_ms = self._now_ms
        for stored in slots:
            require(
                shard_of(stored.id, self.shard_count) == self.shard_id, f"{stored.id} misrouted"
            )
            policy = self._policies.get(stored.domain, self._policies["default"])
            self._add_slot(stored, policy)
        for stored_booking in bookings:
            booking = _copy(stored_booking)
            slot = self._slots.get(booking.slot_id)
            require(slot is not None, f"booking {booking.id} of an unknown slot")
            assert slot is not None
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
            require(entry_slot is not None, f"queue entry of an unknown slot {entry.slot_id}")
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
        for slot in self._slots.values():
            if slot.idle:
                first = slot.entries[next(iter(slot.idle))]
                self._timers.schedule(
                    ("idle", slot.id), first.last_seen_ms + slot.queue_inactivity_ms
                )
        for outcome in sorted(outcomes, key=lambda o: o.at_ms):
            self._remember_outcome(outcome.request_id, outcome.result, outcome.at_ms)
        for key in sorted(keys, key=lambda k: k.at_ms):
            self._remember_idempotency(
                (key.user_id, key.command, key.key), key.fingerprint, key.result, key.at_ms
            )
        # Storage has all of this already.
        self._outcome_log = []
        self._key_log = []

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
            idempotency_records=len(self._idempotency),
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
        if shard_of(command.slot_id, self.shard_count) != self.shard_id:
            raise errors.ValidationFailed(
                "slot id does not belong to this shard", {"slotId": "misrouted"}
            )
        if command.slot_id in self._slots:
            raise errors.Conflict("a slot with this id exists")
        policy = self._policies.get(command.domain)
        if policy is None:
            raise errors.ValidationFailed(
                f"unknown domain {command.domain!r}", {"domain": "unknown domain"}
            )
        if not command.resource_id:
            raise errors.ValidationFailed("resourceId is empty", {"resourceId": "empty"})
        self._check_slot_shape(command.start_ms, command.end_ms, command.capacity, now_ms)
        self._check_overlap(command.resource_id, command.start_ms, command.end_ms, None)

        slot = self._add_slot(
            StoredSlot(
                id=command.slot_id,
                resource_id=command.resource_id,
                domain=command.domain,
                start_ms=command.start_ms,
                end_ms=command.end_ms,
                capacity=command.capacity,
                blocked=command.blocked,
                metadata=pack_metadata(command.metadata),
                version=1,
            ),
            policy,
        )
        view = self._slot_view(slot, now_ms)
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

    def _add_slot(self, stored: StoredSlot, policy: DomainPolicy) -> _Slot:
        slot = _Slot(stored, policy)
        self._slots[slot.id] = slot
        self._slots_by_resource.setdefault(slot.resource_id, set()).add(slot.id)
        self._slot_order.add((slot.start_ms, slot.id))
        self._timers.schedule(("end", slot.id), slot.end_ms)
        return slot

    def _update_slot(self, command: UpdateSlot, now_ms: int) -> AnyResult:
        slot = self._slot_or_404(command.slot_id)
        if slot.ended:
            raise errors.SlotNotReservable("the slot has ended and can no longer change")
        start_ms = slot.start_ms if command.start_ms is None else command.start_ms
        end_ms = slot.end_ms if command.end_ms is None else command.end_ms
        capacity = slot.capacity if command.capacity is None else command.capacity
        self._check_slot_shape(start_ms, end_ms, capacity, now_ms)
        if capacity < slot.confirmed + slot.held:
            raise errors.CapacityBelowBookings(
                f"capacity {capacity} is below the {slot.confirmed} confirmed bookings"
                f" and {slot.held} holds",
                {"currentBookings": slot.confirmed, "heldCount": slot.held},
            )
        if (start_ms, end_ms) != (slot.start_ms, slot.end_ms):
            self._check_overlap(slot.resource_id, start_ms, end_ms, slot.id)

        if start_ms != slot.start_ms:
            self._slot_order.remove((slot.start_ms, slot.id))
            self._slot_order.add((start_ms, slot.id))
            slot.start_ms = start_ms
        if end_ms != slot.end_ms:
            slot.end_ms = end_ms
            self._timers.schedule(("end", slot.id), end_ms)
        slot.capacity = capacity
        if command.metadata is not None:
            slot.metadata = pack_metadata(command.metadata)
        if command.blocked is not None:
            slot.blocked = command.blocked
        slot.version += 1
        self._changed(slot)
        self._emit(
            _SlotChanged(
                at_ms=now_ms,
                request_id=command.request_id,
                actor=command.actor,
                slot=self._slot_view(slot, now_ms),
                change="updated",
            )
        )
        # Raised capacity or an unblock frees room for the waiting line.
        self._offer_free_capacity(slot, now_ms, command.request_id, command.actor)
        return _SlotResult(status=200, slot=self._slot_view(slot, now_ms))

    def _delete_slot(self, command: DeleteSlot, now_ms: int) -> AnyResult:
        slot = self._slot_or_404(command.slot_id)
        if slot.active_by_user and not command.force:
            raise errors.SlotHasBookings(
                "the slot has active bookings; delete with force=true to cancel them",
                {"currentBookings": slot.confirmed, "heldCount": slot.held},
            )
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
        view = self._slot_view(slot, now_ms)
        self._drop_slot(slot)
        self._emit(
            _SlotChanged(
                at_ms=now_ms, request_id=request_id, actor=actor, slot=view, change="deleted"
            )
        )
        return _Done(status=204)

    def _get_slot(self, command: GetSlot, now_ms: int) -> AnyResult:
        if command.watch:
            self.watched = True
        return _SlotResult(
            status=200, slot=self._slot_view(self._slot_or_404(command.slot_id), now_ms)
        )

    def _list_slots(self, command: ListSlots, now_ms: int) -> AnyResult:
        limit = max(1, min(command.limit, LIST_LIMIT_MAX))
        if command.after is not None:
            start_index = self._slot_order.bisect_right(command.after)
        elif command.from_ms is not None:
            start_index = self._slot_order.bisect_left((command.from_ms, ""))
        else:
            start_index = 0
        items: list[SlotView] = []
        for start_ms, slot_id in self._slot_order.islice(start_index):
            if command.to_ms is not None and start_ms >= command.to_ms:
                break
            if command.from_ms is not None and start_ms < command.from_ms:
                continue
            slot = self._slots[slot_id]
            if command.resource_id is not None and slot.resource_id != command.resource_id:
                continue
            status = slot.status(now_ms)
            if command.status is not None and status != command.status:
                continue
            if command.available_only and not (status in SLOT_TAKES_HOLDS and slot.available):
                continue
            items.append(self._slot_view(slot, now_ms))
            if len(items) >= limit:
                break
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
            return _QueueResult(status=200, entry=self._queue_view(slot, entry, now_ms))
        if slot.line.size >= slot.queue_size_max:
            return self._queue_full(slot)
        entry = self._join(slot, user_id, now_ms, command.request_id)
        return _QueueResult(status=202, entry=self._queue_view(slot, entry, now_ms))

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
            return _QueueResult(status=200, entry=self._queue_view(slot, entry, now_ms))
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
        return _QueueResult(status=201, entry=self._queue_view(slot, entry, now_ms))

    def _leave_queue(self, command: LeaveQueue, now_ms: int) -> AnyResult:
        slot = self._slot_or_404(command.slot_id)
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
        slot = self._slot_or_404(command.slot_id)
        entry = slot.entries.get(command.user_id)
        if entry is None:
            raise errors.NotFound("you have not joined this slot's queue")
        if entry.status is QueueStatus.WAITING:
            self._touch(slot, entry, now_ms)
        return _QueueResult(status=200, entry=self._queue_view(slot, entry, now_ms))

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
            self._drop_slot(slot)

    # == shared steps ===========================================================

    def _take_hold(
        self,
        slot: _Slot,
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
        self, slot: _Slot, booking: Booking, now_ms: int, trigger: str, request_id: str, actor: str
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
        slot: _Slot,
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

    def _offer_free_capacity(self, slot: _Slot, now_ms: int, request_id: str, actor: str) -> None:
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

    def _join(self, slot: _Slot, user_id: str, now_ms: int, request_id: str) -> QueueEntry:
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
        self, slot: _Slot, entry: QueueEntry, now_ms: int, request_id: str, actor: str
    ) -> None:
        slot.line.remove(entry.user_id, now_ms)
        del slot.idle[entry.user_id]
        self._moved(slot, entry, now_ms, request_id, actor)
        self._changed(slot)

    def _moved(
        self, slot: _Slot, entry: QueueEntry, now_ms: int, request_id: str, actor: str
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
                wait_per_place_ms=self._wait_per_place_ms(slot, now_ms),
            )
        )

    def _expire_waiting(
        self, slot: _Slot, now_ms: int, trigger: str, request_id: str, actor: str
    ) -> None:
        for user_id in list(slot.line):
            entry = slot.entries[user_id]
            self._remove_from_line(slot, entry, now_ms, request_id, actor)
            entry.ended_at_ms = now_ms
            self._queue_transition(entry, QueueEvent.EXPIRE, "expired", now_ms, request_id, actor)

    def _touch(self, slot: _Slot, entry: QueueEntry, now_ms: int) -> None:
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

    def _drop_slot(self, slot: _Slot) -> None:
        self._timers.cancel(("idle", slot.id))
        del self._slots[slot.id]
        self._slot_order.remove((slot.start_ms, slot.id))
        resource_slots = self._slots_by_resource[slot.resource_id]
        resource_slots.discard(slot.id)
        if not resource_slots:
            del self._slots_by_resource[slot.resource_id]
        slot.dirty = False

    def _changed(self, slot: _Slot) -> None:
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

    def _slot_or_404(self, slot_id: str) -> _Slot:
        slot = self._slots.get(slot_id)
        if slot is None:
            raise errors.NotFound("no such slot")
        return slot

    def _booking_or_404(self, booking_id: str, user_id: str, as_admin: bool) -> Booking:
        booking = self._bookings.get(booking_id)
        # Another user's booking answers exactly like a missing one.
        if booking is None or (not as_admin and booking.user_id != user_id):
            raise errors.NotFound("no such booking")
        return booking

    def _open_slot_for(
        self, slot_id: str, user_id: str, now_ms: int
    ) -> tuple[_Slot, Booking | None]:
        """The checks reserve and join share, in API order; returns the user's active hold."""
        slot = self._slot_or_404(slot_id)
        self._check_reservable(slot, now_ms)
        existing = slot.active_by_user.get(user_id)
        if existing is not None and existing.status is BookingStatus.CONFIRMED:
            raise errors.AlreadyBooked("you already have a confirmed booking for this slot")
        return slot, existing

    def _check_reservable(self, slot: _Slot, now_ms: int) -> None:
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

    def _queue_full(self, slot: _Slot) -> Failure:
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

    def _check_slot_shape(self, start_ms: int, end_ms: int, capacity: int, now_ms: int) -> None:
        problems: dict[str, str] = {}
        if not 1 <= capacity <= SLOT_CAPACITY_MAX:
            problems["capacity"] = f"must be between 1 and {SLOT_CAPACITY_MAX}"
        if end_ms <= start_ms:
            problems["endTime"] = "must be after startTime"
        elif end_ms - start_ms > SLOT_DURATION_MAX_MS:
            problems["endTime"] = "the slot is longer than the longest allowed"
        elif end_ms <= now_ms:
            problems["endTime"] = "is in the past"
        if problems:
            raise errors.ValidationFailed("invalid slot", problems)

    def _check_overlap(
        self, resource_id: str, start_ms: int, end_ms: int, ignore_id: str | None
    ) -> None:
        for other_id in self._slots_by_resource.get(resource_id, ()):
            other = self._slots[other_id]
            if other_id != ignore_id and other.start_ms < end_ms and start_ms < other.end_ms:
                raise errors.SlotOverlap(
                    "the resource already has a slot in this time window",
                    {"conflictingSlotId": other_id},
                )

    # == views ==================================================================

    def _slot_view(self, slot: _Slot, now_ms: int) -> SlotView:
        ended = now_ms >= slot.end_ms
        view = slot.view
        if view is not None and slot.view_ended is ended:
            return view
        settings = slot.last_view
        if settings is None or settings.version != slot.version:
            # The settings part, built once per version of the slot: a view then
            # copies it with the counts of the moment, and the settings' boxed
            # numbers carry over. The counts here are never seen.
            settings = _SlotView(
                id=slot.id,
                resource_id=slot.resource_id,
                domain=slot.domain,
                start_ms=slot.start_ms,
                end_ms=slot.end_ms,
                capacity=slot.capacity,
                current_bookings=0,
                held_count=0,
                available=0,
                status=SlotStatus.AVAILABLE,
                queue_length=0,
                blocked=slot.blocked,
                metadata=slot.metadata,
                version=slot.version,
                epoch=self._epoch,
            )
        view = _replace(
            settings,
            current_bookings=slot.confirmed,
            held_count=slot.held,
            available=slot.capacity - slot.confirmed - slot.held,
            status=slot.status(now_ms),
            queue_length=slot.line.size,
            revision=slot.revision,
            departures=slot.line.departures,
        )
        slot.view = slot.last_view = view
        slot.view_ended = ended
        return view

    def _wait_per_place_ms(self, slot: _Slot, now_ms: int) -> int:
        return slot.line.estimated_wait_ms(1, now_ms, _prior_ms(slot)) if slot.line.size else 0

    def _queue_view(self, slot: _Slot, entry: QueueEntry, now_ms: int) -> QueueView:
        # Each of the entry's fields read once: every read is a lookup when compiled.
        status = entry.status
        user_id = entry.user_id
        booking_id = entry.booking_id
        line = slot.line
        position: int | None = None
        wait_s: int | None = None
        if status is QueueStatus.WAITING:
            position = line.position(user_id)
            if position is not None:
                wait_s = -(-line.estimated_wait_ms(position, now_ms, _prior_ms(slot)) // 1000)
        offer_expires_at_ms = None
        if status is QueueStatus.NOTIFIED and booking_id is not None:
            offer_expires_at_ms = self._bookings[booking_id].expires_at_ms
        return _QueueView(
            slot_id=slot.id,
            user_id=user_id,
            status=status,
            seq=entry.seq,
            position=position,
            total_in_queue=line.size,
            estimated_wait_seconds=wait_s,
            estimated_wait_time=describe_wait(wait_s),
            joined_at_ms=entry.joined_at_ms,
            notified_at_ms=entry.notified_at_ms,
            booking_id=booking_id,
            offer_expires_at_ms=offer_expires_at_ms,
            slot=self._slot_view(slot, now_ms),
        )

    # == remembered outcomes ====================================================

    def _remember_outcome(self, request_id: str, result: AnyResult, now_ms: int) -> None:
        self._outcomes[request_id] = result
        self._outcome_log.append(_OutcomeRecord(request_id, now_ms, result))
        if now_ms == self._outcome_group_ms:
            self._outcome_group.append(request_id)
            return
        self._forget_outcomes(now_ms)
        self._outcome_group_ms = now_ms
        self._outcome_group = [request_id]
        self._outcome_groups.append((now_ms, self._outcome_group))

    def _forget_outcomes(self, now_ms: int) -> None:
        """Drop the outcomes past their retention, and the oldest beyond the cap.

        Whole milliseconds go at a time, so the cap can be exceeded by the
        commands of one millisecond until the next one starts.
        """
        groups = self._outcome_groups
        outcomes = self._outcomes
        oldest_allowed_ms = now_ms - REQUEST_OUTCOMES_RETENTION_MS
        while groups and (groups[0][0] < oldest_allowed_ms or len(outcomes) > REQUEST_OUTCOMES_MAX):
            for request_id in groups.popleft()[1]:
                # Present unless storage handed the same request id over twice.
                if request_id in outcomes:
                    del outcomes[request_id]

    def _remember_idempotency(
        self, scope: IdempotencyScope, fingerprint: bytes, result: AnyResult, now_ms: int
    ) -> None:
        records = self._idempotency
        records[scope] = (now_ms, fingerprint, result)
        self._key_log.append(KeyRecord(scope[0], scope[1], scope[2], now_ms, fingerprint, result))
        order = self._idempotency_order
        order.append((now_ms, scope))
        expired_before_ms = now_ms - IDEMPOTENCY_RETENTION_MS
        while len(order) > IDEMPOTENCY_RECORDS_MAX or order[0][0] <= expired_before_ms:
            at_ms, old = order.popleft()
            record = records.get(old)
            # A key re-used after its retention has a newer record: keep that one.
            if record is not None and record[0] == at_ms:
                del records[old]

    # == invariants =============================================================

    def check_invariants(self, now_ms: int) -> None:
        """Verify every invariant of the module docstring (O(state))."""
        self._timers.check()
        holds_seen = 0
        for slot in self._slots.values():
            slot.check_counts()
            slot.line.check()
            confirmed = held = 0
            for user_id, booking in slot.active_by_user.items():
                require(booking.user_id == user_id, f"{booking.id} indexed under another user")
                require(booking.slot_id == slot.id, f"{booking.id} indexed under another slot")
                require(self._bookings.get(booking.id) is booking, f"{booking.id} not stored")
                if booking.status is BookingStatus.RESERVED:
                    held += 1
                    require(
                        self._timers.deadline_of(("hold", booking.id)) == booking.expires_at_ms,
                        f"hold {booking.id} has no timer at its deadline",
                    )
                    require(booking.expires_at_ms > now_ms, f"hold {booking.id} is overdue")
                else:
                    require(
                        booking.status is BookingStatus.CONFIRMED,
                        f"{booking.id} is {booking.status} but counted as active",
                    )
                    confirmed += 1
            holds_seen += held
            require(
                (confirmed, held) == (slot.confirmed, slot.held),
                f"slot {slot.id}: counts {slot.confirmed}/{slot.held}"
                f" but bookings say {confirmed}/{held}",
            )
            waiting = {u for u, e in slot.entries.items() if e.status is QueueStatus.WAITING}
            require(waiting == set(slot.line), f"slot {slot.id}: line and entries disagree")
            require(waiting == set(slot.idle), f"slot {slot.id}: idle order and line disagree")
            seen = [slot.entries[u].last_seen_ms for u in slot.idle]
            require(seen == sorted(seen), f"slot {slot.id}: idle order is not by last seen")
            if seen:
                idle_timer_ms = self._timers.deadline_of(("idle", slot.id))
                require(
                    idle_timer_ms is not None
                    and idle_timer_ms <= seen[0] + slot.queue_inactivity_ms,
                    f"slot {slot.id}: no idle timer by the front user's deadline",
                )
            require(
                len(list(slot.line)) <= slot.queue_size_max,
                f"slot {slot.id}: line over its size",
            )
            for user_id, entry in slot.entries.items():
                if entry.status is QueueStatus.NOTIFIED:
                    offered = slot.active_by_user.get(user_id)
                    require(
                        offered is not None
                        and offered.id == entry.booking_id
                        and offered.status is BookingStatus.RESERVED
                        and offered.via_queue,
                        f"slot {slot.id}: NOTIFIED {user_id} has no offered hold",
                    )
                if entry.status is QueueStatus.WAITING:
                    require(
                        user_id not in slot.active_by_user,
                        f"slot {slot.id}: {user_id} waits while holding",
                    )
            if slot.status(now_ms) in SLOT_TAKES_HOLDS:
                require(
                    slot.available == 0 or not slot.line.size,
                    f"slot {slot.id}: free capacity while users wait",
                )
            if slot.ended:
                require(
                    not slot.active_by_user and not slot.line.size, f"ended slot {slot.id} active"
                )
        for booking in self._bookings.values():
            if booking.status in BOOKING_FINAL or booking.status is BookingStatus.CONFIRMED:
                continue
            require(
                booking.status is BookingStatus.RESERVED, f"{booking.id} stuck in {booking.status}"
            )
            owner = self._slots.get(booking.slot_id)
            require(
                owner is not None and owner.active_by_user.get(booking.user_id) is booking,
                f"hold {booking.id} not indexed by its slot",
            )
        require(
            holds_seen
            == sum(1 for b in self._bookings.values() if b.status is BookingStatus.RESERVED),
            "holds outside any slot",
        )

    def slots(self) -> Iterator[SlotView]:
        now_ms = self._now_ms
        return (self._slot_view(slot, now_ms) for slot in self._slots.values())


def _copy(record: _R) -> _R:
    """A detached copy: replies and events must not change with later commands."""
    return _replace(record)


def _prior_ms(slot: _Slot) -> int:
    """The wait per place before the line has moved: one hold TTL shared by the capacity."""
    return slot.hold_ttl_ms // max(1, slot.capacity)
