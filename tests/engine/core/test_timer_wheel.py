"""The timer wheel against a naive model: fire exactly the due keys, in order, once."""

import heapq

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.timer_wheel import TimerWheel

START_MS = 1_700_000_000_000


class NaiveTimers:
    def __init__(self) -> None:
        self.deadlines: dict[str, tuple[int, int]] = {}
        self.sequence = 0

    def schedule(self, key: str, deadline_ms: int) -> None:
        self.sequence += 1
        self.deadlines[key] = (deadline_ms, self.sequence)

    def cancel(self, key: str) -> bool:
        return self.deadlines.pop(key, None) is not None

    def advance(self, now_ms: int) -> list[str]:
        due = [(d, s, k) for k, (d, s) in self.deadlines.items() if d <= now_ms]
        heapq.heapify(due)
        fired = [heapq.heappop(due)[2] for _ in range(len(due))]
        for key in fired:
            del self.deadlines[key]
        return fired


def test_fires_at_deadline_never_before() -> None:
    wheel: TimerWheel[str] = TimerWheel(START_MS)
    wheel.schedule("hold", START_MS + 120_000)
    assert wheel.advance(START_MS + 119_999) == []
    assert wheel.advance(START_MS + 120_000) == ["hold"]
    assert wheel.advance(START_MS + 500_000) == []
    assert len(wheel) == 0


def test_past_deadline_is_due_at_next_advance() -> None:
    wheel: TimerWheel[str] = TimerWheel(START_MS)
    wheel.schedule("late", START_MS - 5)
    assert wheel.next_wakeup_ms() == START_MS
    assert wheel.advance(START_MS) == ["late"]


def test_reschedule_moves_and_cancel_removes() -> None:
    wheel: TimerWheel[str] = TimerWheel(START_MS)
    wheel.schedule("a", START_MS + 10)
    wheel.schedule("a", START_MS + 1_000_000)
    wheel.schedule("b", START_MS + 20)
    assert wheel.cancel("b")
    assert not wheel.cancel("b")
    assert wheel.advance(START_MS + 999_999) == []
    assert wheel.deadline_of("a") == START_MS + 1_000_000
    assert wheel.advance(START_MS + 1_000_000) == ["a"]
    wheel.check()


def test_ties_fire_in_scheduling_order_across_levels() -> None:
    wheel: TimerWheel[str] = TimerWheel(START_MS)
    deadline = START_MS + 10_000_000
    wheel.schedule("first", deadline)
    wheel.advance(deadline - 30)
    wheel.schedule("second", deadline)
    assert wheel.advance(deadline) == ["first", "second"]


def test_a_year_ahead_and_long_jumps_are_cheap() -> None:
    wheel: TimerWheel[int] = TimerWheel(START_MS)
    year_ms = 365 * 86_400_000
    for i in range(1_000):
        wheel.schedule(i, START_MS + year_ms - i * 7)
    assert wheel.advance(START_MS + year_ms // 2) == []
    fired = wheel.advance(START_MS + year_ms)
    assert fired == list(range(999, -1, -1))
    # The jump visits boundaries of non-empty levels only.
    assert wheel.statistics().cascaded_total < 10_000


def test_next_wakeup_is_never_after_the_earliest_deadline() -> None:
    wheel: TimerWheel[str] = TimerWheel(START_MS)
    assert wheel.next_wakeup_ms() is None
    wheel.schedule("far", START_MS + 3_600_000)
    wakeup = wheel.next_wakeup_ms()
    assert wakeup is not None and START_MS < wakeup <= START_MS + 3_600_000
    wheel.schedule("near", START_MS + 5)
    assert wheel.next_wakeup_ms() == START_MS + 5


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("schedule"),
            st.sampled_from("abcdefghij"),
            st.integers(min_value=-50, max_value=400_000_000),
        ),
        st.tuples(st.just("cancel"), st.sampled_from("abcdefghij"), st.just(0)),
        st.tuples(
            st.just("advance"),
            st.just(""),
            st.one_of(
                st.integers(min_value=0, max_value=100),
                st.integers(min_value=0, max_value=5_000_000),
                st.integers(min_value=0, max_value=400_000_000),
            ),
        ),
    ),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(operations)
def test_matches_naive_model(ops: list[tuple[str, str, int]]) -> None:
    wheel: TimerWheel[str] = TimerWheel(START_MS)
    model = NaiveTimers()
    now = START_MS
    for op, key, value in ops:
        if op == "schedule":
            wheel.schedule(key, now + value)
            model.schedule(key, now + value)
        elif op == "cancel":
            assert wheel.cancel(key) == model.cancel(key)
        else:
            now += value
            assert wheel.advance(now) == model.advance(now)
        wakeup = wheel.next_wakeup_ms()
        if model.deadlines:
            earliest = min(d for d, _ in model.deadlines.values())
            assert wakeup is not None and wakeup <= max(earliest, now)
        else:
            assert wakeup is None
        wheel.check()
        assert len(wheel) == len(model.deadlines)
