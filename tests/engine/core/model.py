"""A naive reference model of one shard, and a harness that checks a shard against it.

``ShardModel`` keeps plain lists and dicts of what a shard should hold: every
slot's waiting users in join order, every booking's status, who holds what.
It learns each change from the shard's events and checks every event as it
applies it (legal transitions only, final states stay final, offers go to the
head of the line, one active booking or queue entry per user and slot, no
hold outlives its deadline), and it predicts the outcome of the next command
from the rules in docs/api.md. It never reads the shard's private state: only
results, events, views and ``statistics()``.

``ShardHarness`` drives a ``ShardCore`` with a ``ManualClock``: it predicts
each command (a replay of a remembered request id or Idempotency-Key must
return the first result unchanged), runs it, applies the events, and
compares. Both the property tests and the simulation use it.

Nothing here may import the shard's internals (``engine.core.shard`` only for
the class under test).
"""

import collections
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from engine.core.clock import ManualClock
from engine.core.limits import (
    ENDED_SLOT_RETENTION_MS,
    FINAL_BOOKING_RETENTION_MS,
    IDEMPOTENCY_RETENTION_MS,
    LIST_LIMIT_MAX,
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
    ExtendHold,
    Failure,
    GetBooking,
    GetSlot,
    JoinQueue,
    LeaveQueue,
    ListBookings,
    ListSlots,
    QueueChanged,
    QueueMoved,
    QueuePosition,
    QueueResult,
    ReleaseHold,
    Reserve,
    SlotChanged,
    SlotPage,
    SlotResult,
    UpdateSlot,
)
from engine.core.records import SlotView
from engine.core.routing import shard_of
from engine.core.shard import ShardCore

# Booking statuses and the moves docs/api.md allows, written out independently of
# engine/core/states.py so that a wrong table there is caught here.
PENDING: Final = "PENDING"
RESERVED: Final = "RESERVED"
CONFIRMED: Final = "CONFIRMED"
EXPIRED: Final = "EXPIRED"
CANCELLED: Final = "CANCELLED"
COMPLETED: Final = "COMPLETED"
LEGAL_MOVES: Final = frozenset(
    {
        (PENDING, RESERVED),
        (RESERVED, CONFIRMED),
        (RESERVED, EXPIRED),
        # An extension: the deadline moves on, the status stays.
        (RESERVED, RESERVED),
        (CONFIRMED, CANCELLED),
        (CONFIRMED, COMPLETED),
    }
)
FINAL: Final = frozenset({EXPIRED, CANCELLED, COMPLETED})
# A status and every status a booking may reach from it (the client ledger's rule).
REACHABLE: Final[dict[str, frozenset[str]]] = {
    RESERVED: frozenset({RESERVED, CONFIRMED, EXPIRED, CANCELLED, COMPLETED}),
    CONFIRMED: frozenset({CONFIRMED, CANCELLED, COMPLETED}),
    EXPIRED: frozenset({EXPIRED}),
    CANCELLED: frozenset({CANCELLED}),
    COMPLETED: frozenset({COMPLETED}),
}

WAITING: Final = "WAITING"
NOTIFIED: Final = "NOTIFIED"
CONVERTED: Final = "CONVERTED"

READ_ONLY: Final = READ_ONLY_COMMANDS
# The harness remembers this many recent request outcomes (replays pick recent ones).
OUTCOMES_KEPT: Final = 20_000


class ModelMismatch(AssertionError):
    """The shard said or did something the model says it must not."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ModelMismatch(message)


@dataclass(frozen=True)
class Expected:
    status: int
    code: str | None = None  # the Failure code, None for a success

    def __str__(self) -> str:
        return f"{self.status} {self.code or ''}".strip()


@dataclass
class MSlot:
    id: str
    resource_id: str
    domain: str
    policy: DomainPolicy
    start_ms: int
    end_ms: int
    capacity: int
    blocked: bool
    ended_at_ms: int | None = None
    held: int = 0
    confirmed: int = 0
    # (seq, user) of the WAITING users, head first: the naive list.
    line: list[tuple[int, str]] = field(default_factory=list)
    last_seq: int = 0
    # user -> the status of that user's latest queue entry (gone after leaving)
    entries: dict[str, str] = field(default_factory=dict)
    entry_booking: dict[str, str | None] = field(default_factory=dict)
    # user -> the latest time the user may have been seen (a repeat past the
    # retention window may or may not have run again, and a run touches) ...
    last_seen_ms: dict[str, int] = field(default_factory=dict)
    # ... and the latest time the user was surely seen.
    surely_seen_ms: dict[str, int] = field(default_factory=dict)
    # user -> id of that user's RESERVED or CONFIRMED booking of this slot
    active: dict[str, str] = field(default_factory=dict)
    last_offered_seq: int = 0
    # The (seq, user) at the front of the line before its latest move: an offer's
    # move comes first, then its hold and "notified" entry, which must name it.
    departed_head: tuple[int, str] | None = None

    @property
    def available(self) -> int:
        return max(0, self.capacity - self.confirmed - self.held)

    def status(self, now_ms: int) -> str:
        if self.blocked:
            return "BLOCKED"
        if self.ended_at_ms is not None or now_ms >= self.end_ms:
            return "EXPIRED"
        if self.confirmed >= self.capacity:
            return "BOOKED"
        if self.held > 0:
            return "RESERVED"
        return "AVAILABLE"

    def takes_holds(self, now_ms: int) -> bool:
        return self.status(now_ms) in ("AVAILABLE", "RESERVED")

    def position(self, user_id: str) -> int | None:
        for index, (_, waiting_user) in enumerate(self.line):
            if waiting_user == user_id:
                return index + 1
        return None

    def waiting_users(self) -> list[str]:
        return [user for _, user in self.line]


@dataclass
class MBooking:
    id: str
    user_id: str
    slot_id: str
    status: str
    expires_at_ms: int
    via_queue: bool
    reserved_at_ms: int
    final_at_ms: int | None = None
    version: int = 1
    extensions: int = 0


class ShardModel:
    """What one shard should hold, kept naively, updated from its events."""

    def __init__(
        self,
        policies: dict[str, DomainPolicy],
        now_ms: int,
        *,
        shard_id: int = 0,
        shard_count: int = 1,
    ) -> None:
        self.policies = policies
        self.now_ms = now_ms
        self.shard_id = shard_id
        self.shard_count = shard_count
        self.slots: dict[str, MSlot] = {}
        self.bookings: dict[str, MBooking] = {}
        # RESERVED booking ids (the model's hold timers)
        self.holds: set[str] = set()
        self.by_user: dict[str, set[str]] = collections.defaultdict(set)
        self.forgotten_bookings: set[str] = set()
        self._finals: collections.deque[tuple[int, str]] = collections.deque()
        self._ended: collections.deque[tuple[int, str]] = collections.deque()
        # Slots whose state changed in the last ``apply`` (for cheap checks).
        self.touched: set[str] = set()
        # WAITING entries that expired in the last ``apply``: (slot, user, at).
        self._waiting_expired: list[tuple[str, str, int]] = []
        self.offers_total = 0
        self.expirations_total = 0

    # -- time ------------------------------------------------------------------

    def observe_time(self, now_ms: int) -> None:
        """The shard advanced to ``now_ms``: slots end, old records are forgotten."""
        expect(now_ms >= self.now_ms, "the model's clock went backwards")
        self.now_ms = now_ms
        for slot in self.slots.values():
            if slot.ended_at_ms is None and slot.end_ms <= now_ms:
                slot.ended_at_ms = now_ms
                self._ended.append((now_ms, slot.id))
                self.touched.add(slot.id)
        while self._finals and self._finals[0][0] + FINAL_BOOKING_RETENTION_MS <= now_ms:
            _, booking_id = self._finals.popleft()
            self.by_user[self.bookings.pop(booking_id).user_id].discard(booking_id)
            self.forgotten_bookings.add(booking_id)
        while self._ended and self._ended[0][0] + ENDED_SLOT_RETENTION_MS <= now_ms:
            _, slot_id = self._ended.popleft()
            slot = self.slots.get(slot_id)
            if slot is not None and slot.ended_at_ms is not None:
                del self.slots[slot_id]

    def check_timers(self) -> None:
        """Nothing due is still pending: holds lapse, idle users leave, slots end on time."""
        now_ms = self.now_ms
        for booking_id in self.holds:
            booking = self.bookings[booking_id]
            expect(
                booking.expires_at_ms > now_ms,
                f"hold {booking_id} still RESERVED at {now_ms}, deadline {booking.expires_at_ms}",
            )
        for slot in self.slots.values():
            if slot.ended_at_ms is None:
                expect(slot.end_ms > now_ms, f"slot {slot.id} has not ended at {now_ms}")
            inactivity_ms = slot.policy.queue_inactivity_ms
            for _, user in slot.line:
                expect(
                    slot.last_seen_ms[user] + inactivity_ms > now_ms,
                    f"{user} still WAITING on {slot.id} after the inactivity timeout",
                )

    # -- events ----------------------------------------------------------------

    def apply(self, events: Iterable[AnyEvent]) -> None:
        """Apply the shard's events in order, checking each one."""
        self._waiting_expired = []
        for event in events:
            expect(event.at_ms == self.now_ms, f"event at {event.at_ms}, clock at {self.now_ms}")
            if isinstance(event, BookingChanged):
                self._booking_changed(event)
            elif isinstance(event, QueueChanged):
                self._queue_changed(event)
            elif isinstance(event, QueueMoved):
                self._queue_moved(event)
            elif isinstance(event, SlotChanged):
                self._slot_changed(event)
            else:  # pragma: no cover - a new event type needs a model rule
                raise ModelMismatch(f"unknown event {event!r}")
        for slot_id, user, at_ms in self._waiting_expired:
            slot = self.slots.get(slot_id)
            if slot is not None and slot.ended_at_ms is None:
                # Neither ended nor deleted: the inactivity timeout, never early.
                expect(
                    slot.surely_seen_ms[user] + slot.policy.queue_inactivity_ms <= at_ms,
                    f"{user} timed out of {slot_id}'s queue early",
                )

    def _booking_changed(self, event: BookingChanged) -> None:
        record = event.booking
        moved = (event.from_status.value, event.to_status.value)
        expect(moved in LEGAL_MOVES, f"illegal move {moved} of {record.id}")
        expect(record.status.value == moved[1], f"{record.id}: event says {moved}, record not")
        self.touched.add(record.slot_id)
        if moved[0] == PENDING:
            expect(record.id not in self.bookings, f"booking id {record.id} issued twice")
            expect(record.id not in self.forgotten_bookings, f"booking id {record.id} reused")
            slot = self.slots.get(record.slot_id)
            expect(slot is not None, f"hold {record.id} on an unknown slot")
            assert slot is not None
            user = record.user_id
            expect(user not in slot.active, f"second active booking for {user} on {slot.id}")
            expect(slot.available > 0, f"hold {record.id} on {slot.id} without free capacity")
            expect(slot.takes_holds(self.now_ms), f"hold on {slot.id} while it takes none")
            if record.via_queue:
                ttl_ms = slot.policy.claim_ttl_ms
                head = slot.departed_head
                expect(
                    head is not None and head[1] == user,
                    f"offer on {slot.id} to {user}, but the head of the line is "
                    f"{head[1] if head else None}",
                )
            else:
                ttl_ms = slot.policy.hold_ttl_ms
                expect(
                    not slot.line, f"a new arrival {user} took a hold while users wait on {slot.id}"
                )
            expect(
                record.expires_at_ms == self.now_ms + ttl_ms,
                f"hold {record.id} expires at {record.expires_at_ms}, not now + {ttl_ms}",
            )
            expect(
                record.reserved_at_ms == self.now_ms and record.version == 1,
                f"new hold {record.id}: reserved at {record.reserved_at_ms}, v{record.version}",
            )
            self.bookings[record.id] = MBooking(
                id=record.id,
                user_id=user,
                slot_id=slot.id,
                status=RESERVED,
                expires_at_ms=record.expires_at_ms,
                via_queue=record.via_queue,
                reserved_at_ms=record.reserved_at_ms,
            )
            slot.active[user] = record.id
            slot.held += 1
            self.holds.add(record.id)
            self.by_user[user].add(record.id)
            return
        booking = self.bookings.get(record.id)
        expect(booking is not None, f"event for unknown booking {record.id}")
        assert booking is not None
        expect(
            booking.status == moved[0],
            f"{record.id} moved from {moved[0]} but the model has it {booking.status}"
            + (" (a final state changed)" if booking.status in FINAL else ""),
        )
        slot = self.slots.get(booking.slot_id)
        expect(slot is not None, f"{record.id} changed on a slot that is gone")
        assert slot is not None
        expect(
            record.version == booking.version + 1,
            f"{record.id} went from version {booking.version} to {record.version}",
        )
        booking.version = record.version
        stamp = {
            CONFIRMED: record.confirmed_at_ms,
            CANCELLED: record.cancelled_at_ms,
            COMPLETED: record.completed_at_ms,
        }.get(moved[1], self.now_ms)
        expect(stamp == self.now_ms, f"{record.id} {moved[1]} stamped {stamp}, not now")
        if moved[1] == CANCELLED:
            expect(
                record.refund_percentage is not None and record.cancelled_by is not None,
                f"{record.id} cancelled without refund or canceller",
            )
        if moved == (RESERVED, CONFIRMED):
            expect(self.now_ms < booking.expires_at_ms, f"{record.id} confirmed after its deadline")
            slot.held -= 1
            slot.confirmed += 1
            self.holds.discard(record.id)
        elif moved == (RESERVED, RESERVED):
            expect(event.trigger == "extended", f"{record.id} RESERVED again by {event.trigger}")
            policy = slot.policy
            expect(
                booking.extensions < policy.hold_extensions_max
                and booking.expires_at_ms < slot.start_ms,
                f"{record.id} extended past its limit or its slot's start",
            )
            deadline_ms = min(booking.expires_at_ms + policy.hold_extension_ms, slot.start_ms)
            expect(
                record.expires_at_ms == deadline_ms and record.extensions == booking.extensions + 1,
                f"{record.id} extended to {record.expires_at_ms} (#{record.extensions}),"
                f" not {deadline_ms} (#{booking.extensions + 1})",
            )
            booking.expires_at_ms = deadline_ms
            booking.extensions = record.extensions
        elif moved == (RESERVED, EXPIRED):
            if event.trigger in ("hold_ttl", "claim_ttl"):
                expect(booking.expires_at_ms <= self.now_ms, f"{record.id} expired early")
            slot.held -= 1
            del slot.active[booking.user_id]
            self.holds.discard(record.id)
            self.expirations_total += 1
        elif moved == (CONFIRMED, COMPLETED):
            expect(slot.ended_at_ms is not None, f"{record.id} completed before its slot ended")
            slot.confirmed -= 1
            del slot.active[booking.user_id]
        else:
            slot.confirmed -= 1
            del slot.active[booking.user_id]
        booking.status = moved[1]
        if moved[1] in FINAL:
            booking.final_at_ms = self.now_ms
            self._finals.append((self.now_ms, booking.id))

    def _queue_changed(self, event: QueueChanged) -> None:
        entry = event.entry
        slot = self.slots.get(entry.slot_id)
        expect(slot is not None, f"queue event on unknown slot {entry.slot_id}")
        assert slot is not None
        self.touched.add(slot.id)
        user = entry.user_id
        change = event.change
        prior = slot.entries.get(user)
        if change == "joined":
            expect(entry.status.value == WAITING, "a join that is not WAITING")
            expect(prior not in (WAITING, NOTIFIED), f"{user} joined {slot.id} twice")
            expect(user not in slot.active, f"{user} joined {slot.id} while holding or booked")
            expect(slot.policy.queue_enabled, f"{user} joined {slot.id} with the queue disabled")
            expect(
                len(slot.line) < slot.policy.queue_size_max, f"{slot.id}'s queue grew past its max"
            )
            expect(entry.seq > slot.last_seq, f"join order on {slot.id} went backwards")
            slot.last_seq = entry.seq
            slot.line.append((entry.seq, user))
            slot.entries[user] = WAITING
            slot.entry_booking[user] = None
            slot.last_seen_ms[user] = slot.surely_seen_ms[user] = self.now_ms
        elif change == "notified":
            expect(
                slot.departed_head == (entry.seq, user),
                f"offer on {slot.id} went to {user} (seq {entry.seq}), not the earliest "
                f"waiting user {slot.departed_head}",
            )
            slot.departed_head = None
            slot.last_offered_seq = entry.seq
            booking_id = slot.active.get(user)
            expect(
                booking_id is not None and booking_id == entry.booking_id,
                f"offer to {user} on {slot.id} names booking {entry.booking_id}, not {booking_id}",
            )
            assert booking_id is not None
            booking = self.bookings[booking_id]
            expect(booking.via_queue and booking.status == RESERVED, "offer without its hold")
            expect(
                event.offer_expires_at_ms == booking.expires_at_ms,
                "offer deadline differs from the hold's",
            )
            expect(entry.status.value == NOTIFIED, "a notified entry that is not NOTIFIED")
            slot.entries[user] = NOTIFIED
            slot.entry_booking[user] = booking_id
            self.offers_total += 1
        elif change == "converted":
            expect(prior == NOTIFIED, f"{user} converted on {slot.id} from {prior}")
            booking_id = slot.entry_booking.get(user)
            expect(
                booking_id == entry.booking_id and self.bookings[booking_id].status == CONFIRMED,
                "converted without a confirmed offer",
            )
            slot.entries[user] = CONVERTED
        elif change == "expired":
            expect(prior in (WAITING, NOTIFIED), f"{user}'s {prior} entry on {slot.id} expired")
            expect(
                all(waiting_user != user for _, waiting_user in slot.line),
                f"{user} expired but is still in {slot.id}'s line",
            )
            if prior == NOTIFIED:
                booking_id = slot.entry_booking.get(user)
                expect(
                    booking_id is not None and self.bookings[booking_id].status == EXPIRED,
                    f"{user}'s offer on {slot.id} expired but its hold did not",
                )
            else:
                self._waiting_expired.append((slot.id, user, self.now_ms))
            slot.entries[user] = EXPIRED
        elif change == "left":
            expect(
                all(waiting_user != user for _, waiting_user in slot.line),
                f"{user} left {slot.id} but is still in line",
            )
            expect(prior in (WAITING, EXPIRED), f"{user} left {slot.id} from {prior}")
            del slot.entries[user]
            slot.entry_booking.pop(user, None)
            slot.last_seen_ms.pop(user, None)
            slot.surely_seen_ms.pop(user, None)
        else:
            raise ModelMismatch(f"unknown queue change {change!r}")

    def _queue_moved(self, event: QueueMoved) -> None:
        slot = self.slots.get(event.slot_id)
        expect(slot is not None, f"queue moved on unknown slot {event.slot_id}")
        assert slot is not None
        self.touched.add(slot.id)
        for index, (seq, _) in enumerate(slot.line):
            if seq == event.removed_seq:
                slot.departed_head = slot.line[0]
                del slot.line[index]
                break
        else:
            raise ModelMismatch(f"{slot.id}: seq {event.removed_seq} left a line it was not in")
        expect(
            event.total_in_queue == len(slot.line),
            f"{slot.id}: {event.total_in_queue} in queue, the model has {len(slot.line)}",
        )

    def _slot_changed(self, event: SlotChanged) -> None:
        view = event.slot
        self.touched.add(view.id)
        if event.change == "created":
            expect(view.id not in self.slots, f"slot {view.id} created twice")
            self.slots[view.id] = MSlot(
                id=view.id,
                resource_id=view.resource_id,
                domain=view.domain,
                policy=self.policies[view.domain],
                start_ms=view.start_ms,
                end_ms=view.end_ms,
                capacity=view.capacity,
                blocked=view.blocked,
            )
        slot = self.slots.get(view.id)
        expect(slot is not None, f"{event.change} event for unknown slot {view.id}")
        assert slot is not None
        if event.change == "updated":
            expect(slot.ended_at_ms is None, f"ended slot {slot.id} changed")
            slot.start_ms, slot.end_ms = view.start_ms, view.end_ms
            slot.capacity, slot.blocked = view.capacity, view.blocked
        self.check_view(view)
        if event.change == "deleted":
            expect(not slot.active and not slot.line, f"slot {slot.id} deleted while active")
            del self.slots[slot.id]

    # -- checks ----------------------------------------------------------------

    def check_view(self, view: SlotView) -> None:
        """A slot view agrees with the model's counts, line and status."""
        slot = self.slots.get(view.id)
        expect(slot is not None, f"the shard has slot {view.id}, the model does not")
        assert slot is not None
        expect(view.current_bookings + view.held_count <= view.capacity, f"{view.id} overbooked")
        expect(
            (view.capacity, view.current_bookings, view.held_count, view.available)
            == (slot.capacity, slot.confirmed, slot.held, slot.available),
            f"{view.id}: capacity/confirmed/held/available "
            f"{(view.capacity, view.current_bookings, view.held_count, view.available)}, "
            f"model {(slot.capacity, slot.confirmed, slot.held, slot.available)}",
        )
        expect(
            view.queue_length == len(slot.line),
            f"{view.id}: queue length {view.queue_length}, model {len(slot.line)}",
        )
        expect(view.queue_length <= slot.policy.queue_size_max, f"{view.id}: queue over its max")
        expect(
            view.status.value == slot.status(self.now_ms),
            f"{view.id}: status {view.status.value}, model {slot.status(self.now_ms)}",
        )
        expect(
            (view.start_ms, view.end_ms, view.blocked)
            == (slot.start_ms, slot.end_ms, slot.blocked),
            f"{view.id}: times or blocked flag differ",
        )

    def check_structure(self, slot_ids: Iterable[str] | None = None) -> None:
        """The model's own rules; a shard that fed it bad events breaks them."""
        ids = self.slots.keys() if slot_ids is None else slot_ids
        for slot_id in ids:
            slot = self.slots.get(slot_id)
            if slot is None:
                continue
            held = confirmed = 0
            for user, booking_id in slot.active.items():
                booking = self.bookings[booking_id]
                expect(
                    booking.user_id == user and booking.slot_id == slot.id,
                    f"{booking_id} filed under the wrong user or slot",
                )
                if booking.status == RESERVED:
                    held += 1
                else:
                    expect(booking.status == CONFIRMED, f"{booking_id} active as {booking.status}")
                    confirmed += 1
            expect((held, confirmed) == (slot.held, slot.confirmed), f"{slot.id}: counts drift")
            expect(held + confirmed <= slot.capacity, f"{slot.id}: over capacity")
            expect(len(slot.line) <= slot.policy.queue_size_max, f"{slot.id}: queue over max")
            seqs = [seq for seq, _ in slot.line]
            expect(seqs == sorted(set(seqs)), f"{slot.id}: line out of join order")
            users = slot.waiting_users()
            expect(len(users) == len(set(users)), f"{slot.id}: a user waits twice")
            for user in users:
                expect(slot.entries.get(user) == WAITING, f"{user} in line but not WAITING")
                expect(user not in slot.active, f"{user} waits on {slot.id} while holding")
            waiting = sum(1 for status in slot.entries.values() if status == WAITING)
            expect(waiting == len(users), f"{slot.id}: WAITING entries outside the line")
            for user, status in slot.entries.items():
                if status == NOTIFIED:
                    booking_id = slot.active.get(user)
                    expect(
                        booking_id is not None
                        and booking_id == slot.entry_booking.get(user)
                        and self.bookings[booking_id].via_queue
                        and self.bookings[booking_id].status == RESERVED,
                        f"{user} NOTIFIED on {slot.id} without the offered hold",
                    )
            if slot.takes_holds(self.now_ms):
                expect(
                    slot.available == 0 or not slot.line,
                    f"{slot.id}: free capacity while {len(slot.line)} users wait",
                )
            if slot.ended_at_ms is not None:
                expect(not slot.active and not slot.line, f"ended slot {slot.id} still active")

    def check_statistics(self, core: ShardCore) -> None:
        stats = core.statistics()
        expect(stats.slots == len(self.slots), f"{stats.slots} slots, model {len(self.slots)}")
        expect(
            stats.bookings_in_memory == len(self.bookings),
            f"{stats.bookings_in_memory} bookings in memory, model {len(self.bookings)}",
        )
        expect(stats.holds == len(self.holds), f"{stats.holds} holds, model {len(self.holds)}")
        confirmed = sum(slot.confirmed for slot in self.slots.values())
        expect(stats.confirmed == confirmed, f"{stats.confirmed} confirmed, model {confirmed}")
        waiting = sum(len(slot.line) for slot in self.slots.values())
        expect(stats.waiting == waiting, f"{stats.waiting} waiting, model {waiting}")
        expect(stats.offers_total == self.offers_total, "offer counts differ")
        expect(stats.expirations_total == self.expirations_total, "expiration counts differ")

    # -- predictions -----------------------------------------------------------

    def predict(self, command: AnyCommand) -> Expected:
        """The outcome docs/api.md (and the shard's documented check order) gives."""
        now_ms = self.now_ms
        if isinstance(command, CreateSlot):
            if shard_of(command.slot_id, self.shard_count) != self.shard_id:
                return Expected(422, "ValidationError")
            if command.slot_id in self.slots:
                return Expected(409, "Conflict")
            if command.domain not in self.policies or not command.resource_id:
                return Expected(422, "ValidationError")
            if not self._good_shape(command.start_ms, command.end_ms, command.capacity):
                return Expected(422, "ValidationError")
            if self._overlaps(command.resource_id, command.start_ms, command.end_ms, None):
                return Expected(409, "SlotOverlap")
            return Expected(201)
        if isinstance(command, UpdateSlot):
            slot = self.slots.get(command.slot_id)
            if slot is None:
                return Expected(404, "NotFound")
            if slot.ended_at_ms is not None:
                return Expected(409, "SlotNotReservable")
            start_ms = slot.start_ms if command.start_ms is None else command.start_ms
            end_ms = slot.end_ms if command.end_ms is None else command.end_ms
            capacity = slot.capacity if command.capacity is None else command.capacity
            if not self._good_shape(start_ms, end_ms, capacity):
                return Expected(422, "ValidationError")
            if capacity < slot.confirmed + slot.held:
                return Expected(409, "CapacityBelowBookings")
            if (start_ms, end_ms) != (slot.start_ms, slot.end_ms) and self._overlaps(
                slot.resource_id, start_ms, end_ms, slot.id
            ):
                return Expected(409, "SlotOverlap")
            return Expected(200)
        if isinstance(command, DeleteSlot):
            slot = self.slots.get(command.slot_id)
            if slot is None:
                return Expected(404, "NotFound")
            if slot.active and not command.force:
                return Expected(409, "SlotHasBookings")
            return Expected(204)
        if isinstance(command, GetSlot):
            return Expected(200) if command.slot_id in self.slots else Expected(404, "NotFound")
        if isinstance(command, (ListSlots, ListBookings)):
            return Expected(200)
        if isinstance(command, Reserve):
            slot = self.slots.get(command.slot_id)
            if slot is None:
                return Expected(404, "NotFound")
            refused = self._not_reservable(slot)
            if refused is not None:
                return refused
            booking_id = slot.active.get(command.user_id)
            if booking_id is not None:
                if self.bookings[booking_id].status == CONFIRMED:
                    return Expected(409, "AlreadyBooked")
                return Expected(200)
            if slot.available > 0 and not slot.line:
                return Expected(201)
            if not slot.policy.queue_enabled:
                return Expected(409, "SlotFull")
            if slot.entries.get(command.user_id) == WAITING:
                return Expected(200)
            if len(slot.line) >= slot.policy.queue_size_max:
                return Expected(409, "QueueFull")
            return Expected(202)
        if isinstance(command, Confirm):
            booking = self._booking_for(command.booking_id, command.user_id, as_admin=False)
            if booking is None:
                return Expected(404, "NotFound")
            if booking.status in (RESERVED, CONFIRMED):
                return Expected(200)
            if booking.status == EXPIRED:
                return Expected(409, "ReservationExpired")
            return Expected(409, "InvalidTransition")
        if isinstance(command, ExtendHold):
            booking = self._booking_for(command.booking_id, command.user_id, as_admin=False)
            if booking is None:
                return Expected(404, "NotFound")
            if booking.status == EXPIRED:
                return Expected(409, "ReservationExpired")
            if booking.status != RESERVED:
                return Expected(409, "InvalidTransition")
            slot = self.slots[booking.slot_id]
            if booking.extensions >= slot.policy.hold_extensions_max:
                return Expected(409, "ExtensionLimitReached")
            if booking.expires_at_ms >= slot.start_ms:
                return Expected(409, "HoldAtSlotStart")
            return Expected(200)
        if isinstance(command, ReleaseHold):
            booking = self._booking_for(command.booking_id, command.user_id, as_admin=False)
            if booking is None:
                return Expected(404, "NotFound")
            if booking.status != RESERVED:
                return Expected(409, "InvalidTransition")
            return Expected(200)
        if isinstance(command, Cancel):
            booking = self._booking_for(command.booking_id, command.user_id, command.as_admin)
            if booking is None:
                return Expected(404, "NotFound")
            if command.as_admin and not (command.reason and command.reason.strip()):
                return Expected(422, "ValidationError")
            if booking.status != CONFIRMED:
                return Expected(409, "InvalidTransition")
            if not command.as_admin:
                slot = self.slots[booking.slot_id]
                closes_at_ms = slot.start_ms - slot.policy.cancel_allowed_until_ms
                if now_ms >= slot.start_ms or now_ms > closes_at_ms:
                    return Expected(409, "CancellationWindowClosed")
            return Expected(200)
        if isinstance(command, GetBooking):
            booking = self._booking_for(command.booking_id, command.user_id, command.as_admin)
            return Expected(404, "NotFound") if booking is None else Expected(200)
        if isinstance(command, JoinQueue):
            slot = self.slots.get(command.slot_id)
            if slot is None:
                return Expected(404, "NotFound")
            refused = self._not_reservable(slot)
            if refused is not None:
                return refused
            user = command.user_id
            booking_id = slot.active.get(user)
            if booking_id is not None and self.bookings[booking_id].status == CONFIRMED:
                return Expected(409, "AlreadyBooked")
            if slot.entries.get(user) in (WAITING, NOTIFIED):
                return Expected(200)
            if booking_id is not None:
                return Expected(409, "AlreadyHeld")
            if not slot.policy.queue_enabled:
                return Expected(409, "QueueDisabled")
            if slot.available > 0 and not slot.line:
                return Expected(409, "SlotAvailable")
            if len(slot.line) >= slot.policy.queue_size_max:
                return Expected(409, "QueueFull")
            return Expected(201)
        if isinstance(command, LeaveQueue):
            slot = self.slots.get(command.slot_id)
            if slot is None or slot.entries.get(command.user_id) not in (WAITING, NOTIFIED):
                return Expected(404, "NotFound")
            return Expected(204)
        if isinstance(command, QueuePosition):
            slot = self.slots.get(command.slot_id)
            if slot is None or command.user_id not in slot.entries:
                return Expected(404, "NotFound")
            return Expected(200)
        raise ModelMismatch(f"no prediction for {command!r}")

    def list_slots(self, command: ListSlots) -> list[str]:
        """Slot ids by (start, id) after the cursor, filtered, at most ``limit``."""
        limit = max(1, min(command.limit, LIST_LIMIT_MAX))
        ids: list[str] = []
        for slot in sorted(self.slots.values(), key=lambda s: (s.start_ms, s.id)):
            key = (slot.start_ms, slot.id)
            if command.after is not None and key <= command.after:
                continue
            if command.from_ms is not None and slot.start_ms < command.from_ms:
                continue
            if command.to_ms is not None and slot.start_ms >= command.to_ms:
                continue
            if command.resource_id is not None and slot.resource_id != command.resource_id:
                continue
            status = slot.status(self.now_ms)
            if command.status is not None and status != command.status.value:
                continue
            if command.available_only and not (slot.takes_holds(self.now_ms) and slot.available):
                continue
            ids.append(slot.id)
        return ids[:limit]

    def list_bookings(self, command: ListBookings) -> list[str]:
        """A user's booking ids, newest first, before the cursor, filtered, at most ``limit``."""
        limit = max(1, min(command.limit, LIST_LIMIT_MAX))
        mine = sorted(
            (self.bookings[b] for b in self.by_user.get(command.user_id, ())),
            key=lambda b: (b.reserved_at_ms, b.id),
            reverse=True,
        )
        ids = [
            b.id
            for b in mine
            if (command.after is None or (b.reserved_at_ms, b.id) < command.after)
            and (command.status is None or b.status == command.status.value)
        ]
        return ids[:limit]

    def _good_shape(self, start_ms: int, end_ms: int, capacity: int) -> bool:
        return (
            1 <= capacity <= SLOT_CAPACITY_MAX
            and start_ms < end_ms
            and end_ms - start_ms <= SLOT_DURATION_MAX_MS
            and end_ms > self.now_ms
        )

    def _overlaps(self, resource_id: str, start_ms: int, end_ms: int, ignore: str | None) -> bool:
        return any(
            other.resource_id == resource_id
            and other.id != ignore
            and other.start_ms < end_ms
            and start_ms < other.end_ms
            for other in self.slots.values()
        )

    def _not_reservable(self, slot: MSlot) -> Expected | None:
        if slot.status(self.now_ms) in ("BLOCKED", "EXPIRED"):
            return Expected(409, "SlotNotReservable")
        if slot.start_ms > self.now_ms + slot.policy.advance_booking_ms:
            return Expected(409, "OutsideBookingWindow")
        return None

    def _booking_for(self, booking_id: str, user_id: str, as_admin: bool) -> MBooking | None:
        booking = self.bookings.get(booking_id)
        if booking is None or (not as_admin and booking.user_id != user_id):
            return None
        return booking


# -- the harness ---------------------------------------------------------------


def _neutral(command: AnyCommand) -> AnyCommand:
    """The command without its request id and key: what an Idempotency-Key fingerprints."""
    return msgspec.structs.replace(command, request_id="", idempotency_key=None)


def _describe(result: AnyResult) -> str:
    if isinstance(result, Failure):
        return f"{result.status} {result.code}: {result.message}"
    return f"{result.status} {type(result).__name__}"


@dataclass
class Outcome:
    """What the harness expects of one command, and what it got."""

    command: AnyCommand
    result: AnyResult
    replayed: bool  # answered from a remembered request id or key
    events: list[AnyEvent]


class ShardHarness:
    """One ``ShardCore`` on a ``ManualClock``, checked command by command against the model."""

    def __init__(
        self,
        policies: dict[str, DomainPolicy],
        start_ms: int,
        *,
        snapshot_refusals: bool = False,
        users: Iterable[str] = (),
    ) -> None:
        self.clock = ManualClock(start_ms)
        uniques = itertools.count(1)
        self.core = ShardCore(
            shard_id=0,
            shard_count=1,
            policies=policies,
            now_ms=start_ms,
            new_unique=lambda: f"{next(uniques):x}",
        )
        self.model = ShardModel(policies, start_ms)
        self.snapshot_refusals = snapshot_refusals
        self.users = list(users)
        self._request_ids = itertools.count(1)
        # A mirror of the shard's memory of request ids: id -> (when, first result).
        self.outcomes: dict[str, tuple[int, AnyCommand, AnyResult]] = {}
        # (user, command, key) -> (neutral command, first result, when)
        self.idempotency: dict[tuple[str, str, str], tuple[AnyCommand, AnyResult, int]] = {}
        self.tally: collections.Counter[str] = collections.Counter()
        self.events_seen = 0

    @property
    def now_ms(self) -> int:
        return self.clock.now_ms()

    def request_id(self) -> str:
        return f"r{next(self._request_ids)}"

    def advance(self, delta_ms: int) -> list[AnyEvent]:
        """Move the clock; the shard fires its timers, the model follows and checks."""
        now_ms = self.clock.advance_ms(delta_ms)
        self.core.advance(now_ms)
        self.model.observe_time(now_ms)
        events = self.core.drain_events()
        self._count_events(events)
        for event in events:
            expect(
                (event.request_id, event.actor) == ("", "system"),
                f"a timer's event names a request or a caller: {event!r}",
            )
        self.model.apply(events)
        self.tally["advance"] += 1
        return events

    def _count_events(self, events: list[AnyEvent]) -> None:
        self.events_seen += len(events)
        tally = self.tally
        for event in events:
            if isinstance(event, BookingChanged):
                tally[f"event booking {event.to_status.value} ({event.trigger})"] += 1
            elif isinstance(event, QueueChanged):
                tally[f"event queue {event.change}"] += 1

    def run(self, command: AnyCommand) -> Outcome:
        """Execute one command at the clock's time and check it every way the model can.

        The shard keeps request outcomes at least ``REQUEST_OUTCOMES_RETENTION_MS``
        and Idempotency-Keys at least ``IDEMPOTENCY_RETENTION_MS``: inside those
        windows a repeat must be answered with the first result; after them it
        may be, or it may run afresh (then it must match the prediction).
        """
        now_ms = self.clock.now_ms()
        model = self.model
        model.touched = set()
        sure_replay: AnyResult | None = None
        maybe_replays: list[AnyResult] = []
        also_allowed: list[Expected] = []
        expected: Expected | None = None
        remember_key: tuple[str, str, str] | None = None
        remembered = not isinstance(command, READ_ONLY)
        prior = self.outcomes.get(command.request_id) if remembered else None
        if prior is not None and prior[0] >= now_ms - REQUEST_OUTCOMES_RETENTION_MS:
            sure_replay = prior[2]
        else:
            if prior is not None:
                maybe_replays.append(prior[2])
            key = getattr(command, "idempotency_key", None)
            if key is not None:
                remember_key = (getattr(command, "user_id", ""), type(command).__name__, key)
                stored = self.idempotency.get(remember_key)
                same_body = stored is not None and stored[0] == _neutral(command)
                if stored is not None and now_ms < stored[2] + IDEMPOTENCY_RETENTION_MS:
                    if same_body:
                        sure_replay = stored[1]
                    else:
                        expected = Expected(409, "IdempotencyKeyReused")
                elif stored is not None and same_body:
                    maybe_replays.append(stored[1])
                elif stored is not None:
                    also_allowed.append(Expected(409, "IdempotencyKeyReused"))
        if sure_replay is None and expected is None:
            expected = model.predict(command)
        refused = sure_replay is not None or (expected is not None and expected.code is not None)
        before = self.snapshot() if self.snapshot_refusals and refused else None

        result = self.core.execute(command, now_ms)
        events = self.core.drain_events()
        self._count_events(events)
        context = f"{command!r} at {now_ms} -> {_describe(result)}"
        replayed = sure_replay is not None or (not events and result in maybe_replays)
        if sure_replay is not None:
            expect(
                result == sure_replay,
                f"replay answered differently: {context}, first {sure_replay}",
            )
            expect(not events, f"a replay emitted events: {context}: {events}")
        if replayed:
            self.tally["replay"] += 1
        else:
            assert expected is not None
            got = Expected(result.status, result.code if isinstance(result, Failure) else None)
            expect(
                got == expected or got in also_allowed,
                f"expected {expected}, got {context}",
            )
            self.tally[f"{type(command).__name__} {got}"] += 1
            if isinstance(result, Failure):
                expect(not events, f"a refused command emitted events: {context}: {events}")
        for event in events:
            counts = isinstance(event, SlotChanged) and event.change == "counts"
            expect(
                event.request_id == ("" if counts else command.request_id),
                f"event {event!r} names request {event.request_id!r}: {context}",
            )
        if before is not None:
            after = self.snapshot()
            expect(before == after, f"a refused or replayed command changed the state: {context}")

        model.apply(events)
        if not replayed:
            self._check_result(command, result, context)
        elif sure_replay is None and isinstance(result, QueueResult):
            # Answered like the first time, but it may have run again: then it
            # counted as activity (a touch changes nothing else).
            slot = model.slots.get(result.entry.slot_id)
            if slot is not None and slot.entries.get(result.entry.user_id) == WAITING:
                slot.last_seen_ms[result.entry.user_id] = now_ms
        model.check_structure(model.touched)

        if not replayed:
            if remembered:
                self._remember(command, result, now_ms)
            reused = isinstance(result, Failure) and result.code == "IdempotencyKeyReused"
            if remember_key is not None and result.status < 500 and not reused:
                self.idempotency[remember_key] = (_neutral(command), result, now_ms)
        return Outcome(command, result, replayed, events)

    def _remember(self, command: AnyCommand, result: AnyResult, now_ms: int) -> None:
        """What the shard must still know about this request id for a while."""
        outcomes = self.outcomes
        outcomes.pop(command.request_id, None)
        outcomes[command.request_id] = (now_ms, command, result)
        while len(outcomes) > OUTCOMES_KEPT:
            del outcomes[next(iter(outcomes))]

    def _check_result(self, command: AnyCommand, result: AnyResult, context: str) -> None:
        """The body of a success says what the model now holds."""
        model = self.model
        now_ms = self.clock.now_ms()
        if isinstance(result, SlotResult):
            model.check_view(result.slot)
        elif isinstance(result, SlotPage):
            assert isinstance(command, ListSlots)
            for view in result.items:
                model.check_view(view)
            listed = [view.id for view in result.items]
            wanted = model.list_slots(command)
            expect(listed == wanted, f"listed {listed}, the model lists {wanted}: {context}")
        elif isinstance(result, BookingResult):
            record = result.booking
            booking = model.bookings.get(record.id)
            expect(booking is not None, f"unknown booking in {context}")
            assert booking is not None
            expect(record.status.value == booking.status, f"stale booking status in {context}")
            if isinstance(command, Reserve):
                expect(record.status.value == RESERVED, f"reserve answered {context}")
                slot = model.slots[command.slot_id]
                expect(
                    slot.active.get(command.user_id) == record.id, f"not the user's hold: {context}"
                )
                if result.status == 201:
                    expect(
                        record.expires_at_ms == now_ms + slot.policy.hold_ttl_ms
                        and not record.via_queue,
                        f"new hold has the wrong deadline: {context}",
                    )
            elif isinstance(command, Confirm):
                expect(record.status.value == CONFIRMED, f"confirm answered {context}")
            elif isinstance(command, Cancel):
                expect(record.status.value == CANCELLED, f"cancel answered {context}")
                slot_policy = model.policies[self._domain_of(record.slot_id)]
                refund = 100 if command.as_admin else slot_policy.refund_percentage
                expect(record.refund_percentage == refund, f"wrong refund in {context}")
        elif isinstance(result, BookingPage):
            assert isinstance(command, ListBookings)
            for record in result.items:
                booking = model.bookings.get(record.id)
                expect(
                    booking is not None and booking.status == record.status.value,
                    f"listed booking {record.id} differs from the model",
                )
            listed = [record.id for record in result.items]
            wanted = model.list_bookings(command)
            expect(listed == wanted, f"listed {listed}, the model lists {wanted}: {context}")
        elif isinstance(result, QueueResult):
            view = result.entry
            slot = model.slots[view.slot_id]
            status = slot.entries.get(view.user_id)
            expect(
                view.status.value == status, f"entry {view.status} but model {status}: {context}"
            )
            expect(
                view.position == slot.position(view.user_id),
                f"position {view.position}, model {slot.position(view.user_id)}: {context}",
            )
            expect(view.total_in_queue == len(slot.line), f"total differs: {context}")
            waiting = view.status.value == WAITING
            expect(
                (view.estimated_wait_seconds is not None) == waiting
                and (view.estimated_wait_time is not None) == waiting
                and (view.estimated_wait_seconds or 0) >= 0,
                f"wait estimate {view.estimated_wait_seconds} for a {view.status}: {context}",
            )
            model.check_view(view.slot)
            if status == NOTIFIED:
                expect(
                    view.booking_id == slot.entry_booking.get(view.user_id)
                    and view.offer_expires_at_ms
                    == model.bookings[slot.entry_booking[view.user_id] or ""].expires_at_ms,
                    f"offer details differ: {context}",
                )
            if status == WAITING:
                # Reserve, join and position count as activity for the inactivity timeout.
                slot.last_seen_ms[view.user_id] = slot.surely_seen_ms[view.user_id] = now_ms
            if isinstance(command, (Reserve, JoinQueue)) and result.status in (201, 202):
                expect(view.position == len(slot.line), f"a new entry is not last: {context}")
        elif isinstance(result, Done):
            expect(result.status == 204, f"done with {result.status}")

    def _domain_of(self, slot_id: str) -> str:
        slot = self.model.slots.get(slot_id)
        expect(slot is not None, f"slot {slot_id} of a cancelled booking is gone")
        assert slot is not None
        return slot.domain

    # -- whole-state checks ----------------------------------------------------

    def check_all(self, *, bookings: bool = True) -> None:
        """Every slot view, every booking and the statistics against the model."""
        core, model = self.core, self.model
        now_ms = self.clock.now_ms()
        core.check_invariants(now_ms)
        model.check_timers()
        model.check_structure()
        views = {view.id: view for view in core.slots()}
        expect(
            set(views) == set(model.slots),
            f"slots differ: shard-only {set(views) - set(model.slots)}, "
            f"model-only {set(model.slots) - set(views)}",
        )
        for view in views.values():
            model.check_view(view)
        if bookings:
            for booking_id, booking in model.bookings.items():
                status = self.booking_status(booking_id)
                expect(
                    status == booking.status,
                    f"{booking_id} is {status}, the model says {booking.status}",
                )
        model.check_statistics(core)
        self.check_next_deadline()

    def check_next_deadline(self) -> None:
        """The shell sleeps until ``next_deadline_ms``: it must not be after any deadline."""
        model = self.model
        deadlines = [model.bookings[booking_id].expires_at_ms for booking_id in model.holds]
        for slot in model.slots.values():
            if slot.ended_at_ms is None:
                deadlines.append(slot.end_ms)
            inactivity_ms = slot.policy.queue_inactivity_ms
            deadlines.extend(slot.last_seen_ms[user] + inactivity_ms for _, user in slot.line)
        if deadlines:
            wake_ms = self.core.next_deadline_ms()
            expect(
                wake_ms is not None and wake_ms <= min(deadlines),
                f"next deadline {wake_ms}, but something is due at {min(deadlines)}",
            )

    def booking_status(self, booking_id: str) -> str | None:
        """The shard's answer for a booking (as an admin), or None if it does not know it."""
        result = self.core.execute(
            GetBooking(request_id="peek", booking_id=booking_id, user_id="auditor", as_admin=True),
            self.clock.now_ms(),
        )
        if isinstance(result, BookingResult):
            return result.booking.status.value
        expect(isinstance(result, Failure) and result.status == 404, f"peek answered {result}")
        return None

    def snapshot(self) -> tuple[Any, ...]:
        """Everything observable about the shard except its counters and memory of replies."""
        core = self.core
        now_ms = self.clock.now_ms()
        slots = sorted(core.slots(), key=lambda view: view.id)
        bookings = [
            core.execute(
                GetBooking(request_id="snap", booking_id=booking_id, user_id="", as_admin=True),
                now_ms,
            )
            for booking_id in sorted(self.model.bookings)
        ]
        lists = [
            core.execute(ListBookings(request_id="snap", user_id=user, limit=200), now_ms)
            for user in self.users
        ]
        stats = msgspec.structs.replace(
            core.statistics(),
            commands_total=0,
            failures_total=0,
            replays_total=0,
            request_outcomes=0,
            # A refused keyed command is remembered (and its expiry timer armed).
            idempotency_records=0,
            timers=0,
            next_deadline_ms=None,
        )
        return (slots, bookings, lists, stats)


def pick(items: list[str], index: int, missing: Callable[[], str]) -> str:
    """``items[index]`` modulo the length, or a made-up id when there are none."""
    return items[index % len(items)] if items else missing()
