"""The waiting line: FIFO, unique users, positions agree with a plain list."""

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import limits
from engine.core.waiting_line import WaitingLine


def test_fifo_positions_and_removal_from_the_middle() -> None:
    line = WaitingLine()
    for user in ("ann", "bob", "cat", "dan"):
        line.push(user)
    assert [line.position(u) for u in ("ann", "bob", "cat", "dan")] == [1, 2, 3, 4]
    line.remove("bob", now_ms=0)
    assert line.position("cat") == 2
    assert line.pop_head(now_ms=0) == "ann"
    assert list(line) == ["cat", "dan"]
    assert line.position("ann") is None
    assert line.position("dan") == 2


def test_a_hundred_thousand_users_answer_positions_fast() -> None:
    line = WaitingLine()
    for i in range(100_000):
        line.push(f"u{i}")
    for _ in range(500):
        line.pop_head(now_ms=0)
    # bisect over the sorted list: no scan of the 99,500 entries behind
    assert line.position("u99999") == 99_500
    assert line.position("u500") == 1


def test_wait_estimate_follows_the_observed_pace() -> None:
    line = WaitingLine()
    for i in range(10):
        line.push(f"u{i}")
    assert line.estimated_wait_ms(3, now_ms=0, prior_interval_ms=40_000) == 120_000
    for t in (0, 10_000, 20_000, 30_000):
        line.pop_head(now_ms=t)
    assert line.estimated_wait_ms(2, now_ms=30_000, prior_interval_ms=40_000) == 20_000
    # a stall longer than the pace stretches the estimate
    assert line.estimated_wait_ms(2, now_ms=90_000, prior_interval_ms=40_000) == 120_000


def test_wait_estimate_uses_only_the_latest_advances() -> None:
    """The pace comes from the last WAIT_ESTIMATE_SAMPLES_MAX departures from the front."""
    samples_max = limits.WAIT_ESTIMATE_SAMPLES_MAX
    line = WaitingLine()
    for i in range(3 * samples_max + 5):
        line.push(f"u{i}")
    # A slow start (one a minute), then a fast stretch (one a second) long
    # enough to push every slow sample out of the window.
    now_ms = 0
    for _ in range(samples_max):
        now_ms += 60_000
        line.pop_head(now_ms=now_ms)
    slow = line.estimated_wait_ms(1, now_ms=now_ms, prior_interval_ms=1)
    assert slow == 60_000
    for step in range(samples_max + 3):
        now_ms += 1_000
        line.pop_head(now_ms=now_ms)
        if step == samples_max // 2:
            # Half the window is still slow: the pace lies between the two.
            assert 1_000 < line.estimated_wait_ms(1, now_ms=now_ms, prior_interval_ms=1) < slow
    assert line.estimated_wait_ms(4, now_ms=now_ms, prior_interval_ms=1) == 4_000


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["push", "pop", "remove"]), st.integers(0, 15)), max_size=80)
)
def test_agrees_with_a_list(ops: list[tuple[str, int]]) -> None:
    line = WaitingLine()
    model: list[str] = []
    for op, n in ops:
        user = f"u{n}"
        if op == "push" and user not in model:
            line.push(user)
            model.append(user)
        elif op == "pop" and model:
            assert line.pop_head(now_ms=0) == model.pop(0)
        elif op == "remove" and user in model:
            line.remove(user, now_ms=0)
            model.remove(user)
        line.check()
        assert list(line) == model
        for i, u in enumerate(model, start=1):
            assert line.position(u) == i


def test_offering_many_drops_the_dead_prefix_and_keeps_order() -> None:
    line = WaitingLine()
    for i in range(300):
        line.push(f"u{i}")
    for i in range(200):
        assert line.pop_head(now_ms=i) == f"u{i}"
        line.check()
    line.remove("u250", now_ms=0)
    line.push("late")
    line.check()
    assert len(line) == 100
    assert line.head() == "u200"
    assert line.position("u251") == 51
    assert line.position("late") == 100
    assert list(line)[:2] == ["u200", "u201"]


def test_a_restore_out_of_order_lands_in_its_place() -> None:
    line = WaitingLine()
    line.restore("c", 30)
    line.restore("a", 10)
    line.restore("b", 20)
    line.check()
    assert list(line) == ["a", "b", "c"]
    assert line.push("d") == 31
