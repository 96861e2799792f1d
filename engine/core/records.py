"""The records the engine keeps and hands out: bookings, queue entries, views.

``Booking`` and ``QueueEntry`` are the core's own mutable state; results and
events carry copies (``snapshot``), never the live objects, so a later command
cannot change what an earlier reply said. ``SlotView`` and ``QueueView`` are
read-only projections computed on demand. All times are epoch milliseconds;
the gateway renders them as RFC 3339.

Records are ``gc=False``: they hold only scalars and plain JSON-like data, so
they can never be part of a reference cycle, and keeping hundreds of thousands
of them out of the cycle collector's scans is most of the core's speed.
"""

from typing import Any

import msgspec

from engine.core.states import BookingStatus, QueueStatus, SlotStatus


class Booking(msgspec.Struct, gc=False, kw_only=True):
    id: str
    user_id: str
    slot_id: str
    status: BookingStatus
    reserved_at_ms: int
    expires_at_ms: int
    confirmed_at_ms: int | None = None
    completed_at_ms: int | None = None
    cancelled_at_ms: int | None = None
    cancel_reason: str | None = None
    cancelled_by: str | None = None
    refund_percentage: int | None = None
    # True when the hold was offered from the slot's waiting queue.
    via_queue: bool = False
    version: int = 1
    # How many times the hold was extended (``ExtendHold``).
    extensions: int = 0


class QueueEntry(msgspec.Struct, gc=False, kw_only=True):
    slot_id: str
    user_id: str
    status: QueueStatus
    # Join order within the slot; strictly increasing, never reused.
    seq: int
    joined_at_ms: int
    last_seen_ms: int
    notified_at_ms: int | None = None
    booking_id: str | None = None
    ended_at_ms: int | None = None
    version: int = 1


class SlotView(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    id: str
    resource_id: str
    domain: str
    start_ms: int
    end_ms: int
    capacity: int
    current_bookings: int
    held_count: int
    available: int
    status: SlotStatus
    queue_length: int
    blocked: bool
    # The slot's metadata, msgpack-encoded: the view is immutable all through,
    # so the shard can share one view among many replies and events.
    metadata: msgspec.Raw
    version: int
    # Not part of the public API: live updates order what they forward by these.
    # The shard incarnation that built the view (a restarted shard has another);
    # a count of the slot's changes in that incarnation; the line's departures.
    epoch: str = ""
    revision: int = 0
    departures: int = 0

    def metadata_dict(self) -> dict[str, Any]:
        """A fresh copy of the metadata as a dict."""
        return _decode_metadata(self.metadata)


class StoredSlot(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    """A slot's own settings as storage keeps them (counts follow from its bookings)."""

    id: str
    resource_id: str
    domain: str
    start_ms: int
    end_ms: int
    capacity: int
    blocked: bool
    metadata: msgspec.Raw
    version: int


class QueueView(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    slot_id: str
    user_id: str
    status: QueueStatus
    # The entry's join sequence number: live position updates compare it with the
    # ``removed_seq`` of QueueMoved events (not part of the public API).
    seq: int
    position: int | None
    total_in_queue: int
    estimated_wait_seconds: int | None
    estimated_wait_time: str | None
    joined_at_ms: int
    notified_at_ms: int | None
    booking_id: str | None
    offer_expires_at_ms: int | None
    slot: SlotView


_encode_metadata = msgspec.msgpack.Encoder().encode
_decode_metadata = msgspec.msgpack.Decoder(dict[str, Any]).decode


def pack_metadata(metadata: dict[str, Any]) -> msgspec.Raw:
    return msgspec.Raw(_encode_metadata(metadata))


# Defined here, not in the compiled ``shard`` module: a msgspec struct compiled by
# mypyc keeps ``type`` as the annotation of a field such as ``int | None``, so
# msgspec could not decode it where it crosses a process boundary.
class ShardStatistics(msgspec.Struct, frozen=True, kw_only=True):
    shard_id: int
    slots: int
    bookings_in_memory: int
    holds: int
    confirmed: int
    waiting: int
    timers: int
    idempotency_records: int
    request_outcomes: int
    commands_total: int
    failures_total: int
    replays_total: int
    events_total: int
    expirations_total: int
    offers_total: int
    next_deadline_ms: int | None
