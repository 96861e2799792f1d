"""What an Idempotency-Key stands for: the command but its request id and key."""

from engine.core import protocol as p
from engine.core.fingerprint import fingerprint


def test_the_request_id_and_the_key_are_not_part_of_the_request() -> None:
    first = p.Reserve(request_id="rq-1", slot_id="s-1", user_id="ann", idempotency_key="k-1")
    again = p.Reserve(request_id="rq-2", slot_id="s-1", user_id="ann", idempotency_key="k-2")
    unkeyed = p.Reserve(request_id="rq-3", slot_id="s-1", user_id="ann")
    assert fingerprint(first) == fingerprint(again) == fingerprint(unkeyed)


def test_any_other_field_or_another_command_is_another_request() -> None:
    reserve = p.Reserve(request_id="rq-1", slot_id="s-1", user_id="ann", idempotency_key="k")
    other_slot = p.Reserve(request_id="rq-1", slot_id="s-2", user_id="ann", idempotency_key="k")
    other_user = p.Reserve(request_id="rq-1", slot_id="s-1", user_id="bob", idempotency_key="k")
    join = p.JoinQueue(request_id="rq-1", slot_id="s-1", user_id="ann", idempotency_key="k")
    prints = {fingerprint(c) for c in (reserve, other_slot, other_user, join)}
    assert len(prints) == 4


def test_the_origin_is_not_part_of_the_request_nor_of_its_encoding() -> None:
    """A retry from another address or browser is the same request, and a command
    without an origin encodes as before the field existed (fingerprints stored then
    still match)."""
    bare = p.Reserve(request_id="rq-1", slot_id="s-1", user_id="ann", idempotency_key="k")
    here = p.Reserve(
        request_id="rq-1",
        slot_id="s-1",
        user_id="ann",
        idempotency_key="k",
        origin=p.Origin("trace-1", "203.0.113.7", "agent/1"),
    )
    elsewhere = p.Reserve(
        request_id="rq-2",
        slot_id="s-1",
        user_id="ann",
        idempotency_key="k",
        origin=p.Origin("trace-2", "198.51.100.9", None),
    )
    assert fingerprint(bare) == fingerprint(here) == fingerprint(elsewhere)
    assert b"origin" not in p.BatchCodec().encode_batch([bare])
    assert b"origin" in p.BatchCodec().encode_batch([here])
