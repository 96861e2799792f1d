"""Folding a flush's audit rows (persistence/rows.py, pure): each change's origin
goes into its audit rows and nowhere else, a refused attempt is a row of its own,
a cancellation's row says why, what was refunded and who cancelled."""

import msgspec

from engine.core import protocol as p
from engine.core.records import Booking
from engine.core.states import BookingStatus
from persistence.rows import FlushRows

ORIGIN = p.Origin("trace-9", "198.51.100.4", "agent/3")


def _changed(request_id: str, to_status: BookingStatus, **booking: object) -> p.BookingChanged:
    fields = {"id": "b-1", "slot_id": "s-1", "user_id": "ann", "status": to_status,
              "reserved_at_ms": 1, "expires_at_ms": 2} | booking  # fmt: skip
    return p.BookingChanged(
        at_ms=5,
        request_id=request_id,
        actor="ann",
        booking=Booking(**fields),  # type: ignore[arg-type]
        from_status=BookingStatus.CONFIRMED,
        to_status=to_status,
        trigger="cancel",
    )


def test_the_origin_goes_into_the_audit_rows_only() -> None:
    rows = FlushRows(0)
    mine = _changed("rq-1", BookingStatus.CONFIRMED)
    timer = _changed("", BookingStatus.CONFIRMED)
    rows.add([mine, timer], {"rq-1": ORIGIN})
    assert [row[-3:] for row in rows.audit] == [
        ("trace-9", "198.51.100.4", "agent/3"),
        (None, None, None),
    ]
    # What is published (raw) and what the outbox takes (notifiable) are the
    # shard's own events, which have no place for an origin.
    assert rows.raw == [mine, timer] and rows.notifiable == [mine, timer]
    encoded = msgspec.msgpack.encode(rows.raw) + msgspec.msgpack.encode(rows.notifiable)
    assert b"198.51.100.4" not in encoded and b"agent/3" not in encoded


def test_a_cancellation_row_has_its_reason_refund_and_initiator() -> None:
    rows = FlushRows(0)
    rows.add(
        [
            _changed(
                "rq-1",
                BookingStatus.CANCELLED,
                cancel_reason="mail me: a@b.example",
                cancelled_by="ann",
                refund_percentage=50,
            ),
            _changed(
                "rq-2",
                BookingStatus.CANCELLED,
                cancel_reason="slot deleted",
                cancelled_by="admin:root",
                refund_percentage=100,
            ),
            _changed("rq-3", BookingStatus.CANCELLED, cancelled_by="system", refund_percentage=100),
        ]
    )
    assert [msgspec.json.decode(row[10] or "") for row in rows.audit] == [
        {"reason": "mail me: [redacted]", "refund": 50, "initiator": "user"},
        {"reason": "slot deleted", "refund": 100, "initiator": "admin"},
        {"refund": 100, "initiator": "system"},
    ]


def test_a_refused_attempt_is_a_row_of_its_own_in_the_same_flush() -> None:
    rows = FlushRows(0)
    refused = p.AttemptRefused(
        7, p.JoinQueue(request_id="rq-4", slot_id="s-2", user_id="bob", origin=ORIGIN), "QueueFull"
    )
    rows.remember([], [], [refused])
    assert rows.raw == [] and rows.notifiable == []
    ((at_ms, request_id, actor, entity, entity_id, slot_id, user_id, from_status, to_status,
      trigger, details, *origin),) = rows.audit  # fmt: skip
    assert (at_ms, request_id, actor, entity, entity_id, slot_id, user_id) == (
        7, "rq-4", "bob", "attempt", "s-2", "s-2", "bob"
    )  # fmt: skip
    assert (from_status, to_status, trigger) == (None, None, "refused")
    assert msgspec.json.decode(details or "") == {"reason": "QueueFull", "command": "join_queue"}
    assert origin == ["trace-9", "198.51.100.4", "agent/3"]
