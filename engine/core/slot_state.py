"""A slot's mutable state inside its shard: settings, counts, line and cached views.

``SlotState`` owns the fields of one slot as the single writer keeps them,
its derived status and the cheap count invariant (``check_counts``). Only the
core's modules touch it (``engine/core/shard.py`` and the slot administration,
views and invariant checks beside it); it never leaves the shard: replies and
events carry ``SlotView`` copies. It must never change itself: every method
here reads.
"""

from collections import OrderedDict

from engine.core.errors import InvariantViolation
from engine.core.policy import DomainPolicy
from engine.core.protocol import Failure
from engine.core.records import Booking, QueueEntry, SlotView, StoredSlot
from engine.core.states import SlotStatus, slot_status
from engine.core.waiting_line import WaitingLine

# A shard timer's key: its kind ("hold", "end", "idle", ...) and the id it is about.
TimerKey = tuple[str, ...]


class SlotState:
    """A slot's mutable state."""

    __slots__ = (
        "active_by_user",
        "advance_booking_ms",
        "blocked",
        "capacity",
        "claim_ttl_ms",
        "confirmed",
        "dirty",
        "domain",
        "end_ms",
        "ended",
        "entries",
        "held",
        "hold_ttl_ms",
        "id",
        "idle",
        "last_view",
        "line",
        "metadata",
        "policy",
        "queue_enabled",
        "queue_full",
        "queue_full_at",
        "queue_inactivity_ms",
        "queue_size_max",
        "resource_id",
        "revision",
        "start_ms",
        "version",
        "view",
        "view_ended",
    )

    def __init__(self, stored: StoredSlot, policy: DomainPolicy) -> None:
        self.id = stored.id
        self.resource_id = stored.resource_id
        self.domain = stored.domain
        self.policy = policy
        # The policy's numbers the hot paths read, as native fields: a compiled
        # build reads these directly, where the policy's are generic lookups.
        self.hold_ttl_ms = policy.hold_ttl_ms
        self.claim_ttl_ms = policy.claim_ttl_ms
        self.queue_enabled = policy.queue_enabled
        self.queue_size_max = policy.queue_size_max
        self.queue_inactivity_ms = policy.queue_inactivity_ms
        self.advance_booking_ms = policy.advance_booking_ms
        self.start_ms = stored.start_ms
        self.end_ms = stored.end_ms
        self.capacity = stored.capacity
        self.blocked = stored.blocked
        self.metadata = stored.metadata
        self.version = stored.version
        # Every change of this slot in this incarnation counts one (ShardCore._changed).
        self.revision = 0
        self.confirmed = 0
        self.held = 0
        # user id -> that user's RESERVED or CONFIRMED booking of this slot
        self.active_by_user: dict[str, Booking] = {}
        self.line = WaitingLine()
        # user id -> that user's latest queue entry, whatever its status
        self.entries: dict[str, QueueEntry] = {}
        # The waiting users, least recently seen first: one timer per slot, at
        # the front user's inactivity deadline, serves them all.
        self.idle: OrderedDict[str, None] = OrderedDict()
        self.ended = False
        # The last view built, shared until the slot changes (ShardCore._changed
        # drops it) or the clock crosses its end (view_ended no longer matches).
        self.view: SlotView | None = None
        self.view_ended = False
        # The last view built, kept after a change: while the slot's settings
        # (its version) stay the same, the next view copies it with new counts.
        self.last_view: SlotView | None = None
        # Changed since the shard last reported its counts (ShardCore.drain_events).
        self.dirty = False
        # The last QueueFull refusal and the line length it reported.
        self.queue_full: Failure | None = None
        self.queue_full_at = -1

    @property
    def available(self) -> int:
        # Never negative: check_counts keeps confirmed + held <= capacity.
        return self.capacity - self.confirmed - self.held

    def status(self, now_ms: int) -> SlotStatus:
        return slot_status(
            blocked=self.blocked,
            ended=self.ended or now_ms >= self.end_ms,
            capacity=self.capacity,
            confirmed=self.confirmed,
            held=self.held,
        )

    def check_counts(self) -> None:
        # Formatted only on failure: this runs on every change of a count.
        if not (
            self.held >= 0 and self.confirmed >= 0 and self.confirmed + self.held <= self.capacity
        ):
            raise InvariantViolation(
                f"slot {self.id}: confirmed {self.confirmed} + held {self.held}"
                f" exceeds capacity {self.capacity}"
            )
