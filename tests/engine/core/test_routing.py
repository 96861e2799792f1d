"""Routing: ids to partitions, partitions to shards, and the moves a new shard count makes."""

from hypothesis import given
from hypothesis import strategies as st

from engine.core import protocol as p
from engine.core.routing import (
    PartitionMap,
    PartitionSet,
    make_booking_id,
    make_slot_id,
    partition_of,
    partition_of_resource,
    routing_key,
    shard_of,
)
from engine.core.shard import ShardCore
from tests.support.domain import HOUR_MS, POLICIES

NOW_MS = 1_900_000_000_000


def test_an_id_and_its_resource_share_a_partition_and_bookings_follow_their_slot() -> None:
    slot_id = make_slot_id("dr-who", "abc")
    booking_id = make_booking_id(slot_id, "xyz")
    for partitions in (1, 2, 7, 4096):
        expected = routing_key("dr-who") % partitions
        assert partition_of(slot_id, partitions) == expected
        assert partition_of(booking_id, partitions) == expected
        assert partition_of_resource("dr-who", partitions) == expected
    assert partition_of("not-an-engine-id", 4096) is None
    assert PartitionMap.spread(8, 2).shard_of("not-an-engine-id") is None


@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 4, 8, 16, 64, 1024]))
def test_the_spread_map_keeps_every_slot_on_its_shard_of_before_partitions(
    key: int, shards: int
) -> None:
    slot_id = f"{key:08x}-s1"
    assert PartitionMap.spread(4096, shards).shard_of(slot_id) == shard_of(slot_id, shards)


def test_a_partition_set_owns_exactly_its_partitions() -> None:
    spread = PartitionMap.spread(8, 3)
    owned = spread.owned_by(1)
    assert owned == PartitionSet(8, frozenset({1, 4, 7}))
    ids = [f"{key:08x}-s1" for key in range(64)]
    assert [owned.owns(i) for i in ids] == [spread.shard_of(i) == 1 for i in ids]
    single = PartitionSet.single(2, 4)
    assert [single.owns(i) for i in ids] == [shard_of(i, 4) == 2 for i in ids]


@given(
    st.integers(1, 300).flatmap(
        lambda p: st.tuples(st.just(p), st.integers(1, min(p, 40)), st.integers(1, min(p, 40)))
    )
)
def test_a_new_shard_count_evens_the_map_and_moves_only_what_it_must(
    case: tuple[int, int, int],
) -> None:
    partitions, before, after = case
    old = PartitionMap.spread(partitions, before)
    new = old.respread(after)
    counts = new.counts()
    assert set(counts) == set(range(after))
    assert max(counts.values()) - min(counts.values()) <= 1
    # Partitions move only off shards that are gone or above their share: the
    # fewest moves that reach an even map.
    moved = old.moved(new)
    base, extra = divmod(partitions, after)
    share = {s: base + (1 if s < extra else 0) for s in range(after)}
    kept = old.counts()
    needed = sum(
        count if shard >= after else max(0, count - share[shard]) for shard, count in kept.items()
    )
    assert len(moved) == needed
    assert new.respread(after) == new


def test_respreading_an_uneven_map_fills_the_new_shards_first_from_the_loaded_ones() -> None:
    uneven = PartitionMap((0, 0, 0, 0, 0, 1), version=3)
    even = uneven.respread(3)
    assert even.counts() == {0: 2, 1: 2, 2: 2}
    assert even.version == 3
    assert all(before == 0 for before, _ in uneven.moved(even).values())


def test_a_shard_answers_503_for_a_partition_it_does_not_serve_and_remembers_nothing() -> None:
    served = PartitionSet(2, frozenset({0}))
    core = ShardCore(shard_id=0, shard_count=2, policies=POLICIES, now_ms=NOW_MS, partitions=served)
    mine = next(f"{key:08x}-s1" for key in range(64) if key % 2 == 0)
    elsewhere = next(f"{key:08x}-s2" for key in range(64) if key % 2 == 1)
    created = core.execute(
        p.CreateSlot(
            request_id="r-1",
            slot_id=mine,
            resource_id="room",
            domain="default",
            start_ms=NOW_MS + HOUR_MS,
            end_ms=NOW_MS + 2 * HOUR_MS,
            capacity=1,
        ),
        NOW_MS,
    )
    assert created.status == 201
    for command in (
        p.Reserve(request_id="r-2", slot_id=elsewhere, user_id="ann", idempotency_key="k"),
        p.GetSlot(request_id="r-3", slot_id=elsewhere),
        p.GetBooking(request_id="r-4", booking_id=elsewhere[:8] + "-bx", user_id="ann"),
    ):
        refused = core.execute(command, NOW_MS)
        assert isinstance(refused, p.Failure) and refused.status == 503, refused
        assert p.not_served(refused) == 1
    # Nothing of it is remembered: the same request id served later is decided anew.
    assert core.statistics().request_outcomes == 1
    assert core.statistics().idempotency_records == 0
    other_resource = next(f"r{n}" for n in range(64) if routing_key(f"r{n}") % 2 == 1)
    listed = core.execute(p.ListSlots(request_id="r-5", resource_id=other_resource), NOW_MS)
    assert p.not_served(listed) == 1
    # Served partitions, and ids the engine never issued, answer as before.
    assert core.execute(p.GetSlot(request_id="r-6", slot_id=mine), NOW_MS).status == 200
    assert core.execute(p.GetSlot(request_id="r-7", slot_id="nonsense"), NOW_MS).status == 404
    assert (
        p.not_served(core.execute(p.GetSlot(request_id="r-8", slot_id=mine[:-1]), NOW_MS)) is None
    )
