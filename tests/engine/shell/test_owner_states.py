"""The shard owner's state table, walked edge by edge: on its own and on an owner."""

import itertools

import pytest

from engine.shell.clock import SystemClock
from engine.shell.owner import ShardOwner, StorageSettings
from engine.shell.owner_states import (
    OWNER_LATE_EVENTS,
    OWNER_TRANSITIONS,
    OwnerEvent,
    OwnerState,
    OwnerTransitionRefused,
    next_owner_state,
)
from tests.support.domain import policy

EVERY_PAIR = list(itertools.product(OwnerState, OwnerEvent))
REFUSED = [
    pair for pair in EVERY_PAIR if pair not in OWNER_TRANSITIONS and pair not in OWNER_LATE_EVENTS
]


def owner_in(state: OwnerState) -> ShardOwner:
    """An owner that was never started (no I/O), put in ``state``."""
    owner = ShardOwner(
        shard_id=0,
        shard_count=1,
        policies={"default": policy()},
        clock=SystemClock(),
        storage=StorageSettings(database_url="postgresql://unused", redis_url="redis://unused"),
    )
    owner.state = state
    return owner


@pytest.mark.parametrize(("edge", "target"), list(OWNER_TRANSITIONS.items()))
def test_every_allowed_transition_leads_where_the_table_says(
    edge: tuple[OwnerState, OwnerEvent], target: OwnerState
) -> None:
    current, event = edge
    assert next_owner_state(current, event) is target
    owner = owner_in(current)
    assert owner._take(event) is True
    assert owner.state is target


@pytest.mark.parametrize("pair", sorted(OWNER_LATE_EVENTS, key=str))
def test_a_late_event_changes_nothing(pair: tuple[OwnerState, OwnerEvent]) -> None:
    current, event = pair
    assert next_owner_state(current, event) is None
    owner = owner_in(current)
    assert owner._take(event) is False
    assert owner.state is current


@pytest.mark.parametrize("pair", REFUSED)
def test_every_other_transition_is_refused_and_the_owner_stays(
    pair: tuple[OwnerState, OwnerEvent],
) -> None:
    current, event = pair
    with pytest.raises(OwnerTransitionRefused) as refused:
        next_owner_state(current, event)
    assert (refused.value.current, refused.value.event) == (current, event)
    owner = owner_in(current)
    with pytest.raises(OwnerTransitionRefused):
        owner._take(event)
    assert owner.state is current


def test_the_table_is_whole_and_stopped_is_final() -> None:
    assert not set(OWNER_TRANSITIONS) & OWNER_LATE_EVENTS
    # A refusal is the rule only where an event cannot arrive in that state:
    # loading after the owner stopped is the one a race could bring.
    assert (OwnerState.STOPPED, OwnerEvent.LOADED) in REFUSED
    leaving_stopped = {
        to for (origin, _), to in OWNER_TRANSITIONS.items() if origin is OwnerState.STOPPED
    }
    assert leaving_stopped == {OwnerState.STOPPED}
    reached = {OwnerState.STARTING}
    while True:
        more = {to for (origin, _), to in OWNER_TRANSITIONS.items() if origin in reached}
        if more <= reached:
            break
        reached |= more
    assert reached == set(OwnerState)
