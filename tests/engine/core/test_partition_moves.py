"""Partitions handed from one shard to another: release on the old owner, adopt on the new.

The old owner forgets a partition without an event; the new one loads that
partition's stored records into its running state and answers for it as the
old one did, its deadlines included.
"""

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec
import pytest

from engine.core import protocol as p
from engine.core.errors import InvariantViolation
from engine.core.limits import IDEMPOTENCY_RETENTION_MS
from engine.core.records import Booking, QueueEntry, StoredSlot
from engine.core.remembered import RequestMemory
from engine.core.routing import (
    PartitionSet,
    make_slot_id,
    outcome_partition,
    partition_of,
    routing_key,
)
from engine.core.shard import ShardCore
from tests.engine.core.conftest import START_MS, policy
from tests.support.domain import HOUR_MS, MINUTE_MS, SECOND_MS

P = 4
POLICIES = {"default": policy()}  # holds last 2 minutes, offers 1, three may wait


def resource_in(partition: int, n: int = 0) -> str:
    """The ``n``-th resource name whose slots land in ``partition``."""
    names = (f"room-{i}" for i in itertools.count())
    return list(itertools.islice((r for r in names if routing_key(r) % P == partition), n + 1))[-1]


class Cluster:
    """Cores of one P on one manual clock. The cores of one cluster name bookings
    from one counter: as with random ids, no two of them name two bookings alike."""

    def __init__(self) -> None:
        self.now_ms = START_MS
        self.uniques = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._shards = itertools.count(0)

    def core(self, owned: Iterable[int], uniques: Iterator[int] | None = None) -> ShardCore:
        numbers = self.uniques if uniques is None else uniques
        return ShardCore(
            shard_id=next(self._shards),
            shard_count=8,
            policies=POLICIES,
            now_ms=self.now_ms,
            partitions=PartitionSet(P, frozenset(owned)),
            new_unique=lambda: f"{next(numbers):08d}",
        )

    def request_id(self) -> str:
        return f"req-{next(self._request_ids)}"

    def run(self, core: ShardCore, command_type: Callable[..., p.AnyCommand], **fields: Any) -> Any:
        fields.setdefault("request_id", self.request_id())
        result = core.execute(command_type(**fields), self.now_ms)
        core.check_invariants(self.now_ms)
        return result

    def slot(self, core: ShardCore, resource: str, capacity: int, unique: str = "") -> str:
        slot_id = make_slot_id(resource, unique or f"{next(self._request_ids):06d}")
        created = self.run(
            core,
            p.CreateSlot,
            slot_id=slot_id,
            resource_id=resource,
            domain="default",
            start_ms=self.now_ms + 2 * HOUR_MS,
            end_ms=self.now_ms + 3 * HOUR_MS,
            capacity=capacity,
        )
        assert created.status == 201, created
        return slot_id


def stored(
    core: ShardCore, partitions: frozenset[int]
) -> tuple[list[StoredSlot], list[Booking], list[QueueEntry]]:
    """What storage holds of ``partitions`` once the core's changes are flushed."""
    count = core.partitions.partitions
    states = [s for s in core._slots.values() if partition_of(s.id, count) in partitions]
    slots = [
        StoredSlot(
            id=s.id,
            resource_id=s.resource_id,
            domain=s.domain,
            start_ms=s.start_ms,
            end_ms=s.end_ms,
            capacity=s.capacity,
            blocked=s.blocked,
            metadata=s.metadata,
            version=s.version,
        )
        for s in states
    ]
    bookings = [
        msgspec.structs.replace(b)
        for b in core._bookings.values()
        if partition_of(b.slot_id, count) in partitions
    ]
    entries = [msgspec.structs.replace(e) for s in states for e in s.entries.values()]
    return slots, bookings, entries


def latest_keys(logged: Iterable[p.KeyRecord], partitions: frozenset[int]) -> list[p.KeyRecord]:
    """The idempotency records storage keeps of ``partitions``: the latest per scope."""
    latest = {(k.user_id, k.command, k.key): k for k in logged if k.partition in partitions}
    return list(latest.values())


def same_shard_agnostic(result: Any) -> Any:
    """``result`` without what a shard learns within one incarnation: its epoch, the
    slot's change and departure counters, the wait estimate (from departures
    seen) and the join numbers (storage forgets who left, so numbering goes on
    from the last entry it kept): all of it starts over when a slot is loaded,
    as after a restart."""
    if isinstance(result, p.SlotResult):
        return msgspec.structs.replace(result, slot=_agnostic_view(result.slot))
    if isinstance(result, p.QueueResult):
        entry = msgspec.structs.replace(
            result.entry,
            slot=_agnostic_view(result.entry.slot),
            seq=0,
            estimated_wait_seconds=None,
            estimated_wait_time=None,
        )
        return msgspec.structs.replace(result, entry=entry)
    return result


def _agnostic_view(view: Any) -> Any:
    return msgspec.structs.replace(view, epoch="", revision=0, departures=0)


def test_a_moved_partition_answers_and_expires_on_its_new_owner_as_on_its_old() -> None:
    c = Cluster()
    moving, staying = 1, 2
    a = c.core({1, 2, 3})
    b = c.core({0})
    logged: list[p.KeyRecord] = []

    # In the moving partition: a keyed hold and a confirmed booking on one slot;
    # on another, a full slot with an offer out and a user waiting behind it.
    two = c.slot(a, resource_in(moving, 0), capacity=2)
    hold = c.run(a, p.Reserve, slot_id=two, user_id="ann", idempotency_key="k1")
    hold_deadline_ms = hold.booking.expires_at_ms
    bob = c.run(a, p.Reserve, slot_id=two, user_id="bob").booking
    assert c.run(a, p.Confirm, booking_id=bob.id, user_id="bob").status == 200
    c.now_ms += 10 * SECOND_MS
    one = c.slot(a, resource_in(moving, 1), capacity=1)
    cat = c.run(a, p.Reserve, slot_id=one, user_id="cat").booking
    c.run(a, p.Confirm, booking_id=cat.id, user_id="cat")
    assert c.run(a, p.JoinQueue, slot_id=one, user_id="dan").status == 201
    assert c.run(a, p.JoinQueue, slot_id=one, user_id="eve").status == 201
    c.now_ms += 10 * SECOND_MS
    assert c.run(a, p.Cancel, booking_id=cat.id, user_id="cat").status == 200
    offer = c.run(a, p.QueuePosition, slot_id=one, user_id="dan").entry
    assert offer.status == "NOTIFIED"
    offer_deadline_ms = offer.offer_expires_at_ms
    assert offer_deadline_ms < hold_deadline_ms
    # In the partition that stays: a confirmed booking, confirmed with a key.
    kept = c.slot(a, resource_in(staying), capacity=1)
    fay = c.run(a, p.Reserve, slot_id=kept, user_id="fay").booking
    c.run(a, p.Confirm, booking_id=fay.id, user_id="fay", idempotency_key="k2")

    def questions() -> list[tuple[Callable[..., p.AnyCommand], dict[str, Any]]]:
        return [
            (p.GetSlot, {"slot_id": two}),
            (p.GetSlot, {"slot_id": one}),
            (p.QueuePosition, {"slot_id": one, "user_id": "dan"}),
            (p.QueuePosition, {"slot_id": one, "user_id": "eve"}),
            (p.GetBooking, {"booking_id": hold.booking.id, "user_id": "ann"}),
            (p.GetBooking, {"booking_id": bob.id, "user_id": "bob"}),
            (p.GetBooking, {"booking_id": cat.id, "user_id": "cat"}),
            (p.GetBooking, {"booking_id": offer.booking_id, "user_id": "dan"}),
        ]

    before = [same_shard_agnostic(c.run(a, kind, **fields)) for kind, fields in questions()]
    assert all(answer.status == 200 for answer in before), before
    a.drain_events()
    logged += a.drain_remembered()[1]
    assert {k.key: k.partition for k in logged} == {"k1": moving, "k2": staying}
    slots, bookings, entries = stored(a, frozenset({moving}))
    keys = latest_keys(logged, frozenset({moving}))

    a.release(frozenset({moving}))
    assert a.partitions == PartitionSet(P, frozenset({2, 3}))
    assert a.drain_events() == []
    b.adopt(
        PartitionSet(P, frozenset({0, moving})),
        slots=slots,
        bookings=bookings,
        entries=entries,
        keys=keys,
    )
    assert b.partitions == PartitionSet(P, frozenset({0, moving}))
    b.check_invariants(c.now_ms)
    assert b.drain_events() == []
    assert b.drain_remembered() == ([], [])  # storage has them already

    after = [same_shard_agnostic(c.run(b, kind, **fields)) for kind, fields in questions()]
    assert after == before
    for kind, fields in questions():
        refused = c.run(a, kind, **fields)
        assert p.not_served(refused) == moving, refused
    # The keyed retry replays the first outcome on the new owner, and only there.
    retry = {"slot_id": two, "user_id": "ann", "idempotency_key": "k1"}
    assert c.run(b, p.Reserve, **retry) == hold
    assert p.not_served(c.run(a, p.Reserve, **retry)) == moving
    stats_a, stats_b = a.statistics(), b.statistics()
    assert (stats_a.slots, stats_a.bookings_in_memory, stats_a.idempotency_records) == (1, 1, 1)
    assert (stats_b.slots, stats_b.holds, stats_b.confirmed, stats_b.waiting) == (2, 2, 1, 1)
    assert stats_b.idempotency_records == 1
    # Nothing of the moved partition is left to fire on the old owner.
    assert a.statistics().timers == 1  # the end of the slot it kept

    # The offer and the hold lapse on the new owner at their own deadlines.
    c.now_ms = offer_deadline_ms - 1
    b.advance(c.now_ms)
    assert b.drain_events() == []
    c.now_ms = offer_deadline_ms
    b.advance(c.now_ms)
    b.check_invariants(c.now_ms)
    lapsed = [e for e in b.drain_events() if isinstance(e, p.BookingChanged)]
    assert [(e.booking.user_id, e.trigger) for e in lapsed] == [
        ("dan", "claim_ttl"),
        ("eve", "queue_offer"),  # the place freed goes down the line
    ]
    assert lapsed[0].booking.id == offer.booking_id
    assert c.run(b, p.QueuePosition, slot_id=one, user_id="eve").entry.status == "NOTIFIED"
    c.now_ms = hold_deadline_ms - 1
    b.advance(c.now_ms)
    assert c.run(b, p.GetBooking, booking_id=hold.booking.id, user_id="ann").booking.status == (
        "RESERVED"
    )
    c.now_ms = hold_deadline_ms
    b.advance(c.now_ms)
    b.check_invariants(c.now_ms)
    lapsed = [e for e in b.drain_events() if isinstance(e, p.BookingChanged)]
    assert [(e.booking.id, e.trigger) for e in lapsed] == [(hold.booking.id, "hold_ttl")]

    # The old owner passes every deadline of the moved partition in silence.
    c.now_ms += HOUR_MS
    a.advance(c.now_ms)
    a.check_invariants(c.now_ms)
    assert a.drain_events() == []
    assert c.run(a, p.GetSlot, slot_id=kept).slot.current_bookings == 1


def test_release_and_adopt_refuse_what_is_not_theirs() -> None:
    c = Cluster()
    a = c.core({1, 2})
    b = c.core({0})
    slot_id = c.slot(a, resource_in(1), capacity=1)
    c.run(a, p.Reserve, slot_id=slot_id, user_id="ann", idempotency_key="k")
    with pytest.raises(InvariantViolation):
        a.release(frozenset({0}))
    with pytest.raises(InvariantViolation):
        a.release(frozenset({1}))  # its events are not drained yet
    a.drain_events()
    keys = a.drain_remembered()[1]
    slots, bookings, entries = stored(a, frozenset({1}))
    a.release(frozenset({1}))
    with pytest.raises(InvariantViolation):
        a.release(frozenset({1}))

    refused: list[tuple[PartitionSet, dict[str, Any]]] = [
        # Records of a partition it does not add.
        (PartitionSet(P, frozenset({0, 2})), {"slots": slots}),
        (PartitionSet(P, frozenset({0, 2})), {"bookings": bookings}),
        (PartitionSet(P, frozenset({0, 2})), {"keys": keys}),
        # Another P, or a set that drops a partition it serves.
        (PartitionSet(2 * P, frozenset({0, 1})), {"slots": slots, "bookings": bookings}),
        (PartitionSet(P, frozenset({1})), {"slots": slots, "bookings": bookings}),
    ]
    for partitions, records in refused:
        with pytest.raises(InvariantViolation):
            b.adopt(partitions, **{"slots": [], "bookings": [], "entries": [], **records})
        # Refused before any change.
        assert b.partitions == PartitionSet(P, frozenset({0}))
        assert b.statistics().slots == 0 and b.statistics().idempotency_records == 0
    b.adopt(
        PartitionSet(P, frozenset({0, 1})),
        slots=slots,
        bookings=bookings,
        entries=entries,
        keys=keys,
    )
    b.check_invariants(c.now_ms)
    assert b.statistics().holds == 1


def test_a_key_record_encoded_before_partitions_decodes_with_none() -> None:
    result = p.Done(status=204)
    old = msgspec.msgpack.encode(["ann", "Reserve", "k", 5, b"fp", result])
    decoded = msgspec.msgpack.Decoder(p.KeyRecord).decode(old)
    assert decoded == p.KeyRecord("ann", "Reserve", "k", 5, b"fp", result)
    assert decoded.partition == -1
    new = p.KeyRecord("ann", "Reserve", "k", 5, b"fp", result, 3)
    assert msgspec.msgpack.Decoder(p.KeyRecord).decode(msgspec.msgpack.encode(new)) == new


# -- moving at random, against a shard that never moved ---------------------------


def random_commands(
    rng: random.Random, slots: list[str], bookings: list[tuple[str, str]]
) -> Iterator[tuple[Callable[..., p.AnyCommand], dict[str, Any]]]:
    """Commands of a few users on ``slots`` and on the ``bookings`` made so far. A
    key is reused on one target only: shards that split a user's targets cannot
    tell that a key was used elsewhere (a single shard would refuse it)."""
    users = [f"u{i}" for i in range(8)]

    def keyed(target: str) -> dict[str, str]:
        return {"idempotency_key": f"{target}-k{rng.randrange(3)}"} if rng.random() < 0.2 else {}

    while True:
        user = rng.choice(users)
        slot_id = rng.choice(slots)
        roll = rng.random()
        if roll < 0.35 or not bookings:
            yield p.Reserve, {"slot_id": slot_id, "user_id": user, **keyed(slot_id)}
        elif roll < 0.55:
            booking_id, owner = rng.choice(bookings)
            yield p.Confirm, {"booking_id": booking_id, "user_id": owner, **keyed(booking_id)}
        elif roll < 0.65:
            booking_id, owner = rng.choice(bookings)
            yield p.Cancel, {"booking_id": booking_id, "user_id": owner, **keyed(booking_id)}
        elif roll < 0.8:
            yield p.JoinQueue, {"slot_id": slot_id, "user_id": user, **keyed(slot_id)}
        elif roll < 0.9:
            yield p.LeaveQueue, {"slot_id": slot_id, "user_id": user}
        else:
            yield p.QueuePosition, {"slot_id": slot_id, "user_id": user}


def counts(cores: list[ShardCore], slot_ids: list[str], c: Cluster) -> dict[str, Any]:
    """Per slot, what the core serving it says: its counts and its waiting line."""
    answers: dict[str, Any] = {}
    for slot_id in slot_ids:
        views = [c.run(core, p.GetSlot, slot_id=slot_id) for core in cores]
        (view,) = [v.slot for v in views if v.status == 200]
        answers[slot_id] = (view.held_count, view.current_bookings, view.status)
    return answers


class BookingNames:
    """Which booking of one world is which of the other. Each side names a new
    hold from its own counter, and timers due together fire shard by shard, so
    the names may differ; a hold is the same one when its slot, user and time are."""

    def __init__(self) -> None:
        self._held: tuple[dict[tuple[str, str, int], str], dict[tuple[str, str, int], str]] = (
            {},
            {},
        )
        self.to_moved: dict[str, str] = {}
        self.to_alone: dict[str, str] = {}

    def learn(self, side: int, events: list[p.AnyEvent]) -> None:
        for event in events:
            if isinstance(event, p.BookingChanged) and event.from_status == "PENDING":
                booking = event.booking
                self._held[side][booking.slot_id, booking.user_id, booking.reserved_at_ms] = (
                    booking.id
                )
        alone, moved = self._held
        for hold, alone_id in alone.items():
            moved_id = moved.get(hold)
            if moved_id is not None:
                self.to_moved[alone_id] = moved_id
                self.to_alone[moved_id] = alone_id

    def as_alone(self, result: Any) -> Any:
        """A moved side's answer, in the names of the shard that never moved."""
        if isinstance(result, p.BookingResult):
            booking = result.booking
            named = msgspec.structs.replace(booking, id=self.to_alone.get(booking.id, booking.id))
            return msgspec.structs.replace(result, booking=named)
        if isinstance(result, p.QueueResult) and result.entry.booking_id is not None:
            offered = self.to_alone.get(result.entry.booking_id, result.entry.booking_id)
            return msgspec.structs.replace(
                result, entry=msgspec.structs.replace(result.entry, booking_id=offered)
            )
        return result


@pytest.mark.parametrize("seed", range(12))
def test_moving_partitions_at_random_changes_no_answer(seed: int) -> None:
    rng = random.Random(seed)
    c = Cluster()
    # One shard that never moves, and two whose union serves the same partitions.
    alone = c.core(range(P), uniques=itertools.count(1))
    moved_from = c.core(range(P))
    moved_to = c.core(())
    moved = (moved_from, moved_to)
    slot_ids: list[str] = []
    for n, resource in enumerate(resource_in(q, i) for q in range(P) for i in range(2)):
        capacity = rng.randint(1, 3)
        slot_ids.append(c.slot(alone, resource, capacity, unique=f"{n:06d}"))
        assert c.slot(moved_from, resource, capacity, unique=f"{n:06d}") == slot_ids[-1]
    names = BookingNames()
    bookings: list[tuple[str, str]] = []
    logged: list[p.KeyRecord] = []
    commands = random_commands(rng, slot_ids, bookings)
    moves = 0
    for _ in range(150):
        step = rng.choice(["act"] * 8 + ["move", "wait"])
        if step == "wait":
            c.now_ms += rng.choice([SECOND_MS, 30 * SECOND_MS, MINUTE_MS, 2 * MINUTE_MS])
            for core in (alone, *moved):
                core.advance(c.now_ms)
                core.check_invariants(c.now_ms)
        elif step == "move":
            giver, taker = rng.sample(moved, 2)
            served = sorted(giver.partitions.owned)
            if not served:
                continue
            moving = frozenset(rng.sample(served, rng.randint(1, len(served))))
            slots, stored_bookings, entries = stored(giver, moving)
            giver.release(moving)
            taker.adopt(
                PartitionSet(P, taker.partitions.owned | moving),
                slots=slots,
                bookings=stored_bookings,
                entries=entries,
                keys=latest_keys(logged, moving),
            )
            for core in moved:
                core.check_invariants(c.now_ms)
            moves += 1
        else:
            kind, fields = next(commands)
            request_id = c.request_id()
            expected = same_shard_agnostic(c.run(alone, kind, request_id=request_id, **fields))
            moved_fields = dict(fields)
            if "booking_id" in fields:
                moved_fields["booking_id"] = names.to_moved[fields["booking_id"]]
            answers = [c.run(core, kind, request_id=request_id, **moved_fields) for core in moved]
            served_answers = [
                names.as_alone(same_shard_agnostic(a)) for a in answers if p.not_served(a) is None
            ]
            assert served_answers == [expected], (kind, fields)
            if isinstance(expected, p.BookingResult) and expected.status == 201:
                bookings.append((expected.booking.id, expected.booking.user_id))
        # The host drains after every step, storage takes what it drained.
        names.learn(0, alone.drain_events())
        for core in moved:
            names.learn(1, core.drain_events())
            logged += core.drain_remembered()[1]
    assert moves > 3
    assert counts(list(moved), slot_ids, c) == counts([alone], slot_ids, c)
    union = [core.statistics() for core in moved]
    total = alone.statistics()
    assert sum(s.holds for s in union) == total.holds
    assert sum(s.confirmed for s in union) == total.confirmed
    assert sum(s.waiting for s in union) == total.waiting
    assert sum(s.slots for s in union) == total.slots
    assert sum(s.bookings_in_memory for s in union) == total.bookings_in_memory


def test_a_key_reused_for_a_partition_not_served_is_sent_on_not_refused() -> None:
    c = Cluster()
    a = c.core({1})
    mine = c.slot(a, resource_in(1), capacity=1)
    c.run(a, p.Reserve, slot_id=mine, user_id="ann", idempotency_key="k")
    elsewhere = make_slot_id(resource_in(2), "000099")
    # The key's record is of partition 1; the command's partition is served elsewhere,
    # where its shard decides it: a 409 here would stop the resend.
    moved = c.run(a, p.Reserve, slot_id=elsewhere, user_id="ann", idempotency_key="k")
    assert p.not_served(moved) == 2, moved
    other = c.slot(a, resource_in(1, 1), capacity=1)
    reused = c.run(a, p.Reserve, slot_id=other, user_id="ann", idempotency_key="k")
    assert reused.code == "IdempotencyKeyReused"


def test_merged_keys_keep_their_own_retention_among_the_keys_remembered_here() -> None:
    memory = RequestMemory()
    done = p.Done(status=204)
    day_ms = IDEMPOTENCY_RETENTION_MS
    memory.remember_key(("ann", "Reserve", "new"), b"n", done, START_MS + HOUR_MS, partition=0)
    memory.drain()
    # Older than the one remembered here, and one already past its retention.
    memory.merge_keys(
        [
            p.KeyRecord("bob", "Reserve", "old", START_MS, b"o", done, 1),
            p.KeyRecord("cat", "Reserve", "gone", START_MS + HOUR_MS - day_ms, b"g", done, 1),
        ]
    )
    assert set(memory.keys) == {("ann", "Reserve", "new"), ("bob", "Reserve", "old")}
    assert memory.keys["bob", "Reserve", "old"][3] == 1
    assert memory.drain() == ([], [])
    # The merged key goes at the end of its own day, the one remembered here later.
    memory.remember_key(("dan", "Reserve", "k"), b"d", done, START_MS + day_ms, partition=0)
    assert ("bob", "Reserve", "old") not in memory.keys
    assert ("ann", "Reserve", "new") in memory.keys
    memory.forget_keys(frozenset({0}))
    assert not memory.keys
    memory.remember_key(("eve", "Reserve", "k"), b"e", done, START_MS + day_ms, partition=-1)
    memory.forget_keys(frozenset({0, 1}))
    assert set(memory.keys) == {("eve", "Reserve", "k")}  # of no known partition: stays


def test_a_change_resent_across_a_move_gets_its_first_answer_from_the_new_owner() -> None:
    c = Cluster()
    a, b = c.core({0, 1}), c.core({2, 3})
    slot_id = c.slot(a, resource_in(1), capacity=1)
    held = c.run(a, p.Reserve, slot_id=slot_id, user_id="ann")
    c.run(a, p.Confirm, booking_id=held.booking.id, user_id="ann")
    cancel = p.Cancel(request_id=c.request_id(), booking_id=held.booking.id, user_id="ann")
    first = a.execute(cancel, c.now_ms)
    assert isinstance(first, p.BookingResult) and first.status == 200, first
    a.drain_events()
    outcomes, _ = a.drain_remembered()
    # Every outcome here names its slot, so its partition.
    assert [type(o.result).__name__ for o in outcomes] == ["SlotResult"] + ["BookingResult"] * 3
    assert {outcome_partition(o.result, P) for o in outcomes} == {1}
    assert outcomes[-1].request_id == cancel.request_id
    assert outcome_partition(p.Done(status=204), P) is None

    slots, bookings, entries = stored(a, frozenset({1}))
    a.release(frozenset({1}))
    b.adopt(
        PartitionSet(P, frozenset({1, 2, 3})),
        slots=slots,
        bookings=bookings,
        entries=entries,
        outcomes=outcomes,
    )
    replays = b.statistics().replays_total
    again = b.execute(cancel, c.now_ms)
    assert again == first  # not a second run: a 409 for a cancelled booking
    assert b.statistics().replays_total == replays + 1
    # The adopted outcomes are not logged again for storage (their shard wrote them).
    assert b.drain_remembered() == ([], [])
    # An outcome of a partition not being adopted (1 is served already) is refused.
    with pytest.raises(InvariantViolation):
        b.adopt(
            PartitionSet(P, frozenset({0, 1, 2, 3})),
            slots=[],
            bookings=[],
            entries=[],
            outcomes=outcomes[:1],
        )
