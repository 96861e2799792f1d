"""Notification email: the templates and their checks, each event's message, and the
Mailer against a real SMTP server (aiosmtpd), plain, with STARTTLS and AUTH, and
with implicit TLS."""

import datetime as dt
import email
import email.policy
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import icalendar
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from config.settings import load_settings
from engine.notify.mail import (
    EMAIL_EVENTS,
    PLACEHOLDERS,
    TEMPLATES_DIR_DEFAULT,
    Mailer,
    MailError,
    TemplateError,
    Templates,
    has_email,
    load_templates,
    render,
    templates_for,
)
from tests.support.certificates import self_signed

TO = "alice.patient@example.org"
FROM = "bookings@example.com"
SLOT: dict[str, Any] = {
    "id": "slot-1",
    "resourceId": "dr-smith",
    "domain": "medical",
    "startTime": "2026-12-24T09:30:00Z",
    "endTime": "2026-12-24T10:00:00Z",
    "capacity": 1,
    "metadata": {},
    "version": 4,
}
BOOKING: dict[str, Any] = {
    "id": "bk-1",
    "userId": "alice",
    "slotId": "slot-1",
    "status": "CONFIRMED",
    "reservedAt": "2026-12-07T10:00:00Z",
    "expiresAt": "2026-12-07T10:02:00Z",
    "confirmedAt": "2026-12-07T10:01:00Z",
    "completedAt": None,
    "cancelledAt": None,
    "cancelReason": None,
    "cancelledBy": None,
    "refundPercentage": None,
    "version": 3,
}
QUEUE_ENTRY: dict[str, Any] = {
    "slotId": "slot-1",
    "userId": "alice",
    "status": "NOTIFIED",
    "position": None,
    "totalInQueue": 2,
    "joinedAt": "2026-12-07T09:00:00Z",
    "notifiedAt": "2026-12-07T10:00:00Z",
    "bookingId": "bk-9",
    "offerExpiresAt": "2026-12-07T10:15:00Z",
    "slotDetails": SLOT,
}


@pytest.fixture(scope="module")
def templates() -> Templates:
    return load_templates(
        domains=["default", "medical"], entities={"medical": "Doctor", "default": "Resource"}
    )


def parts(message: EmailMessage) -> tuple[str, str]:
    """The plain text and the HTML of a message, decoded."""
    text = message.get_body(("plain",))
    markup = message.get_body(("html",))
    assert text is not None and markup is not None
    return text.get_content(), markup.get_content()


def subject(message: EmailMessage) -> str:
    """The Subject unfolded, as a mail client shows it."""
    return " ".join(str(message["Subject"]).split())


def mail(templates: Templates, event_type: str, data: dict[str, Any], **kw: Any) -> EmailMessage:
    kw.setdefault("slot", SLOT)
    kw.setdefault("domain", "default")
    message = render(templates, event_type=event_type, data=data, to=TO, mail_from=FROM, **kw)
    assert message is not None
    # What the server receives, read back: the message survives its own encoding.
    return email.message_from_bytes(bytes(message), policy=email.policy.default)


# -- which events have an email -------------------------------------------------------


def test_the_email_events() -> None:
    assert {
        "queue.offer",
        "booking.confirmed",
        "booking.cancelled",
        "booking.expired",
    } == EMAIL_EVENTS
    assert set(PLACEHOLDERS) == EMAIL_EVENTS


@pytest.mark.parametrize(
    ("event_type", "data", "expected"),
    [
        ("booking.expired", {"trigger": "hold_ttl"}, True),
        ("booking.expired", {"trigger": "claim_ttl"}, True),
        ("booking.expired", {"trigger": "released"}, False),
        ("booking.expired", {"trigger": "slot_deleted"}, False),
        ("booking.expired", {}, False),
        ("booking.reserved", {}, False),
        ("queue.joined", {}, False),
        ("slot.updated", {}, False),
    ],
)
def test_only_a_lapsed_hold_and_the_email_events_are_mailed(
    templates: Templates, event_type: str, data: dict[str, Any], expected: bool
) -> None:
    assert has_email(event_type, data) is expected
    message = render(
        templates,
        domain="default",
        event_type=event_type,
        data={**BOOKING, **data},
        slot=SLOT,
        to=TO,
        mail_from=FROM,
    )
    assert (message is not None) is expected


# -- each event's message -------------------------------------------------------------


def test_the_queue_offer_gives_the_claim_deadline(templates: Templates) -> None:
    data = {**QUEUE_ENTRY, "claimDeadline": "2026-12-07T10:15:00Z"}
    message = mail(templates, "queue.offer", data, slot=None)
    assert message["To"] == TO
    assert message["From"] == FROM
    assert (
        subject(message)
        == "A place is free: Resource dr-smith on Thursday 24 December 2026, 09:30 UTC"
    )
    assert message.get_content_type() == "multipart/alternative"
    text, markup = parts(message)
    for body in (text, markup):
        assert "Monday 7 December 2026, 10:15 UTC" in body  # the claim deadline
        assert "Thursday 24 December 2026, 09:30 UTC" in body  # the slot (from slotDetails)
        assert "bk-9" in body
    assert not list(message.iter_attachments())


def test_the_confirmation_carries_the_calendar_file(templates: Templates) -> None:
    message = mail(templates, "booking.confirmed", BOOKING)
    assert message.get_content_type() == "multipart/mixed"
    assert subject(message) == (
        "Confirmed: Resource dr-smith on Thursday 24 December 2026, 09:30 UTC"
    )
    text, markup = parts(message)
    assert "Thursday 24 December 2026, 09:30 UTC to Thursday 24 December 2026, 10:00 UTC" in text
    assert "bk-1" in markup
    (attachment,) = message.iter_attachments()
    assert attachment.get_filename() == "booking.ics"
    assert attachment.get_content_type() == "text/calendar"
    assert attachment.get_param("method") == "PUBLISH"
    calendar = icalendar.Calendar.from_ical(attachment.get_content())
    assert calendar["METHOD"] == "PUBLISH"
    (event,) = calendar.walk("VEVENT")
    assert str(event["UID"]) == "bk-1@slotengine"
    assert event.decoded("DTSTART") == dt.datetime(2026, 12, 24, 9, 30, tzinfo=dt.UTC)
    assert event.decoded("DTEND") == dt.datetime(2026, 12, 24, 10, 0, tzinfo=dt.UTC)
    assert str(event["ORGANIZER"]) == f"mailto:{FROM}"


def test_a_confirmation_without_its_slot_has_no_calendar_file(templates: Templates) -> None:
    message = mail(templates, "booking.confirmed", BOOKING, slot=None)
    assert not list(message.iter_attachments())
    text, _ = parts(message)
    assert "(not known)" in text


def test_a_cancellation_by_an_admin_gives_the_reason_and_the_refund(templates: Templates) -> None:
    data = {
        **BOOKING,
        "status": "CANCELLED",
        "cancelledAt": "2026-12-08T08:00:00Z",
        "cancelReason": "the doctor is ill",
        "cancelledBy": "admin-7",
        "refundPercentage": 100,
    }
    message = mail(templates, "booking.cancelled", data)
    assert subject(message).startswith("Cancelled: Resource dr-smith")
    text, markup = parts(message)
    for body in (text, markup):
        assert "the doctor is ill" in body
        assert "100%" in body
        assert "an administrator" in body
        assert "Thursday 24 December 2026, 09:30 UTC" in body


def test_a_cancellation_by_the_user_gives_the_domain_refund(templates: Templates) -> None:
    data = {
        **BOOKING,
        "status": "CANCELLED",
        "cancelledBy": "alice",
        "refundPercentage": 50,
        "cancelReason": None,
        "reason": None,
    }
    text, _ = parts(mail(templates, "booking.cancelled", data))
    assert "cancelled by you" in text
    assert "Refund: 50%" in text
    assert "Reason: none given" in text


def test_a_lapsed_hold(templates: Templates) -> None:
    data = {**BOOKING, "status": "EXPIRED", "confirmedAt": None, "trigger": "hold_ttl"}
    message = mail(templates, "booking.expired", data)
    assert subject(message).startswith("Your hold lapsed")
    text, _ = parts(message)
    assert "lapsed at Monday 7 December 2026, 10:02 UTC" in text


def test_times_are_written_in_the_time_zone_asked(templates: Templates) -> None:
    message = mail(templates, "booking.confirmed", BOOKING, timezone="Europe/Paris")
    assert subject(message).endswith("Thursday 24 December 2026, 10:30 CET")
    with pytest.raises(ValueError, match="unknown time zone"):
        mail(templates, "booking.confirmed", BOOKING, timezone="Mars/Olympus")


def test_html_escapes_what_users_write_and_plain_text_keeps_it(templates: Templates) -> None:
    reason = '<script>alert("x")</script> & more'
    data = {**BOOKING, "status": "CANCELLED", "cancelledBy": "alice", "reason": reason}
    slot = {**SLOT, "resourceId": "<b>room</b>"}
    text, markup = parts(mail(templates, "booking.cancelled", data, slot=slot))
    assert "<script>" not in markup
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in markup
    assert "&lt;b&gt;room&lt;/b&gt;" in markup
    assert reason in text
    assert "<b>room</b>" in text


def test_a_value_cannot_add_a_header(templates: Templates) -> None:
    slot = {**SLOT, "resourceId": "room\r\nBcc: eve@example.net"}
    message = mail(templates, "booking.confirmed", BOOKING, slot=slot)
    assert message["Bcc"] is None
    assert "\n" not in str(message["Subject"]).strip()


def test_a_domain_has_its_own_wording(templates: Templates) -> None:
    message = mail(templates, "booking.confirmed", BOOKING, domain="medical")
    assert subject(message) == "Your appointment is confirmed: Thursday 24 December 2026, 09:30 UTC"
    text, _ = parts(message)
    assert "Your appointment with Doctor dr-smith" in text
    (attachment,) = message.iter_attachments()
    calendar = icalendar.Calendar.from_ical(attachment.get_content())
    assert str(calendar.walk("VEVENT")[0]["SUMMARY"]) == "Doctor dr-smith"
    # Files a domain does not override are the defaults.
    lapsed = mail(
        templates, "booking.expired", {**BOOKING, "trigger": "hold_ttl"}, domain="medical"
    )
    assert subject(lapsed).startswith("Your hold lapsed: Doctor dr-smith")
    # A domain the templates were not loaded for gets the defaults.
    other = mail(templates, "booking.confirmed", BOOKING, domain="elsewhere")
    assert subject(other).startswith("Confirmed: Resource dr-smith")


def test_the_deployment_templates_load_for_every_shipped_domain() -> None:
    loaded = templates_for(load_settings({}))
    assert {"default", "medical", "restaurant", "seats", "technicians"} <= set(loaded.by_domain)
    assert loaded.entities["technicians"] == "Technician"


# -- template errors --------------------------------------------------------------------


def overriding(tmp_path: Path, domain: str, name: str, text: str) -> Path:
    folder = tmp_path / domain
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("booking.confirmed.txt", "Hello $name", "unknown placeholder $name"),
        ("queue.offer.html", "<p>${claim_deadline} $reason</p>", "unknown placeholder $reason"),
        ("booking.cancelled.txt", "costs $5", "a '$' that starts no placeholder"),
        ("booking.confirmed.subject", "two\nlines", "a subject is one line"),
        ("booking.confirmed.subject", "   ", "a subject is one line"),
        ("booking.confirmd.txt", "Hello", "not a template name"),
        ("booking.confirmed.text", "Hello", "not a template name"),
        ("booking.reserved.txt", "Hello", "not a template name"),
    ],
)
def test_a_bad_template_is_refused_naming_the_file(
    tmp_path: Path, name: str, text: str, problem: str
) -> None:
    path = overriding(tmp_path, "medical", name, text)
    with pytest.raises(TemplateError) as caught:
        load_templates(tmp_path, ["default", "medical"])
    message = str(caught.value)
    assert message.startswith(f"template {path}: ")
    assert problem in message


def test_hidden_files_are_left_out(tmp_path: Path) -> None:
    overriding(tmp_path, "medical", ".gitkeep", "")
    overriding(tmp_path, "medical", ".booking.confirmed.txt.swp", "$nonsense")
    (tmp_path / ".git").mkdir()
    loaded = load_templates(tmp_path, ["default", "medical"])
    assert "Hello" in loaded.of("medical", "booking.confirmed").text.template


def test_a_file_beside_the_domain_directories_is_refused(tmp_path: Path) -> None:
    stray = tmp_path / "booking.confirmed.txt"
    stray.write_text("Hello", encoding="utf-8")
    with pytest.raises(TemplateError, match=f"^template {stray}: expected a directory per domain"):
        load_templates(tmp_path, ["default"])


def test_a_template_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = overriding(tmp_path, "default", "queue.offer.txt", "")
    path.write_bytes(b"caf\xe9 $start")
    with pytest.raises(TemplateError, match=f"^template {path}: not UTF-8 text"):
        load_templates(tmp_path, ["default"])


def test_templates_of_an_unknown_domain_are_refused(tmp_path: Path) -> None:
    overriding(tmp_path, "medicl", "booking.confirmed.txt", "Hello")
    with pytest.raises(TemplateError, match=r"template directory .*medicl: no domain 'medicl'"):
        load_templates(tmp_path, ["default", "medical"])


def test_the_shipped_directory_skips_the_shipped_domains_a_deployment_lacks() -> None:
    loaded = load_templates(domains=["default"])
    assert set(loaded.by_domain) == {"default"}
    message = render(
        loaded, domain="medical", event_type="booking.confirmed", data=BOOKING, slot=SLOT,
        to=TO, mail_from=FROM,
    )  # fmt: skip
    assert message is not None
    assert subject(message).startswith("Confirmed: Resource dr-smith")


async def test_a_message_without_a_recipient_is_a_mail_error(
    plain_server: Controller, templates: Templates
) -> None:
    message = a_message(templates)
    del message["To"]
    mailer = Mailer(f"smtp://127.0.0.1:{plain_server.port}", FROM)
    try:
        with pytest.raises(MailError, match="the message cannot be sent"):
            await mailer.send(message)
    finally:
        await mailer.close()
    assert not inbox(plain_server)


def test_dollar_signs_and_overrides_of_the_defaults(tmp_path: Path, templates: Templates) -> None:
    overriding(tmp_path, "default", "booking.confirmed.subject", "$$0 due: $resource")
    loaded = load_templates(tmp_path, ["default", "medical"])
    message = render(
        loaded, domain="default", event_type="booking.confirmed", data=BOOKING, slot=SLOT,
        to=TO, mail_from=FROM,
    )  # fmt: skip
    assert message is not None
    assert subject(message) == "$0 due: dr-smith"
    # A directory of a deployment's own: its domains follow its default/, over the
    # shipped defaults (not the shipped domains' own wording).
    medical = loaded.of("medical", "booking.confirmed")
    assert medical.subject.template == "$$0 due: $resource"
    assert loaded.of("medical", "queue.offer").text.template.startswith("Hello,\n\nA place")


def test_every_shipped_template_uses_known_placeholders_only() -> None:
    # The shipped directory loads as it is, with every domain directory it has.
    domains = [path.name for path in TEMPLATES_DIR_DEFAULT.iterdir()]
    assert "medical" in domains
    load_templates(TEMPLATES_DIR_DEFAULT, domains)


def test_a_broken_shipped_copy_is_named(tmp_path: Path) -> None:
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR_DEFAULT, copy)
    broken = copy / "medical" / "queue.offer.txt"
    broken.write_text("Hurry until $deadline", encoding="utf-8")
    with pytest.raises(TemplateError, match=f"^template {broken}: unknown placeholder"):
        load_templates(copy, ["default", "medical"])


# -- the Mailer against a real SMTP server -------------------------------------------------


class Inbox:
    """An aiosmtpd handler that keeps what it receives; refuses one address."""

    REFUSED = "nobody@example.org"

    def __init__(self) -> None:
        self.received: list[Envelope] = []
        # The server side of the last message's connection.
        self.last_server: SmtpServer | None = None

    async def handle_RCPT(
        self, server: SmtpServer, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address == self.REFUSED:
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        self.received.append(envelope)
        self.last_server = server
        return "250 Message accepted"

    def hang_up(self, controller: Controller) -> None:
        """Close the last connection from the server's side, and wait until it is closed."""
        server = self.last_server
        assert server is not None and server.transport is not None
        closed = threading.Event()

        def close() -> None:
            assert server.transport is not None
            server.transport.close()
            closed.set()

        controller.loop.call_soon_threadsafe(close)
        assert closed.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: its PEM and its key's."""
    return self_signed(tmp_path_factory.mktemp("tls"), (), ("127.0.0.1",))


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


def authenticate(
    server: SmtpServer, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = (
        isinstance(data, LoginPassword)
        and data.login == b"app@example.com"
        and data.password == b"s3cr:t@pw"
    )
    # handled=False: the server answers (235 or 535) itself.
    return AuthResult(success=ok, handled=False)


def running(controller: Controller) -> Iterator[Controller]:
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture
def plain_server() -> Iterator[Controller]:
    yield from running(Controller(Inbox(), hostname="127.0.0.1", port=free_port()))


@pytest.fixture
def starttls_server(certificate: tuple[Path, Path]) -> Iterator[Controller]:
    yield from running(
        Controller(
            Inbox(),
            hostname="127.0.0.1",
            port=free_port(),
            tls_context=server_context(certificate),
            require_starttls=True,
            authenticator=authenticate,
            auth_required=True,
        )
    )


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[Controller]:
    yield from running(
        Controller(
            Inbox(),
            hostname="127.0.0.1",
            port=free_port(),
            ssl_context=server_context(certificate),
            server_hostname="127.0.0.1",
        )
    )


def inbox(controller: Controller) -> list[Envelope]:
    handler = controller.handler
    assert isinstance(handler, Inbox)
    return handler.received


def a_message(templates: Templates, to: str = TO) -> EmailMessage:
    message = render(
        templates, domain="medical", event_type="booking.confirmed", data=BOOKING, slot=SLOT,
        to=to, mail_from=FROM,
    )  # fmt: skip
    assert message is not None
    return message


async def test_sends_over_plain_smtp_and_reuses_the_connection(
    plain_server: Controller, templates: Templates
) -> None:
    mailer = Mailer(f"smtp://127.0.0.1:{plain_server.port}", FROM)
    try:
        await mailer.send(a_message(templates))
        first = mailer._client
        await mailer.send(a_message(templates, to="bob@example.org"))
        assert mailer._client is first  # one connection for both
    finally:
        await mailer.close()
    received = inbox(plain_server)
    assert [envelope.rcpt_tos for envelope in received] == [[TO], ["bob@example.org"]]
    assert received[0].mail_from == FROM
    content = received[0].content
    assert isinstance(content, bytes)
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    assert parsed["Subject"].startswith("Your appointment is confirmed")
    (attachment,) = parsed.iter_attachments()
    assert b"UID:bk-1@slotengine" in attachment.get_payload(decode=True)


async def test_reconnects_after_the_server_closed_the_connection(
    plain_server: Controller, templates: Templates
) -> None:
    mailer = Mailer(f"smtp://127.0.0.1:{plain_server.port}", FROM)
    try:
        await mailer.send(a_message(templates))
        first = mailer._client
        # The server hangs up between two sends (an idle timeout, a restart); the
        # mailer, which has not run since, still takes the connection for open.
        handler = plain_server.handler
        assert isinstance(handler, Inbox)
        handler.hang_up(plain_server)
        assert first is not None and first.is_connected
        await mailer.send(a_message(templates, to="carol@example.org"))
        assert mailer._client is not first
    finally:
        await mailer.close()
    assert [envelope.rcpt_tos for envelope in inbox(plain_server)] == [
        [TO],
        ["carol@example.org"],
    ]


async def test_sends_with_starttls_and_auth(
    starttls_server: Controller, templates: Templates, certificate: tuple[Path, Path]
) -> None:
    url = f"smtp://app%40example.com:s3cr%3At%40pw@127.0.0.1:{starttls_server.port}?starttls=true"
    mailer = Mailer(url, FROM, tls_context=client_context(certificate))
    assert "s3cr" not in repr(mailer)
    try:
        await mailer.send(a_message(templates))
    finally:
        await mailer.close()
    assert [envelope.rcpt_tos for envelope in inbox(starttls_server)] == [[TO]]


async def test_a_wrong_password_is_a_mail_error_without_the_password(
    starttls_server: Controller, templates: Templates, certificate: tuple[Path, Path]
) -> None:
    url = f"smtp://app%40example.com:hunter9@127.0.0.1:{starttls_server.port}?starttls=true"
    mailer = Mailer(url, FROM, tls_context=client_context(certificate))
    with pytest.raises(MailError) as caught:
        await mailer.send(a_message(templates))
    message = str(caught.value)
    assert "refused the login (535)" in message
    assert "hunter9" not in message
    assert TO not in message
    assert not inbox(starttls_server)


async def test_plain_smtp_to_a_server_requiring_starttls_fails(
    starttls_server: Controller, templates: Templates
) -> None:
    mailer = Mailer(f"smtp://127.0.0.1:{starttls_server.port}", FROM)
    with pytest.raises(MailError) as caught:
        await mailer.send(a_message(templates))
    assert TO not in str(caught.value)
    assert not inbox(starttls_server)


async def test_an_untrusted_certificate_is_refused(
    starttls_server: Controller, templates: Templates
) -> None:
    url = f"smtp://app%40example.com:s3cr%3At%40pw@127.0.0.1:{starttls_server.port}?starttls=true"
    mailer = Mailer(url, FROM)  # the system's authorities do not know the test's
    with pytest.raises(MailError):
        await mailer.send(a_message(templates))
    assert not inbox(starttls_server)


async def test_sends_over_implicit_tls(
    tls_server: Controller, templates: Templates, certificate: tuple[Path, Path]
) -> None:
    mailer = Mailer(
        f"smtps://127.0.0.1:{tls_server.port}", FROM, tls_context=client_context(certificate)
    )
    try:
        await mailer.send(a_message(templates))
    finally:
        await mailer.close()
    assert [envelope.rcpt_tos for envelope in inbox(tls_server)] == [[TO]]


async def test_a_refused_recipient_is_a_mail_error_without_the_address(
    plain_server: Controller, templates: Templates
) -> None:
    mailer = Mailer(f"smtp://127.0.0.1:{plain_server.port}", FROM)
    try:
        with pytest.raises(MailError) as caught:
            await mailer.send(a_message(templates, to=Inbox.REFUSED))
        assert "refused the recipient (550)" in str(caught.value)
        assert Inbox.REFUSED not in str(caught.value)
        # The next message goes through.
        await mailer.send(a_message(templates))
    finally:
        await mailer.close()
    assert [envelope.rcpt_tos for envelope in inbox(plain_server)] == [[TO]]


async def test_a_server_that_is_down_is_a_mail_error_without_the_address(
    templates: Templates,
) -> None:
    port = free_port()  # nothing listens there
    mailer = Mailer(f"smtp://127.0.0.1:{port}", FROM, timeout_s=5)
    with pytest.raises(MailError) as caught:
        await mailer.send(a_message(templates))
    message = str(caught.value)
    assert message.startswith(f"cannot reach the SMTP server at 127.0.0.1:{port}")
    assert TO not in message
    assert "\n" not in message


def test_a_bad_url_is_a_mail_error_without_the_password() -> None:
    with pytest.raises(MailError) as caught:
        Mailer("smtp://app:hunter8@mail.example.com?tls=yes", FROM)
    assert "unknown parameter 'tls'" in str(caught.value)
    assert "hunter8" not in str(caught.value)
