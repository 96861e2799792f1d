"""The wire forms of instants and metadata: exact, and accepted exactly as documented."""

from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema_rs
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.storable import metadata_problem
from gateway.openapi import build_document
from gateway.schemas import rfc3339, to_ms

# Year 1 to 9999, the range both datetime and the wire format can hold.
EARLIEST_MS = -62_135_596_800_000
LATEST_MS = 253_402_300_799_999
# Years 0002 to 9998, the instants accepted on input (with any offset, still
# within years 1 to 9999 in UTC).
ACCEPTED_EARLIEST_MS = -62_104_060_800_000
ACCEPTED_LATEST_MS = 253_370_764_799_999


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (1_800_000_000_000, "2027-01-15T08:00:00Z"),
        (1_800_000_000_120, "2027-01-15T08:00:00.120Z"),
        (951_782_400_000, "2000-02-29T00:00:00Z"),
    ],
)
def test_rfc3339_formats_utc_with_milliseconds_only_when_there_are_any(ms: int, text: str) -> None:
    assert rfc3339(ms) == text


@given(st.integers(min_value=EARLIEST_MS, max_value=LATEST_MS))
def test_rfc3339_agrees_with_datetime_and_round_trips(ms: int) -> None:
    text = rfc3339(ms)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    expected = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if ms % 1000 == 0:
        expected = expected.replace(".000Z", "Z")
    assert text == expected


@given(st.integers(min_value=ACCEPTED_EARLIEST_MS, max_value=ACCEPTED_LATEST_MS))
def test_an_answered_instant_reads_back_as_itself(ms: int) -> None:
    assert to_ms(rfc3339(ms), "at") == ms


def test_to_ms_refuses_an_instant_without_an_offset() -> None:
    with pytest.raises(
        msgspec.ValidationError, match=r"with an offset, years 0002 to 9998 - at `\$\.startTime`"
    ):
        to_ms("2027-01-01T00:00:00", "startTime")


def _pieces(*choices: str) -> st.SearchStrategy[str]:
    return st.sampled_from(choices)


# Strings shaped like instants, each part valid or just past its edge.
_NEAR_INSTANTS = st.builds(
    "".join,
    st.tuples(
        _pieces("2026", "0000", "0001", "0002", "9998", "9999", "12345", "226"),
        _pieces("-"),
        _pieces("01", "02", "12", "00", "13", "1"),
        _pieces("-"),
        _pieces("01", "28", "29", "30", "31", "00", "32"),
        _pieces("T", "t", " ", "_", ""),
        _pieces("00", "23", "24", "9"),
        _pieces(":"),
        _pieces("00", "59", "60"),
        _pieces(":", ""),
        _pieces("00", "59", "60", ""),
        _pieces("", ".5", ".123456", ".1234567", ".999999999", ".1234567891", ".", ",5"),
        _pieces("Z", "z", "+00:00", "-00:00", "+23:59", "-23:59", "+24:00", "+01:60", "+0100",
                "", "+01", "Z\n", " Z"),
    ),
)  # fmt: skip


@given(st.one_of(_NEAR_INSTANTS, st.text(max_size=40)))
def test_the_document_accepts_exactly_the_instants_the_server_accepts(text: str) -> None:
    schema = build_document()["components"]["schemas"]["CreateSlotBody"]["properties"]["startTime"]
    documented = jsonschema_rs.validator_for(schema, validate_formats=True).is_valid(text)
    try:
        to_ms(text, "startTime")
    except msgspec.ValidationError:
        accepted = False
    else:
        accepted = True
    assert documented == accepted


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=3),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)


@given(st.dictionaries(st.text(max_size=3), _JSON, max_size=4))
def test_the_document_accepts_exactly_the_metadata_the_server_accepts(
    metadata: dict[str, Any],
) -> None:
    # Small, shallow values: their size and depth are within the limits the
    # document states in words (no JSON Schema keyword counts bytes or levels).
    document = build_document()
    schema = {
        **document["components"]["schemas"]["CreateSlotBody"]["properties"]["metadata"],
        "components": document["components"],
    }
    documented = jsonschema_rs.validator_for(schema).is_valid(metadata)
    assert documented == (metadata_problem(metadata) is None), metadata
