"""Stateful properties of one shard, checked against a naive model after every step.

A hypothesis state machine drives a ``ShardCore`` on a ``ManualClock`` with a
few small slots (capacity 1-3, queues of 2-3), a handful of users and short
TTLs, through every command: create, update (capacity, block, times),
delete (with and without force), reserve, confirm, cancel (user and admin),
join, leave, position, clock steps small and large, replays of earlier
request ids and reuse of Idempotency-Keys. ``tests/engine/core/model.py``
predicts each outcome and checks each event; after every step the shard's
own ``check_invariants`` runs and every slot view, booking and counter is
compared with the model. A refused or replayed command must leave every
observable part of the state as it was.

Two regression tests pin core bugs found while writing these (a command
stamped by a lagging clock, a reply's metadata shared with the shard). The
last tests show that the checks can fail: each corrupts a copy of the model,
the event stream or the shard and expects the check to say so.
"""

import copy
import itertools
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.core.errors import InvariantViolation
from engine.core.protocol import (
    AnyCommand,
    BookingResult,
    Cancel,
    Confirm,
    CreateSlot,
    DeleteSlot,
    ExtendHold,
    GetBooking,
    GetSlot,
    JoinQueue,
    LeaveQueue,
    ListBookings,
    ListSlots,
    QueueChanged,
    QueuePosition,
    ReleaseHold,
    Reserve,
    SlotResult,
    UpdateSlot,
)
from engine.core.routing import make_slot_id
from engine.core.states import BookingStatus, SlotStatus
from tests.engine.core.model import ModelMismatch, MSlot, ShardHarness, pick
from tests.support.domain import policy

START_MS = 1_700_000_000_000

POLICIES = {
    "default": policy(
        hold_ttl_ms=1_000,
        claim_ttl_ms=700,
        queue_size_max=3,
        queue_inactivity_ms=4_000,
        hold_extension_ms=600,
        hold_extensions_max=2,
    ),
    # Books only 20 s ahead, cancels up to 3 s before the start for half back.
    "strict": policy(
        "strict",
        hold_ttl_ms=1_500,
        claim_ttl_ms=500,
        queue_size_max=2,
        queue_inactivity_ms=3_000,
        advance_booking_ms=20_000,
        cancel_allowed_until_ms=3_000,
        refund_percentage=50,
        hold_extensions_max=0,
    ),
    "noqueue": policy(
        "noqueue",
        hold_ttl_ms=800,
        claim_ttl_ms=800,
        queue_enabled=False,
        queue_size_max=3,
        queue_inactivity_ms=4_000,
        cancel_allowed_until_ms=1_000,
        refund_percentage=0,
    ),
}
USERS = ("ann", "bob", "cat", "dan", "eve")
RESOURCES = ("r0", "r1", "r2")
ADMIN = "root"

slot_index = st.integers(0, 7)
# Mostly one of the last few bookings (live holds), sometimes any earlier one.
booking_index = st.integers(0, 3) | st.integers(0, 60)
users = st.sampled_from(USERS)
keys = st.one_of(st.none(), st.sampled_from(("k1", "k2", "k3")))


class ShardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = ShardHarness(POLICIES, START_MS, snapshot_refusals=True, users=USERS)
        self.slot_ids: list[str] = []
        self.booking_ids: list[str] = []
        self._known_bookings: set[str] = set()
        self._uniques = itertools.count(1)

    # -- helpers ---------------------------------------------------------------

    def run(self, command: AnyCommand) -> None:
        self.h.run(command)
        for booking_id in self.h.model.bookings:
            if booking_id not in self._known_bookings:
                self._known_bookings.add(booking_id)
                self.booking_ids.append(booking_id)

    def slot(self, index: int, want: Callable[[MSlot], bool] | None = None) -> str:
        """Mostly a live slot (one that ``want``s, if any do), sometimes a deleted one."""
        if index < 6:
            live = [self.h.model.slots[s] for s in self.slot_ids if s in self.h.model.slots]
            wanted = [slot.id for slot in live if want is None or want(slot)]
            if wanted or live:
                return pick(wanted or [slot.id for slot in live], index, str)
        return pick(self.slot_ids, index, lambda: make_slot_id("nowhere", "missing"))

    def queued(self, index: int, user: str) -> tuple[str, str]:
        """Mostly a (slot, user) with a queue entry; else ``user`` on some slot."""
        entries = [
            (slot.id, entry_user)
            for slot in self.h.model.slots.values()
            for entry_user in slot.entries
        ]
        if index < 6 and entries:
            return entries[index % len(entries)]
        return self.slot(index), user

    def booking(self, index: int, status: str | None = None) -> str:
        """Mostly a recent booking in ``status`` (if any), else any, newest first."""
        recent_first = self.booking_ids[::-1]
        if status is not None and index % 4 != 3:
            bookings = self.h.model.bookings
            wanted = [b for b in recent_first if b in bookings and bookings[b].status == status]
            if wanted:
                return pick(wanted, index, str)
        return pick(recent_first, index, lambda: "00000000-bmissing")

    def owner(self, booking_id: str) -> str:
        booking = self.h.model.bookings.get(booking_id)
        return booking.user_id if booking is not None else USERS[0]

    # -- slots -----------------------------------------------------------------

    @initialize(
        domains=st.lists(st.sampled_from(tuple(POLICIES)), min_size=3, max_size=3),
        capacities=st.lists(st.integers(1, 3), min_size=3, max_size=3),
        start_offset_ms=st.integers(2_000, 30_000),
    )
    def open_three_slots(
        self, domains: list[str], capacities: list[int], start_offset_ms: int
    ) -> None:
        for resource, domain, capacity in zip(RESOURCES, domains, capacities, strict=True):
            slot_id = make_slot_id(resource, f"{next(self._uniques)}")
            start_ms = self.h.now_ms + start_offset_ms
            self.run(
                CreateSlot(
                    request_id=self.h.request_id(),
                    slot_id=slot_id,
                    resource_id=resource,
                    domain=domain,
                    start_ms=start_ms,
                    end_ms=start_ms + 90_000,
                    capacity=capacity,
                )
            )
            self.slot_ids.append(slot_id)

    @rule(
        resource=st.sampled_from(RESOURCES),
        domain=st.sampled_from(("default", "default", "strict", "noqueue")),
        start_offset_ms=st.integers(-2_000, 60_000),
        duration_ms=st.integers(500, 120_000),
        capacity=st.integers(0, 3),
        blocked=st.sampled_from((False, False, False, True)),
        reuse=st.sampled_from((-1, -1, -1)) | st.integers(0, 7),
    )
    def create_slot(
        self,
        resource: str,
        domain: str,
        start_offset_ms: int,
        duration_ms: int,
        capacity: int,
        blocked: bool,
        reuse: int,
    ) -> None:
        if reuse >= 0 and self.slot_ids:
            # An id in use (Conflict), or one that was deleted and may be reused.
            slot_id = self.slot(reuse)
            resource = next(r for r in RESOURCES if make_slot_id(r, "x")[:8] == slot_id[:8])
        else:
            slot_id = make_slot_id(resource, f"{next(self._uniques)}")
        start_ms = self.h.now_ms + start_offset_ms
        self.run(
            CreateSlot(
                request_id=self.h.request_id(),
                slot_id=slot_id,
                resource_id=resource,
                domain=domain,
                start_ms=start_ms,
                end_ms=start_ms + duration_ms,
                capacity=capacity,
                blocked=blocked,
            )
        )
        if slot_id in self.h.model.slots and slot_id not in self.slot_ids:
            self.slot_ids.append(slot_id)

    @rule(
        slot=slot_index,
        capacity=st.none() | st.integers(0, 4),
        blocked=st.none() | st.booleans(),
        shift_ms=st.none() | st.integers(-20_000, 20_000),
        stretch_ms=st.none() | st.integers(-20_000, 20_000),
    )
    def update_slot(
        self,
        slot: int,
        capacity: int | None,
        blocked: bool | None,
        shift_ms: int | None,
        stretch_ms: int | None,
    ) -> None:
        slot_id = self.slot(slot)
        current = self.h.model.slots.get(slot_id)
        start_ms = end_ms = None
        if current is not None and shift_ms is not None:
            start_ms = current.start_ms + shift_ms
            end_ms = current.end_ms + shift_ms
        if current is not None and stretch_ms is not None:
            end_ms = (end_ms or current.end_ms) + stretch_ms
        self.run(
            UpdateSlot(
                request_id=self.h.request_id(),
                slot_id=slot_id,
                capacity=capacity,
                blocked=blocked,
                start_ms=start_ms,
                end_ms=end_ms,
                actor=f"admin:{ADMIN}",
            )
        )

    @rule(slot=slot_index, force=st.booleans())
    def delete_slot(self, slot: int, force: bool) -> None:
        self.run(DeleteSlot(request_id=self.h.request_id(), slot_id=self.slot(slot), force=force))

    @rule(
        resource=st.none() | st.sampled_from(RESOURCES),
        window=st.none() | st.tuples(st.integers(-30_000, 60_000), st.integers(0, 90_000)),
        status=st.none() | st.sampled_from(SlotStatus),
        available_only=st.booleans(),
        limit=st.integers(0, 4),
        cursor=st.none() | slot_index,
    )
    def list_slots(
        self,
        resource: str | None,
        window: tuple[int, int] | None,
        status: SlotStatus | None,
        available_only: bool,
        limit: int,
        cursor: int | None,
    ) -> None:
        from_ms = to_ms = None
        if window is not None:
            from_ms = self.h.now_ms + window[0]
            to_ms = from_ms + window[1]
        after = None
        if cursor is not None and self.h.model.slots:
            slots = sorted(self.h.model.slots.values(), key=lambda s: (s.start_ms, s.id))
            chosen = slots[cursor % len(slots)]
            after = (chosen.start_ms, chosen.id)
        self.run(
            ListSlots(
                request_id=self.h.request_id(),
                resource_id=resource,
                from_ms=from_ms,
                to_ms=to_ms,
                status=status,
                available_only=available_only,
                limit=limit,
                after=after,
            )
        )

    @rule(
        user=users,
        status=st.none() | st.sampled_from(BookingStatus),
        limit=st.integers(0, 3),
        cursor=st.none() | booking_index,
    )
    def list_bookings(
        self, user: str, status: BookingStatus | None, limit: int, cursor: int | None
    ) -> None:
        after = None
        bookings = self.h.model.bookings
        if cursor is not None and bookings:
            chosen = bookings.get(self.booking(cursor))
            if chosen is not None:
                after = (chosen.reserved_at_ms, chosen.id)
        self.run(
            ListBookings(
                request_id=self.h.request_id(),
                user_id=user,
                status=status,
                limit=limit,
                after=after,
            )
        )

    @rule(slot=slot_index)
    def get_slot(self, slot: int) -> None:
        self.run(GetSlot(request_id=self.h.request_id(), slot_id=self.slot(slot)))

    # -- bookings --------------------------------------------------------------

    @rule(slot=slot_index, user=users, key=keys)
    def reserve(self, slot: int, user: str, key: str | None) -> None:
        self.run(
            Reserve(
                request_id=self.h.request_id(),
                slot_id=self.slot(slot),
                user_id=user,
                idempotency_key=key,
            )
        )

    @precondition(lambda self: bool(self.booking_ids))
    @rule(booking=booking_index, by_owner=st.sampled_from((True, True, False)), key=keys)
    def confirm(self, booking: int, by_owner: bool, key: str | None) -> None:
        booking_id = self.booking(booking, "RESERVED")
        owner = self.owner(booking_id)
        user = owner if by_owner else next(u for u in USERS if u != owner)
        self.run(
            Confirm(
                request_id=self.h.request_id(),
                booking_id=booking_id,
                user_id=user,
                idempotency_key=key,
            )
        )

    @precondition(lambda self: bool(self.booking_ids))
    @rule(
        booking=booking_index,
        by_owner=st.sampled_from((True, True, False)),
        release=st.booleans(),
        key=keys,
    )
    def extend_or_release(
        self, booking: int, by_owner: bool, release: bool, key: str | None
    ) -> None:
        booking_id = self.booking(booking, "RESERVED")
        owner = self.owner(booking_id)
        user = owner if by_owner else next(u for u in USERS if u != owner)
        kind = ReleaseHold if release else ExtendHold
        self.run(
            kind(
                request_id=self.h.request_id(),
                booking_id=booking_id,
                user_id=user,
                idempotency_key=key,
            )
        )

    @rule(index=st.integers(0, 5), leave_instead=st.booleans())
    def answer_an_offer(self, index: int, leave_instead: bool) -> None:
        """A NOTIFIED user confirms the offered hold (CONVERTED) or walks away."""
        offers = [
            (slot.id, user, slot.entry_booking[user])
            for slot in self.h.model.slots.values()
            for user, status in slot.entries.items()
            if status == "NOTIFIED"
        ]
        if not offers:
            return
        slot_id, user, booking_id = offers[index % len(offers)]
        assert booking_id is not None
        if leave_instead:
            self.run(LeaveQueue(request_id=self.h.request_id(), slot_id=slot_id, user_id=user))
        else:
            self.run(Confirm(request_id=self.h.request_id(), booking_id=booking_id, user_id=user))

    @precondition(lambda self: bool(self.booking_ids))
    @rule(
        booking=booking_index,
        who=st.sampled_from(("owner", "owner", "other", "admin", "admin without reason")),
        key=keys,
    )
    def cancel(self, booking: int, who: str, key: str | None) -> None:
        booking_id = self.booking(booking, "CONFIRMED")
        owner = self.owner(booking_id)
        as_admin = who.startswith("admin")
        user = {"owner": owner, "other": next(u for u in USERS if u != owner)}.get(who, ADMIN)
        reason = "changed plans" if who != "admin without reason" else " "
        self.run(
            Cancel(
                request_id=self.h.request_id(),
                booking_id=booking_id,
                user_id=user,
                as_admin=as_admin,
                reason=reason,
                idempotency_key=key,
            )
        )

    @rule(booking=booking_index, user=st.none() | users)
    def get_booking(self, booking: int, user: str | None) -> None:
        booking_id = self.booking(booking)
        user = user or self.owner(booking_id)
        self.run(GetBooking(request_id=self.h.request_id(), booking_id=booking_id, user_id=user))

    @rule(slot=slot_index, crowd=st.lists(users, min_size=2, max_size=5, unique=True))
    def rush(self, slot: int, crowd: list[str]) -> None:
        """Several users reserve the same slot at the same instant: holds, then a queue."""
        slot_id = self.slot(slot, lambda s: s.policy.queue_enabled)
        for user in crowd:
            self.run(Reserve(request_id=self.h.request_id(), slot_id=slot_id, user_id=user))

    # -- the queue -------------------------------------------------------------

    @rule(slot=slot_index, user=users, key=keys)
    def join_queue(self, slot: int, user: str, key: str | None) -> None:
        self.run(
            JoinQueue(
                request_id=self.h.request_id(),
                slot_id=self.slot(slot, lambda s: s.available == 0),
                user_id=user,
                idempotency_key=key,
            )
        )

    @rule(slot=slot_index, user=users)
    def leave_queue(self, slot: int, user: str) -> None:
        self.run(LeaveQueue(request_id=self.h.request_id(), slot_id=self.slot(slot), user_id=user))

    @rule(slot=slot_index, user=users)
    def position(self, slot: int, user: str) -> None:
        self.run(
            QueuePosition(request_id=self.h.request_id(), slot_id=self.slot(slot), user_id=user)
        )

    # -- time ------------------------------------------------------------------

    @rule(delta_ms=st.integers(1, 600))
    def advance_a_little(self, delta_ms: int) -> None:
        self.h.advance(delta_ms)

    @rule(delta_ms=st.integers(1_000, 120_000))
    def advance_a_lot(self, delta_ms: int) -> None:
        self.h.advance(delta_ms)

    # -- replays ---------------------------------------------------------------

    @precondition(lambda self: bool(self.h.outcomes))
    @rule(index=st.integers(0, 200), same_command=st.booleans(), slot=slot_index, user=users)
    def replay_request_id(self, index: int, same_command: bool, slot: int, user: str) -> None:
        """A retried batch: the first result comes back and nothing changes."""
        request_ids = list(self.h.outcomes)
        request_id = request_ids[-1 - index % len(request_ids)]
        _, command, _ = self.h.outcomes[request_id]
        if not same_command:
            command = Reserve(request_id=request_id, slot_id=self.slot(slot), user_id=user)
        self.run(command)

    @precondition(lambda self: bool(self.h.idempotency))
    @rule(index=st.integers(0, 50), same_body=st.booleans(), slot=slot_index)
    def reuse_idempotency_key(self, index: int, same_body: bool, slot: int) -> None:
        """A client retry with the same key: the first answer, or IdempotencyKeyReused."""
        scopes = list(self.h.idempotency)
        user, kind, key = scopes[index % len(scopes)]
        neutral, _, _ = self.h.idempotency[(user, kind, key)]
        command: AnyCommand = neutral
        if not same_body:
            if isinstance(neutral, (Reserve, JoinQueue)):
                other = self.slot(slot)
                command = type(neutral)(
                    request_id="", slot_id=other if other != neutral.slot_id else "x", user_id=user
                )
            elif isinstance(neutral, Confirm):
                command = Confirm(request_id="", booking_id=neutral.booking_id + "x", user_id=user)
            elif isinstance(neutral, Cancel):
                command = Cancel(
                    request_id="",
                    booking_id=neutral.booking_id,
                    user_id=user,
                    as_admin=neutral.as_admin,
                    reason=f"{neutral.reason} again",
                )
        self.run(
            msgspec.structs.replace(command, request_id=self.h.request_id(), idempotency_key=key)
        )

    # -- after every step ------------------------------------------------------

    @invariant()
    def shard_agrees_with_the_model(self) -> None:
        self.h.check_all()


ShardMachine.TestCase.settings = settings(
    max_examples=600,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestShardMachine = ShardMachine.TestCase


# -- regressions ---------------------------------------------------------------


def test_a_command_stamped_before_the_shards_clock_gets_a_hold_from_the_shards_clock() -> None:
    core = ShardHarness(POLICIES, START_MS).core
    slot_id = make_slot_id("r0", "1")
    core.execute(
        CreateSlot(
            request_id="c",
            slot_id=slot_id,
            resource_id="r0",
            domain="default",
            start_ms=START_MS + 60_000,
            end_ms=START_MS + 120_000,
            capacity=1,
        ),
        START_MS,
    )
    core.advance(START_MS + 10_000)
    # A caller whose clock lags the shard's by 10 s (advance: "a clock that steps
    # back must not un-expire anything").
    result = core.execute(Reserve(request_id="r", slot_id=slot_id, user_id="ann"), START_MS)
    assert isinstance(result, BookingResult)
    assert result.booking.expires_at_ms > START_MS + 10_000
    core.check_invariants(START_MS + 10_000)


def test_editing_a_replys_slot_metadata_does_not_edit_the_shard() -> None:
    core = ShardHarness(POLICIES, START_MS).core
    slot_id = make_slot_id("r0", "1")
    created = core.execute(
        CreateSlot(
            request_id="c",
            slot_id=slot_id,
            resource_id="r0",
            domain="default",
            start_ms=START_MS + 60_000,
            end_ms=START_MS + 120_000,
            capacity=1,
            metadata={"room": "A"},
        ),
        START_MS,
    )
    assert isinstance(created, SlotResult)
    copy = created.slot.metadata_dict()
    copy["room"] = "edited by the caller"
    again = core.execute(GetSlot(request_id="g", slot_id=slot_id), START_MS)
    assert isinstance(again, SlotResult)
    assert again.slot.metadata_dict() == {"room": "A"}


# -- the checks can fail -------------------------------------------------------


def _busy_harness() -> tuple[ShardHarness, str]:
    """One slot of capacity 1: ann holds it, bob and cat wait in that order."""
    h = ShardHarness(POLICIES, START_MS, users=USERS)
    slot_id = make_slot_id("r0", "1")
    h.run(
        CreateSlot(
            request_id=h.request_id(),
            slot_id=slot_id,
            resource_id="r0",
            domain="default",
            start_ms=START_MS + 60_000,
            end_ms=START_MS + 120_000,
            capacity=1,
        )
    )
    for user in ("ann", "bob", "cat"):
        h.run(Reserve(request_id=h.request_id(), slot_id=slot_id, user_id=user))
    h.check_all()
    return h, slot_id


def test_a_corrupted_model_is_caught() -> None:
    h, slot_id = _busy_harness()
    swapped = copy.deepcopy(h.model)
    line = swapped.slots[slot_id].line
    line[0], line[1] = line[1], line[0]
    with pytest.raises(ModelMismatch, match="join order"):
        swapped.check_structure()

    overheld = copy.deepcopy(h.model)
    overheld.slots[slot_id].held += 1
    h.model = overheld
    with pytest.raises(ModelMismatch):
        h.check_all()


def test_an_offer_out_of_join_order_is_caught() -> None:
    h, slot_id = _busy_harness()
    (hold_id,) = h.model.slots[slot_id].active.values()
    events = h.advance(1_000)  # ann's hold lapses: bob, first in line, is offered it
    (offer,) = [e for e in events if isinstance(e, QueueChanged) and e.change == "notified"]
    assert offer.entry.user_id == "bob"
    assert h.model.slots[slot_id].entries["bob"] == "NOTIFIED"
    assert h.model.bookings[hold_id].status == "EXPIRED"

    # Replay the same story to a model whose line says cat came first.
    h2, slot_id2 = _busy_harness()
    line = h2.model.slots[slot_id2].line
    line[0], line[1] = line[1], line[0]
    h2.clock.advance_ms(1_000)
    h2.core.advance(h2.now_ms)
    h2.model.observe_time(h2.now_ms)
    with pytest.raises(ModelMismatch, match="head of the line is cat"):
        h2.model.apply(h2.core.drain_events())


def test_a_final_state_that_changes_is_caught() -> None:
    h, slot_id = _busy_harness()
    (hold_id,) = h.model.slots[slot_id].active.values()
    h.advance(1_000)
    h.model.bookings[hold_id].status = "CONFIRMED"  # pretend the client saw a confirm
    with pytest.raises(ModelMismatch, match="is EXPIRED, the model says CONFIRMED"):
        h.check_all()


def test_a_wrong_prediction_is_caught() -> None:
    h, slot_id = _busy_harness()
    h.model.policies = {**POLICIES, "default": POLICIES["noqueue"]}
    h.model.slots[slot_id].policy = POLICIES["noqueue"]
    with pytest.raises(ModelMismatch, match="expected 409 SlotFull"):
        h.run(Reserve(request_id=h.request_id(), slot_id=slot_id, user_id="dan"))


def test_a_late_wake_up_is_caught() -> None:
    h, _ = _busy_harness()
    h.model.bookings[next(iter(h.model.holds))].expires_at_ms = h.now_ms
    with pytest.raises(ModelMismatch, match="next deadline"):
        h.check_next_deadline()


def test_a_corrupted_shard_fails_its_own_invariants() -> None:
    h, slot_id = _busy_harness()
    twin, _ = _busy_harness()
    twin.core._slots[slot_id].held += 1
    with pytest.raises(InvariantViolation):
        twin.core.check_invariants(twin.now_ms)
    h.core.check_invariants(h.now_ms)
