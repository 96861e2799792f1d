"""A confirmed booking as an iCalendar file (RFC 5545), for email and the calendar route.

It builds bytes from a Booking and its Slot as the API renders them (camelCase
JSON, ``gateway.schemas``): one VEVENT in UTC whose UID stays the booking's,
so that a calendar that imported it once updates the same event. It must
never do I/O nor decide whether a booking deserves a file: callers send one
for a CONFIRMED booking only.
"""

from datetime import UTC, datetime
from typing import Any, Final

from icalendar import Calendar, Event, vCalAddress

PRODID: Final = "-//slotengine//bookings//EN"
# The UID's domain part: the booking id is unique within a deployment.
UID_DOMAIN: Final = "slotengine"
# A published calendar: an event for the attendee's calendar, not an invitation
# to answer (RFC 5546).
METHOD: Final = "PUBLISH"
CONTENT_TYPE: Final = "text/calendar; charset=utf-8; method=PUBLISH"


def event_uid(booking_id: str) -> str:
    return f"{booking_id}@{UID_DOMAIN}"


def parse_instant(text: str) -> datetime:
    """An instant as the API answers it (``2026-01-02T09:30:00Z``), aware, in UTC."""
    return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")).astimezone(
        UTC
    )


def event_summary(slot: dict[str, Any], entity: str | None = None) -> str:
    """What the event is called: the domain's entity and the resource ("Doctor dr-smith")."""
    resource = str(slot.get("resourceId", ""))
    if entity:
        return f"{entity} {resource}"
    return f"{resource} ({slot.get('domain', 'default')})"


def booking_calendar(
    booking: dict[str, Any],
    slot: dict[str, Any],
    *,
    organizer: str | None = None,
    entity: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """The booking's calendar file: VCALENDAR (PUBLISH) with one VEVENT.

    ``organizer``: an address for ORGANIZER (the sender of the email);
    ``entity``: the domain's ``entityName`` for SUMMARY; ``now``: DTSTAMP
    (default: the clock, since a file is stamped when it is made).
    """
    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add("method", METHOD)
    event = Event()
    event.add("uid", event_uid(str(booking["id"])))
    event.add("dtstamp", (now or datetime.now(UTC)).astimezone(UTC))
    event.add("dtstart", parse_instant(str(slot["startTime"])))
    event.add("dtend", parse_instant(str(slot["endTime"])))
    event.add("summary", event_summary(slot, entity))
    event.add("status", "CONFIRMED")
    event.add("transp", "OPAQUE")
    version = booking.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        event.add("sequence", version)
    if organizer:
        event.add("organizer", vCalAddress(f"mailto:{organizer}"))
    calendar.add_component(event)
    ical: bytes = calendar.to_ical()
    return ical
