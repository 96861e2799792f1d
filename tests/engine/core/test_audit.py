"""What the core hands storage for the audit beside its events (``drain_audit``):
the origins of the changes that carried one, and the reservation attempts it
refused, once each; never inside an event."""

from engine.core import protocol as p
from tests.engine.core.conftest import Harness

ORIGIN = p.Origin("trace-1", "203.0.113.7", "agent/1")


def test_a_change_hands_its_origin_over_beside_its_events_not_in_them(h: Harness) -> None:
    slot_id = h.slot(capacity=2)
    h.core.drain_events()
    h.core.drain_audit()
    held = h.core.execute(
        p.Reserve(request_id="rq-1", slot_id=slot_id, user_id="ann", origin=ORIGIN),
        h.clock.now_ms(),
    )
    assert held.status == 201
    events = h.core.drain_events()
    assert {e.request_id for e in events} >= {"rq-1"}
    assert all("origin" not in type(e).__struct_fields__ for e in events)
    assert h.core.drain_audit() == ({"rq-1": ORIGIN}, None)
    assert h.core.drain_audit() == (None, None)


def test_refused_attempts_are_handed_over_once_with_their_code(h: Harness) -> None:
    slot_id = h.slot(domain="noqueue")
    h.reserve(slot_id, "ann")
    h.core.drain_audit()
    refused = p.Reserve(request_id="rq-2", slot_id=slot_id, user_id="bob", origin=ORIGIN)
    assert h.core.execute(refused, h.clock.now_ms()).code == "SlotFull"
    # The same request again (a resent batch), and a replay of its key: no new attempt.
    h.core.execute(refused, h.clock.now_ms())
    keyed = p.Reserve(request_id="rq-3", slot_id=slot_id, user_id="bob", idempotency_key="k")
    h.core.execute(keyed, h.clock.now_ms())
    h.core.execute(
        p.Reserve(request_id="rq-4", slot_id=slot_id, user_id="bob", idempotency_key="k"),
        h.clock.now_ms(),
    )
    origins, attempts = h.core.drain_audit()
    assert origins is None
    assert attempts is not None
    assert [(a.command.request_id, a.code) for a in attempts] == [
        ("rq-2", "SlotFull"),
        ("rq-3", "SlotFull"),
    ]
    assert attempts[0].command.origin == ORIGIN
    # A refusal of another command (a confirm of nothing) is not an attempt.
    h.core.execute(p.Confirm(request_id="rq-5", booking_id="nope", user_id="bob"), h.clock.now_ms())
    assert h.core.drain_audit() == (None, None)
