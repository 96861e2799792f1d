"""A booking's calendar file, read back with icalendar."""

import datetime as dt

import icalendar

from engine.notify.calendar import booking_calendar

SLOT = {
    "id": "slot-1",
    "resourceId": "table-4",
    "domain": "restaurant",
    "startTime": "2026-12-31T19:00:00Z",
    "endTime": "2026-12-31T21:00:00.250Z",
}
BOOKING = {
    "id": "bk-77",
    "userId": "alice",
    "slotId": "slot-1",
    "status": "CONFIRMED",
    "version": 5,
}
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


def parse(ics: bytes) -> tuple[icalendar.Calendar, icalendar.cal.Component]:
    calendar = icalendar.Calendar.from_ical(ics)
    (event,) = calendar.walk("VEVENT")
    return calendar, event


def test_one_published_event_in_utc() -> None:
    calendar, event = parse(booking_calendar(BOOKING, SLOT, entity="Table", now=NOW))
    assert str(calendar["VERSION"]) == "2.0"
    assert str(calendar["PRODID"]).startswith("-//slotengine//")
    assert str(calendar["METHOD"]) == "PUBLISH"
    assert str(event["UID"]) == "bk-77@slotengine"
    assert event.decoded("DTSTART") == dt.datetime(2026, 12, 31, 19, 0, tzinfo=dt.UTC)
    # iCalendar counts in seconds: the milliseconds are dropped.
    assert event.decoded("DTEND") == dt.datetime(2026, 12, 31, 21, 0, tzinfo=dt.UTC)
    assert event.decoded("DTSTAMP") == NOW
    assert str(event["SUMMARY"]) == "Table table-4"
    assert str(event["STATUS"]) == "CONFIRMED"
    assert event.decoded("SEQUENCE") == 5
    assert "ORGANIZER" not in event


def test_without_an_entity_the_summary_names_the_domain_and_an_organizer_is_a_mailto() -> None:
    _, event = parse(booking_calendar(BOOKING, SLOT, organizer="bookings@example.com"))
    assert str(event["SUMMARY"]) == "table-4 (restaurant)"
    assert str(event["ORGANIZER"]) == "mailto:bookings@example.com"


def test_an_offset_is_turned_into_utc_and_no_version_means_no_sequence() -> None:
    slot = {
        **SLOT,
        "startTime": "2026-12-31T20:00:00+01:00",
        "endTime": "2026-12-31T22:00:00+01:00",
    }
    booking = {key: value for key, value in BOOKING.items() if key != "version"}
    _, event = parse(booking_calendar(booking, slot))
    assert event.decoded("DTSTART") == dt.datetime(2026, 12, 31, 19, 0, tzinfo=dt.UTC)
    assert "SEQUENCE" not in event


def test_the_text_of_a_summary_is_escaped() -> None:
    slot = {**SLOT, "resourceId": "room 1, floor 2; east\nwing"}
    ics = booking_calendar(BOOKING, slot, entity="Room")
    assert b"\nwing" not in ics.replace(b"\r\n", b"")
    _, event = parse(ics)
    assert str(event["SUMMARY"]) == "Room room 1, floor 2; east\nwing"
