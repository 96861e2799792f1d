"""The fixed-bucket histograms of the engine's Redis and database work
(persistence/timings.py): buckets by upper bound, cumulative snapshots, bounded
labels, and a snapshot that crosses a process boundary unchanged."""

import pickle

import msgspec
import pytest

from persistence.timings import (
    DURATION_BOUNDS_S,
    FLUSH_SIZE_BOUNDS,
    LABELS_MAX,
    Histogram,
    Timings,
    TimingsSnapshot,
)


def test_a_value_counts_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    histogram = Histogram(FLUSH_SIZE_BOUNDS)
    for value in (1, 2, 3, 5, 6, 10_000, 10_001):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    cumulative = dict(zip((*FLUSH_SIZE_BOUNDS, "+Inf"), snapshot.cumulative, strict=True))
    # le=1: {1}; le=2: {1, 2}; le=5: {1, 2, 3, 5}; le=10: + 6; le=10000: + 10000; +Inf: all.
    assert (cumulative[1], cumulative[2], cumulative[5], cumulative[10]) == (1, 2, 4, 5)
    assert (cumulative[5_000], cumulative[10_000], cumulative["+Inf"]) == (5, 6, 7)
    assert snapshot.count == 7
    assert snapshot.sum == 1 + 2 + 3 + 5 + 6 + 10_000 + 10_001


def test_durations_are_observed_in_nanoseconds_and_rendered_in_seconds() -> None:
    timings = Timings()
    histogram = timings.redis("lease_renew")
    histogram.observe(700_000)  # 0.7 ms: in le=0.001, not in le=0.0005
    histogram.observe(3_000_000_000)  # 3 s
    snapshot = timings.snapshot().redis["lease_renew"]
    bounds = dict(zip((*DURATION_BOUNDS_S, "+Inf"), snapshot.cumulative, strict=True))
    assert (bounds[0.0005], bounds[0.001], bounds[2.5], bounds[5.0]) == (0, 1, 1, 2)
    assert snapshot.sum == pytest.approx(3.0007)
    # The same histogram for the same label: callers take it once and keep it.
    assert timings.redis("lease_renew") is histogram


def test_a_timed_block_is_observed_even_when_it_raises() -> None:
    histogram = Timings().database("flush")
    with pytest.raises(RuntimeError), histogram.time():
        raise RuntimeError("the database is down")
    with histogram.time():
        pass
    assert histogram.snapshot().count == 2


def test_labels_are_constants_of_the_code_and_bounded_in_number() -> None:
    timings = Timings()
    for bad in ("", "slot:123", "a b", "x" * 65):
        with pytest.raises(ValueError):
            timings.redis(bad)
    for index in range(LABELS_MAX):
        timings.database(f"kind_{index}")
    with pytest.raises(ValueError):
        timings.database("one_too_many")
    # Each kind has its own bound.
    assert timings.redis("publish").snapshot().count == 0


def test_a_snapshot_travels_as_msgpack_and_pickle() -> None:
    timings = Timings()
    timings.redis("publish").observe(1_000)
    timings.flush_events.observe(40)
    timings.commit_lag.observe(2_000_000)
    timings.connections_max = 1
    snapshot = timings.snapshot()
    encoded = msgspec.msgpack.encode(snapshot)
    assert msgspec.msgpack.decode(encoded, type=TimingsSnapshot) == snapshot
    assert pickle.loads(pickle.dumps(snapshot)) == snapshot
