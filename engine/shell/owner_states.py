"""Every state rule of a shard owner (``engine/shell/owner.py``), as data.

Theory of operation
-------------------
An owner is STARTING until it first loads its shard (lease taken, state
reloaded from PostgreSQL), then SERVING. A failure that leaves the in-memory
state ahead of the database or unfenced (a flush failed, the core raised, the
lease lapsed) sends it REBUILDING, and the next load serves again. Being
fenced off, the lease taken by another owner or stored state it cannot serve
STOP it, and ``close`` stops it too: STOPPED is final, nothing leads out of it.

The owner moves only along ``OWNER_TRANSITIONS``, a table keyed by (state,
event). PostgreSQL unreachable (a flush failed for want of it) sends a
serving owner DEGRADED instead: its state in memory stays, frozen, and answers
the reads that show only committed state, while it reloads; the load serves
again, and a failure that makes the memory untrustworthy (the lease lapsed)
sends it REBUILDING.

Some events arrive after the owner has already moved on (a second
failure while it rebuilds, a fence or a lease loss after it stopped): those
are in ``OWNER_LATE_EVENTS`` and change nothing. Anything else is refused
with ``OwnerTransitionRefused`` before the owner acts on it: above all a load
that completes after the owner stopped never serves again.

This module must never act: it only says where an event leads.
"""

import enum
from typing import Final


class OwnerState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    REBUILDING = "rebuilding"
    # PostgreSQL unreachable: reads from the frozen state, no change, reloading.
    DEGRADED = "degraded"
    STOPPED = "stopped"


class OwnerEvent(enum.Enum):
    # The shard's state was loaded from PostgreSQL under a new fencing token.
    LOADED = "loaded"
    # The state in memory can no longer be trusted: reload it.
    REBUILD = "rebuild"
    # PostgreSQL did not take a flush: keep the state for reads, reload.
    STORAGE_LOST = "storage_lost"
    # Fenced off, the lease taken, or stored state that cannot be served.
    STOP = "stop"
    # The owner is closed by its host.
    CLOSE = "close"


OWNER_TRANSITIONS: Final[dict[tuple[OwnerState, OwnerEvent], OwnerState]] = {
    (OwnerState.STARTING, OwnerEvent.LOADED): OwnerState.SERVING,
    (OwnerState.REBUILDING, OwnerEvent.LOADED): OwnerState.SERVING,
    (OwnerState.SERVING, OwnerEvent.REBUILD): OwnerState.REBUILDING,
    (OwnerState.SERVING, OwnerEvent.STORAGE_LOST): OwnerState.DEGRADED,
    (OwnerState.DEGRADED, OwnerEvent.LOADED): OwnerState.SERVING,
    (OwnerState.DEGRADED, OwnerEvent.REBUILD): OwnerState.REBUILDING,
    (OwnerState.DEGRADED, OwnerEvent.STOP): OwnerState.STOPPED,
    (OwnerState.DEGRADED, OwnerEvent.CLOSE): OwnerState.STOPPED,
    (OwnerState.SERVING, OwnerEvent.STOP): OwnerState.STOPPED,
    (OwnerState.REBUILDING, OwnerEvent.STOP): OwnerState.STOPPED,
    (OwnerState.STARTING, OwnerEvent.CLOSE): OwnerState.STOPPED,
    (OwnerState.SERVING, OwnerEvent.CLOSE): OwnerState.STOPPED,
    (OwnerState.REBUILDING, OwnerEvent.CLOSE): OwnerState.STOPPED,
    (OwnerState.STOPPED, OwnerEvent.CLOSE): OwnerState.STOPPED,
}

# Events that may come after the owner moved on, and then mean nothing.
OWNER_LATE_EVENTS: Final = frozenset(
    {
        (OwnerState.REBUILDING, OwnerEvent.REBUILD),
        (OwnerState.STOPPED, OwnerEvent.REBUILD),
        (OwnerState.DEGRADED, OwnerEvent.STORAGE_LOST),
        (OwnerState.REBUILDING, OwnerEvent.STORAGE_LOST),
        (OwnerState.STOPPED, OwnerEvent.STORAGE_LOST),
        (OwnerState.STOPPED, OwnerEvent.STOP),
    }
)


class OwnerTransitionRefused(Exception):
    """An event the owner's table has no edge for in the owner's current state."""

    def __init__(self, current: OwnerState, event: OwnerEvent) -> None:
        super().__init__(f"a {current.value} shard owner cannot take the event {event.value}")
        self.current = current
        self.event = event


def next_owner_state(current: OwnerState, event: OwnerEvent) -> OwnerState | None:
    """The state ``event`` leads to, None for a late event, else ``OwnerTransitionRefused``."""
    following = OWNER_TRANSITIONS.get((current, event))
    if following is not None:
        return following
    if (current, event) in OWNER_LATE_EVENTS:
        return None
    raise OwnerTransitionRefused(current, event)
