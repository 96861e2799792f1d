"""What the database can store: the rules, and a shard refusing alone what breaks them."""

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core import protocol as p
from engine.core.limits import (
    CANCEL_REASON_CHARS_MAX,
    COMMAND_TEXT_CHARS_MAX,
    JSON_DEPTH_MAX,
    SLOT_METADATA_BYTES_MAX,
)
from engine.core.storable import (
    NUL_MESSAGE,
    NUMBER_MESSAGE,
    UNICODE_MESSAGE,
    command_problems,
    json_problem,
    metadata_problem,
    text_problem,
)
from tests.engine.core.conftest import Harness


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_text_without_nul_and_in_valid_unicode_is_storable() -> None:
    assert text_problem("") is None
    assert text_problem("Zoë 🦷 room 2") is None
    assert text_problem("a\x00b") == NUL_MESSAGE
    assert text_problem("lone \ud800 surrogate") == UNICODE_MESSAGE


def test_json_problems_name_the_member_at_fault() -> None:
    assert json_problem({"a": [1, 2.5, True, None, "x"]}, "metadata") is None
    assert json_problem({"a": [1, {"b": "x\x00"}]}, "metadata") == ("metadata.a[1].b", NUL_MESSAGE)
    assert json_problem({"a\x00": 1}, "metadata") == ("metadata", f"keys {NUL_MESSAGE}")
    assert json_problem({"big": 2**63 - 1, "small": -(2**63) + 1}, "metadata") is None
    assert json_problem({"big": 2**63}, "metadata") is not None
    assert json_problem({"small": -(2**63)}, "metadata") is not None
    # The same numbers however written: JSON does not tell 1e30 from 10**30.
    assert json_problem({"big": 1e30}, "metadata") is not None
    assert json_problem({"big": float(2**63)}, "metadata") is not None
    assert json_problem({"small": float(-(2**63))}, "metadata") is not None
    assert json_problem({"half": 0.5}, "metadata") is None
    assert json_problem({"inf": float("inf")}, "metadata") is not None
    assert json_problem({"nan": float("nan")}, "metadata") is not None
    assert json_problem({"raw": b"bytes"}, "metadata") is not None


def test_floats_are_held_to_the_range_of_the_integers_jsonb_turns_them_into() -> None:
    # jsonb writes 1e20 back as the integer 100000000000000000000: past 64 bits, a
    # shard loading it could not carry it across its wire.
    for storable in (0.1, -0.0, 5e-324, 1e16, 9.223372036854775e18, -9.223372036854775e18):
        assert json_problem({"f": storable}, "metadata") is None, storable
    for unstorable in (1e20, -1e20, 2.0**63, -(2.0**63), 1e300):
        assert json_problem({"f": unstorable}, "metadata") == (
            "metadata.f",
            NUMBER_MESSAGE,
        ), unstorable


def test_depth_is_bounded_at_the_limit() -> None:
    assert json_problem(_nested(JSON_DEPTH_MAX), "metadata") is None
    found = json_problem(_nested(JSON_DEPTH_MAX + 1), "metadata")
    assert found is not None
    assert "nested deeper" in found[1]
    # Far past the limit the walk stops at the limit, never at the interpreter's stack.
    assert json_problem(_nested(50_000), "metadata") is not None


def test_metadata_is_limited_in_encoded_bytes() -> None:
    overhead = len(msgspec.json.encode({"k": ""}))
    assert metadata_problem({"k": "x" * (SLOT_METADATA_BYTES_MAX - overhead)}) is None
    found = metadata_problem({"k": "x" * (SLOT_METADATA_BYTES_MAX - overhead + 1)})
    assert found is not None
    assert found[0] == "metadata"


def test_command_problems_name_every_unstorable_field_in_camel_case() -> None:
    clean = p.Reserve(request_id="r1", slot_id="0000abcd-sx", user_id="ann", idempotency_key="k")
    assert command_problems(clean) is None
    dirty = p.Reserve(
        request_id="r1", slot_id="0000abcd-sx", user_id="a\x00nn", idempotency_key="k\ud800"
    )
    assert command_problems(dirty) == {"userId": NUL_MESSAGE, "idempotencyKey": UNICODE_MESSAGE}


def test_command_text_is_bounded_by_what_an_index_row_holds() -> None:
    longest = "x" * COMMAND_TEXT_CHARS_MAX
    fits = p.Reserve(request_id="r1", slot_id="0000abcd-sx", user_id=longest, idempotency_key="k")
    assert command_problems(fits) is None
    too_long = p.Reserve(
        request_id="r1", slot_id="0000abcd-sx", user_id="ann", idempotency_key=longest + "x"
    )
    assert command_problems(too_long) == {
        "idempotencyKey": f"must be at most {COMMAND_TEXT_CHARS_MAX} characters"
    }
    # A reason is not indexed: it may be as long as the API lets it be, and no longer.
    reason = "r" * CANCEL_REASON_CHARS_MAX
    cancel = p.Cancel(request_id="r2", booking_id="0000abcd-bx", user_id="ann", reason=reason)
    assert command_problems(cancel) is None
    longer = p.Cancel(request_id="r2", booking_id="0000abcd-bx", user_id="ann", reason=reason + "r")
    assert command_problems(longer) == {
        "reason": f"must be at most {CANCEL_REASON_CHARS_MAX} characters"
    }


@given(st.text())
def test_a_text_is_storable_exactly_when_postgresql_could_encode_it(value: str) -> None:
    storable = "\x00" not in value
    try:
        value.encode()
    except UnicodeEncodeError:
        storable = False
    assert (text_problem(value) is None) == storable


def test_the_shard_refuses_an_unstorable_cancel_alone_and_unchanged(h: Harness) -> None:
    slot_id = h.slot(capacity=2)
    booking = h.reserve(slot_id, "ann").booking
    h.confirm(booking.id, "ann")
    h.core.drain_events()
    h.core.drain_remembered()

    refused = h.cancel(booking.id, "ann", reason="a\x00b", request_id="bad-cancel")

    assert (refused.status, refused.code) == (422, "ValidationError")
    assert refused.details == {"reason": NUL_MESSAGE}
    assert h.booking(booking.id).booking.status == "CONFIRMED"
    # Nothing for the writer: no event, and no outcome under its request id.
    assert h.core.drain_events() == []
    assert h.core.drain_remembered() == ([], [])
    # The same request id, with a storable reason, is then decided afresh.
    cancelled = h.cancel(booking.id, "ann", reason="a b", request_id="bad-cancel")
    assert cancelled.booking.status == "CANCELLED"


@pytest.mark.parametrize(
    "fields",
    [
        {"resource_id": "dr\x00who"},
        {"metadata": {"room": "\x00"}},
        {"metadata": {"n": 2**64}},
        {"metadata": {"k": "x" * SLOT_METADATA_BYTES_MAX}},
        {"metadata": _nested(JSON_DEPTH_MAX + 1)},
        {"actor": "admin:\ud800"},
        {"resource_id": "r" * (COMMAND_TEXT_CHARS_MAX + 1)},
    ],
)
def test_the_shard_refuses_a_slot_it_could_not_store(h: Harness, fields: dict[str, Any]) -> None:
    command = {
        "request_id": "create",
        "slot_id": "0000abcd-sx",
        "resource_id": "dr-who",
        "domain": "default",
        "start_ms": h.clock.now_ms() + 3_600_000,
        "end_ms": h.clock.now_ms() + 7_200_000,
        "capacity": 1,
        **fields,
    }
    refused = h.run(p.CreateSlot, **command)
    assert (refused.status, refused.code) == (422, "ValidationError")
    assert h.core.drain_events() == []
    assert list(h.core.slots()) == []
