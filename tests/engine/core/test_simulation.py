"""A seeded, deterministic simulation of one busy shard, checked after every operation.

Five thousand users hammer a few dozen slots spread over two dozen resources
and four domains (queues on and off, different TTLs, cancellation windows and
refunds) with every kind of command, while the clock jumps by anything from a
millisecond to hours, so holds lapse, offers are made and answered, waiting
users time out and slots end. Each command's outcome is predicted by the
naive model (``tests/engine/core/model.py``) and its events are checked as
they are applied; the shard's own ``check_invariants`` and a comparison of
every slot view run every ``FULL_CHECK_EVERY`` operations and at the end.

A client-side ledger keeps the latest status each booking was acknowledged
with (a hold, a confirmation, a cancellation). At the end the shard must
answer every one of them with that status or one legally reachable from it.

The seed comes from ``SLOTENGINE_SIM_SEED`` (a fixed default otherwise) and is
printed, and named in the assertion, when the run fails. Ids come from
counters, so a seed replays exactly.
"""

import collections
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import pytest

from engine.core.protocol import (
    AnyCommand,
    BookingChanged,
    BookingResult,
    Cancel,
    Confirm,
    CreateSlot,
    DeleteSlot,
    GetBooking,
    GetSlot,
    JoinQueue,
    LeaveQueue,
    ListBookings,
    ListSlots,
    QueuePosition,
    QueueResult,
    Reserve,
    UpdateSlot,
)
from engine.core.routing import make_slot_id
from tests.engine.core.model import (
    CANCELLED,
    CONFIRMED,
    NOTIFIED,
    REACHABLE,
    RESERVED,
    ModelMismatch,
    Outcome,
    ShardHarness,
)
from tests.support.domain import DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS, policy

DEFAULT_SEED = 20_261_121
COMMANDS = 200_000
USERS = 5_000
LIVE_SLOTS_TARGET = 40
RESOURCES = 24
FULL_CHECK_EVERY = 500
BOOKING_AUDIT_EVERY = 25_000
START_MS = 1_800_000_000_000

POLICIES = {
    "default": policy(hold_ttl_ms=120 * SECOND_MS, claim_ttl_ms=60 * SECOND_MS, queue_size_max=25),
    "medical": policy(
        "medical",
        hold_ttl_ms=60 * SECOND_MS,
        claim_ttl_ms=30 * SECOND_MS,
        queue_size_max=8,
        queue_inactivity_ms=20 * MINUTE_MS,
        advance_booking_ms=4 * HOUR_MS,
        cancel_allowed_until_ms=2 * HOUR_MS,
        refund_percentage=80,
    ),
    "seats": policy(
        "seats",
        hold_ttl_ms=300 * SECOND_MS,
        claim_ttl_ms=120 * SECOND_MS,
        queue_enabled=False,
        queue_size_max=100,
        advance_booking_ms=30 * DAY_MS,
        cancel_allowed_until_ms=30 * MINUTE_MS,
        refund_percentage=0,
    ),
    "restaurant": policy(
        "restaurant",
        hold_ttl_ms=90 * SECOND_MS,
        claim_ttl_ms=45 * SECOND_MS,
        queue_size_max=50,
        queue_inactivity_ms=30 * MINUTE_MS,
        advance_booking_ms=2 * DAY_MS,
        cancel_allowed_until_ms=HOUR_MS,
        refund_percentage=50,
    ),
}
CAPACITIES = (1, 1, 1, 2, 2, 3, 4, 6, 10, 20)
# (weight, operation): one command each, except "jump", which moves the clock.
MIX = (
    (30, "reserve"),
    (18, "confirm"),
    (7, "cancel"),
    (6, "join"),
    (3, "leave"),
    (8, "position"),
    (4, "get_booking"),
    (3, "get_slot"),
    (1, "list_bookings"),
    (1, "list_slots"),
    (2, "update_slot"),
    (1, "create_slot"),
    (0.4, "delete_slot"),
    (1.5, "replay"),
    (5, "jump"),
)


def _jump_ms(rng: random.Random) -> int:
    """Mostly a blink, sometimes minutes, rarely hours."""
    roll = rng.random()
    if roll < 0.70:
        return rng.randint(1, SECOND_MS)
    if roll < 0.95:
        return rng.randint(SECOND_MS, MINUTE_MS)
    if roll < 0.995:
        return rng.randint(MINUTE_MS, 15 * MINUTE_MS)
    return rng.randint(15 * MINUTE_MS, 3 * HOUR_MS)


@dataclass
class Ledger:
    """The client's side: the latest status each booking was acknowledged with."""

    status: dict[str, str] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    recent: collections.deque[tuple[str, str]] = field(
        default_factory=lambda: collections.deque(maxlen=200)
    )

    def acknowledge(self, booking_id: str, user_id: str, status: str, replayed: bool) -> None:
        known = self.status.get(booking_id)
        if known is None:
            self.owner[booking_id] = user_id
            self.recent.append((booking_id, user_id))
        if known is None or status in REACHABLE[known]:
            self.status[booking_id] = status
            return
        # A replayed answer is the first one, and may be older than what we know.
        if not (replayed and known in REACHABLE[status]):
            raise ModelMismatch(f"{booking_id} acknowledged {status} after {known}")


class Simulation:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.users = [f"user-{n:04d}" for n in range(USERS)]
        self.h = ShardHarness(POLICIES, START_MS)
        self.ledger = Ledger()
        self.resources = [f"res-{n:02d}" for n in range(RESOURCES)]
        self.slot_ids: list[str] = []
        self.live: list[str] = []
        self.open_holds: list[tuple[str, str]] = []
        self.confirmed: list[tuple[str, str]] = []
        self.queued: list[tuple[str, str]] = []
        self.recent: collections.deque[AnyCommand] = collections.deque(maxlen=2_000)
        self._slot_numbers = 0
        self.ops = collections.Counter[str]()
        weights = [weight for weight, _ in MIX]
        names = [name for _, name in MIX]
        # Drawn in blocks: one call to ``choices`` per thousand operations.
        self._choose = lambda: self.rng.choices(names, weights, k=1_000)

    # -- driving ---------------------------------------------------------------

    def run(self, commands: int) -> None:
        self.refresh_live()
        done = 0
        while done < commands:
            for name in self._choose():
                if name == "jump":
                    self.jump()
                else:
                    getattr(self, name)()
                    done += 1
                    if done % FULL_CHECK_EVERY == 0:
                        self.refresh_live()
                        self.h.check_all(bookings=done % BOOKING_AUDIT_EVERY == 0)
                self.ops[name] += 1
                if done >= commands:
                    break
        self.h.check_all()
        self.audit_ledger()

    def send(self, command: AnyCommand) -> Outcome:
        outcome = self.h.run(command)
        self.recent.append(command)
        self.learn(outcome)
        return outcome

    def learn(self, outcome: Outcome) -> None:
        """Note what a client learns from its answer, and what the offers announce."""
        result, command, replayed = outcome.result, outcome.command, outcome.replayed
        if isinstance(result, BookingResult) and isinstance(command, (Reserve, Confirm, Cancel)):
            booking = result.booking
            status = booking.status.value
            self.ledger.acknowledge(booking.id, booking.user_id, status, replayed)
            if not replayed:
                if isinstance(command, Reserve) and result.status == 201:
                    self.open_holds.append((booking.id, booking.user_id))
                elif isinstance(command, Confirm) and status == CONFIRMED:
                    self.confirmed.append((booking.id, booking.user_id))
        elif isinstance(result, QueueResult) and not replayed:
            entry = result.entry
            if result.status in (201, 202):
                self.queued.append((entry.slot_id, entry.user_id))
            if entry.status.value == NOTIFIED and entry.booking_id is not None:
                self.ledger.acknowledge(entry.booking_id, entry.user_id, RESERVED, replayed)
        self.learn_offers(outcome.events)

    def learn_offers(self, events: list) -> None:
        for event in events:
            if isinstance(event, BookingChanged) and event.trigger == "queue_offer":
                self.open_holds.append((event.booking.id, event.booking.user_id))

    def jump(self) -> None:
        self.learn_offers(self.h.advance(_jump_ms(self.rng)))
        self.h.model.check_timers()
        self.refresh_live()

    def refresh_live(self) -> None:
        now_ms = self.h.now_ms
        slots = self.h.model.slots
        self.live = [s for s in self.slot_ids if s in slots and slots[s].ended_at_ms is None]
        self.slot_ids = [s for s in self.slot_ids if s in slots]
        missing = LIVE_SLOTS_TARGET - sum(1 for s in self.live if slots[s].end_ms > now_ms)
        for _ in range(max(0, missing)):
            self.create_slot()

    def request_id(self) -> str:
        return self.h.request_id()

    def key(self) -> str | None:
        """One command in ten carries an Idempotency-Key from a small per-user pool."""
        return f"key-{self.rng.randrange(3)}" if self.rng.random() < 0.1 else None

    def user(self) -> str:
        return self.rng.choice(self.users)

    def slot(self) -> str:
        if not self.live or self.rng.random() < 0.01:
            return make_slot_id("res-none", "missing")
        return self.rng.choice(self.live)

    def take(self, items: list[tuple[str, str]]) -> tuple[str, str] | None:
        """One of the newest entries (removed: a client acts on it once)."""
        if not items:
            return None
        index = len(items) - 1 - min(len(items) - 1, int(self.rng.expovariate(0.3)))
        items[index], items[-1] = items[-1], items[index]
        return items.pop()

    # -- operations ------------------------------------------------------------

    def create_slot(self) -> None:
        resource = self.rng.choice(self.resources)
        self._slot_numbers += 1
        slot_id = make_slot_id(resource, f"{self._slot_numbers}")
        start_ms = self.h.now_ms + self.rng.randint(-30 * MINUTE_MS, 5 * HOUR_MS)
        outcome = self.send(
            CreateSlot(
                request_id=self.request_id(),
                slot_id=slot_id,
                resource_id=resource,
                domain=self.rng.choice(tuple(POLICIES)),
                start_ms=start_ms,
                end_ms=start_ms + self.rng.randint(15 * MINUTE_MS, 2 * HOUR_MS),
                capacity=self.rng.choice(CAPACITIES),
                blocked=self.rng.random() < 0.03,
            )
        )
        if outcome.result.status == 201:
            self.slot_ids.append(slot_id)
            self.live.append(slot_id)

    def reserve(self) -> None:
        self.send(
            Reserve(
                request_id=self.request_id(),
                slot_id=self.slot(),
                user_id=self.user(),
                idempotency_key=self.key(),
            )
        )

    def confirm(self) -> None:
        hold = self.take(self.open_holds)
        if hold is None:
            return self.reserve()
        if self.rng.random() < 0.3:
            return self.reserve()  # the client walked away: the hold will lapse
        booking_id, user = hold
        if self.rng.random() < 0.02:
            user = self.user()  # someone else's booking: 404
        self.send(
            Confirm(
                request_id=self.request_id(),
                booking_id=booking_id,
                user_id=user,
                idempotency_key=self.key(),
            )
        )
        return None

    def cancel(self) -> None:
        booking = self.take(self.confirmed)
        roll = self.rng.random()
        if booking is None or roll < 0.05:
            if not self.ledger.recent:
                return self.reserve()
            # Often not CONFIRMED: InvalidTransition.
            booking = self.rng.choice(self.ledger.recent)
        booking_id, user = booking
        as_admin = roll > 0.9
        self.send(
            Cancel(
                request_id=self.request_id(),
                booking_id=booking_id,
                user_id="ops-admin" if as_admin else user,
                as_admin=as_admin,
                reason=self.rng.choice(("changed plans", "double booked", "", None)),
                idempotency_key=self.key(),
            )
        )
        return None

    def join(self) -> None:
        slots = self.h.model.slots
        full = [s for s in self.live[:20] if s in slots and slots[s].available == 0]
        slot_id = self.rng.choice(full) if full and self.rng.random() < 0.8 else self.slot()
        self.send(
            JoinQueue(
                request_id=self.request_id(),
                slot_id=slot_id,
                user_id=self.user(),
                idempotency_key=self.key(),
            )
        )

    def leave(self) -> None:
        entry = self.take(self.queued)
        slot_id, user = entry if entry is not None else (self.slot(), self.user())
        self.send(LeaveQueue(request_id=self.request_id(), slot_id=slot_id, user_id=user))

    def position(self) -> None:
        if self.queued and self.rng.random() < 0.9:
            slot_id, user = self.queued[-1 - min(len(self.queued) - 1, self.rng.randrange(30))]
        else:
            slot_id, user = self.slot(), self.user()
        self.send(QueuePosition(request_id=self.request_id(), slot_id=slot_id, user_id=user))

    def get_booking(self) -> None:
        if not self.ledger.recent:
            return self.reserve()
        booking_id, user = self.rng.choice(self.ledger.recent)
        if self.rng.random() < 0.2:
            user = self.user()  # someone else's booking: 404
        self.send(GetBooking(request_id=self.request_id(), booking_id=booking_id, user_id=user))
        return None

    def get_slot(self) -> None:
        self.send(GetSlot(request_id=self.request_id(), slot_id=self.slot()))

    def list_bookings(self) -> None:
        self.send(ListBookings(request_id=self.request_id(), user_id=self.user(), limit=20))

    def list_slots(self) -> None:
        rng = self.rng
        after = None
        if self.live and rng.random() < 0.5:
            slot = self.h.model.slots.get(rng.choice(self.live))
            after = (slot.start_ms, slot.id) if slot is not None else None
        from_ms = self.h.now_ms + rng.randint(-HOUR_MS, 4 * HOUR_MS)
        self.send(
            ListSlots(
                request_id=self.request_id(),
                resource_id=rng.choice(self.resources) if rng.random() < 0.3 else None,
                from_ms=from_ms if rng.random() < 0.3 else None,
                to_ms=from_ms + rng.randint(0, 4 * HOUR_MS) if rng.random() < 0.3 else None,
                available_only=rng.random() < 0.5,
                limit=rng.choice((5, 20, 50)),
                after=after,
            )
        )

    def update_slot(self) -> None:
        slot_id = self.slot()
        slot = self.h.model.slots.get(slot_id)
        roll = self.rng.random()
        capacity = blocked = start_ms = end_ms = None
        if slot is None or roll < 0.4:
            capacity = max(0, (slot.capacity if slot else 1) + self.rng.choice((-2, -1, 1, 2, 3)))
        elif roll < 0.8:
            blocked = not slot.blocked
        else:
            shift_ms = self.rng.randint(-HOUR_MS, HOUR_MS)
            start_ms, end_ms = slot.start_ms + shift_ms, slot.end_ms + shift_ms
        self.send(
            UpdateSlot(
                request_id=self.request_id(),
                slot_id=slot_id,
                capacity=capacity,
                blocked=blocked,
                start_ms=start_ms,
                end_ms=end_ms,
            )
        )

    def delete_slot(self) -> None:
        slot_id = self.slot()
        force = self.rng.random() < 0.5
        self.send(DeleteSlot(request_id=self.request_id(), slot_id=slot_id, force=force))
        if slot_id not in self.h.model.slots and slot_id in self.live:
            self.live.remove(slot_id)

    def replay(self) -> None:
        """A retried request: same request id (the first answer) or the same key."""
        if not self.recent:
            return self.reserve()
        self.send(self.rng.choice(self.recent))
        return None

    # -- the end ---------------------------------------------------------------

    def audit_ledger(self) -> None:
        """Every acknowledged booking reads as acknowledged, or as a legal later state."""
        model = self.h.model
        for booking_id, acknowledged in self.ledger.status.items():
            status = self.h.booking_status(booking_id)
            if status is None:
                # Forgotten a day after it ended: only a final booking may be.
                if booking_id not in model.forgotten_bookings:
                    raise ModelMismatch(f"{booking_id} ({acknowledged}) is unknown to the shard")
                continue
            if status not in REACHABLE[acknowledged]:
                raise ModelMismatch(
                    f"{booking_id} was acknowledged {acknowledged} but reads {status}"
                )


def simulate(
    seed: int, commands: int, sabotage: Callable[[Simulation], None] | None = None
) -> Simulation:
    """Run a simulation; a failure names the seed that replays it."""
    sim = Simulation(seed)
    if sabotage is not None:
        sabotage(sim)
    try:
        sim.run(commands)
    except AssertionError as failure:
        message = (
            f"simulation failed with SLOTENGINE_SIM_SEED={seed} after "
            f"{sum(sim.ops.values())} operations at t={sim.h.now_ms}: {failure}"
        )
        print(message)
        raise AssertionError(message) from failure
    return sim


@pytest.mark.slow
def test_a_long_seeded_simulation_keeps_every_invariant() -> None:
    seed = int(os.environ.get("SLOTENGINE_SIM_SEED", DEFAULT_SEED))
    sim = simulate(seed, COMMANDS)

    tally = sim.h.tally
    summary = f"seed {seed}: {sorted(tally.items())}"
    print(summary)
    assert sum(sim.ops.values()) >= COMMANDS
    # The run reached every corner worth reaching (else the checks proved little).
    for needed in (
        "Reserve 201",
        "Reserve 202",
        "Reserve 409 SlotFull",
        "Reserve 409 QueueFull",
        "Confirm 200",
        "Confirm 409 ReservationExpired",
        "Cancel 200",
        "Cancel 409 CancellationWindowClosed",
        "JoinQueue 201",
        "LeaveQueue 204",
        "QueuePosition 200",
        "UpdateSlot 200",
        "DeleteSlot 204",
        "event booking EXPIRED (hold_ttl)",
        "event booking EXPIRED (claim_ttl)",
        "event booking EXPIRED (offer_declined)",
        "event booking RESERVED (queue_offer)",
        "event booking COMPLETED (slot_ended)",
        "event queue converted",
        "event queue expired",
        "replay",
    ):
        assert tally[needed] > 0, f"{needed!r} never happened with seed {seed}: {summary}"
    assert sim.ledger.status, "the ledger stayed empty"
    assert sum(1 for s in sim.ledger.status.values() if s == CANCELLED) > 0


def test_a_simulation_against_a_wrong_model_fails_and_names_its_seed() -> None:
    def shorter_holds_in_the_model(sim: Simulation) -> None:
        wrong = msgspec.structs.replace(POLICIES["default"], hold_ttl_ms=119 * SECOND_MS)
        sim.h.model.policies = {**POLICIES, "default": wrong}

    with pytest.raises(AssertionError, match=r"SLOTENGINE_SIM_SEED=7 .*expires at"):
        simulate(7, 5_000, shorter_holds_in_the_model)
