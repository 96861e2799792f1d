"""The wire conversions of instants: exact, in both directions."""

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.schemas import rfc3339, to_ms

# Year 1 to 9999, the range both datetime and the wire format can hold.
EARLIEST_MS = -62_135_596_800_000
LATEST_MS = 253_402_300_799_999


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
    assert to_ms(datetime.fromisoformat(text), "at") == ms


def test_to_ms_refuses_a_naive_datetime() -> None:
    with pytest.raises(msgspec.ValidationError, match="UTC offset"):
        to_ms(datetime(2027, 1, 1), "startTime")
