"""Notification email: the templates, rendering an event into a message, and sending it.

Four events have an email (``EMAIL_EVENTS``): the queue's offer of a place
(with its claim deadline), a confirmation (with the booking's calendar file,
``booking.ics``), a cancellation by the user or an admin (with the reason and
the refund), and a lapsed hold: ``booking.expired`` whose ``trigger`` is
``hold_ttl`` or ``claim_ttl``. A hold given up (``released``), or expired by a
slot's deletion, gets none.

Templates are files, per event a subject line, a plain-text body and an HTML
body: ``<event>.subject``, ``<event>.txt`` and ``<event>.html`` (``queue.offer.txt``).
The shipped defaults are in ``config/domains/templates/default/``; a domain's
own wording, file by file, in ``templates/<domain>/`` beside the domain files;
a ``templates/default/`` there replaces shipped defaults file by file. They are
``string.Template`` text: ``$name`` placeholders, nothing is evaluated, and
each placeholder must be one of ``PLACEHOLDERS`` of its event, else the file
is refused at load (``TemplateError`` naming it). Values are HTML-escaped in
the HTML body, taken as they are in the plain text.

``Mailer`` sends over SMTP (``SLOTENGINE_SMTP_URL``), one connection reused
under a lock and opened again after a failure. Its errors (``MailError``) are
fit for a delivery's ``last_error``: they never carry a recipient's address
nor the password. This module never reads the outbox nor decides whom to
notify: the delivery workers do, and call ``render`` and ``Mailer.send``.
"""

import asyncio
import email
import email.policy
import html
import io
import re
import ssl
import string
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.header import Header
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiosmtplib

from config.domains import DEFAULT_DOMAIN, load_domain_configs
from config.settings import DOMAINS_DIR_DEFAULT, Settings, SmtpTarget, parse_smtp_url
from engine.notify.calendar import CONTENT_TYPE, booking_calendar, parse_instant

# The events that have an email (see the module doc for booking.expired).
EMAIL_EVENTS: Final = frozenset(
    {"queue.offer", "booking.confirmed", "booking.cancelled", "booking.expired"}
)
# The triggers of booking.expired that mean a lapsed hold: the only ones mailed.
LAPSED_TRIGGERS: Final = frozenset({"hold_ttl", "claim_ttl"})

# The templates of a deployment: this directory under SLOTENGINE_DOMAINS_DIR.
TEMPLATES_SUBDIR: Final = "templates"
# The shipped templates, beside the shipped domain files.
TEMPLATES_DIR_DEFAULT: Final = DOMAINS_DIR_DEFAULT / TEMPLATES_SUBDIR
# The directory of the defaults, among the domains' own.
DEFAULTS: Final = "default"
# The three files of an event, by the suffix after the event's name.
PARTS: Final = ("subject", "txt", "html")
# A template file is small: a few kilobytes of wording at most.
TEMPLATE_BYTES_MAX: Final = 64 * 1024
# The attachment of a confirmation.
CALENDAR_FILENAME: Final = "booking.ics"
# The compat32 policy, with SMTP's line ends.
_SMTP_LINES: Final = email.policy.compat32.clone(linesep="\r\n")

# Every event's values: when, what and who, formatted for people.
_COMMON: Final = frozenset(
    {
        "booking_id",
        "user_id",
        "slot_id",
        "domain",
        "entity",
        "resource",
        "start",
        "end",
        "timezone",
    }
)
# The placeholders each event's templates may use.
PLACEHOLDERS: Final[Mapping[str, frozenset[str]]] = {
    "queue.offer": _COMMON | {"claim_deadline"},
    "booking.confirmed": _COMMON | {"confirmed_at"},
    "booking.cancelled": _COMMON | {"reason", "refund_percentage", "cancelled_by", "cancelled_at"},
    "booking.expired": _COMMON | {"expired_at"},
}
# Shown when a value is not known (an event without its slot).
UNKNOWN: Final = "(not known)"
# What cancelled_by says: the user themself, or someone else (an admin).
BY_USER: Final = "you"
BY_ADMIN: Final = "an administrator"
NO_REASON: Final = "none given"

# A MailError's text is stored as a delivery's last_error: kept short.
MAIL_ERROR_CHARS_MAX: Final = 300
# Anything shaped like an address in a server's reply is masked.
_ADDRESS: Final = re.compile(r"[^\s<>()\[\]\"',;:@]+@[^\s<>()\[\]\"',;:@]+")


class TemplateError(ValueError):
    """A template file is unusable; the message names the file."""


class MailError(Exception):
    """Sending failed. The message is fit for a log or a delivery's last_error:
    it never contains a recipient's address or the SMTP password."""


@dataclass(frozen=True)
class _EventTemplates:
    subject: string.Template
    text: string.Template
    html: string.Template


@dataclass(frozen=True)
class Templates:
    """Every domain's templates of every email event, checked; built by ``load_templates``."""

    by_domain: Mapping[str, Mapping[str, _EventTemplates]]
    # A domain's entityName ("Doctor"), for the wording and the calendar.
    entities: Mapping[str, str]

    def of(self, domain: str, event_type: str) -> _EventTemplates:
        """A domain's templates of an event (the defaults' for an unknown domain)."""
        templates = self.by_domain.get(domain) or self.by_domain[DEFAULTS]
        return templates[event_type]


def load_templates(
    directory: Path = TEMPLATES_DIR_DEFAULT,
    domains: Iterable[str] = (DEFAULT_DOMAIN,),
    *,
    entities: Mapping[str, str] | None = None,
) -> Templates:
    """Every template for ``domains``, from ``directory`` over the shipped defaults.

    ``directory/<domain>/<event>.<part>`` overrides, file by file, the
    defaults (``directory/default/``, then the shipped ones). A directory named
    for no domain in ``domains`` (a typo; the shipped directory's own are
    skipped instead), a file that is no event's part, a file that cannot be
    read, and a placeholder the event does not have are errors
    (``TemplateError`` naming the file). A missing ``directory`` means the
    shipped templates only.
    """
    names = set(domains)
    shipped = _read_directory(TEMPLATES_DIR_DEFAULT / DEFAULTS)
    missing = [
        f"{event}.{part}" for event in sorted(EMAIL_EVENTS) for part in PARTS
        if (event, part) not in shipped
    ]  # fmt: skip
    if missing:
        raise TemplateError(
            f"templates {TEMPLATES_DIR_DEFAULT / DEFAULTS}: missing {', '.join(missing)}"
        )
    overrides: dict[str, dict[tuple[str, str], string.Template]] = {}
    shipped_directory = directory.resolve() == TEMPLATES_DIR_DEFAULT.resolve()
    if directory.is_dir():
        for child in _listing(directory):
            if not child.is_dir():
                raise TemplateError(
                    f"template {child}: expected a directory per domain (or {DEFAULTS!r})"
                )
            if child.name != DEFAULTS and child.name not in names:
                if shipped_directory:
                    continue  # the wording of a shipped domain this deployment lacks
                raise TemplateError(f"template directory {child}: no domain {child.name!r}")
            overrides[child.name] = _read_directory(child)
    defaults = {**shipped, **overrides.get(DEFAULTS, {})}
    by_domain: dict[str, dict[str, _EventTemplates]] = {}
    for domain in {DEFAULTS, *names}:
        own = {**defaults, **overrides.get(domain, {})}
        by_domain[domain] = {
            event: _EventTemplates(
                subject=own[(event, "subject")], text=own[(event, "txt")], html=own[(event, "html")]
            )
            for event in EMAIL_EVENTS
        }
    return Templates(by_domain=by_domain, entities=dict(entities or {}))


def templates_for(settings: Settings) -> Templates:
    """The deployment's templates: ``<SLOTENGINE_DOMAINS_DIR>/templates`` over the
    shipped defaults, for every domain file, with each domain's entityName."""
    configs = load_domain_configs(settings)
    return load_templates(
        settings.domains_dir / TEMPLATES_SUBDIR,
        configs,
        entities={name: config.entity_name for name, config in configs.items()},
    )


def _read_directory(directory: Path) -> dict[tuple[str, str], string.Template]:
    found: dict[tuple[str, str], string.Template] = {}
    for path in _listing(directory):
        event, _, part = path.name.rpartition(".")
        if event not in EMAIL_EVENTS or part not in PARTS:
            expected = ", ".join(f"<event>.{p}" for p in PARTS)
            raise TemplateError(
                f"template {path}: not a template name ({expected};"
                f" events: {', '.join(sorted(EMAIL_EVENTS))})"
            )
        found[(event, part)] = _read_template(path, event, part)
    return found


def _listing(directory: Path) -> list[Path]:
    """A directory's entries in order, hidden ones (``.gitkeep``, an editor's) left out."""
    try:
        return sorted(path for path in directory.iterdir() if not path.name.startswith("."))
    except OSError as error:
        raise TemplateError(
            f"template directory {directory}: cannot read it ({error.strerror})"
        ) from None


def _read_template(path: Path, event: str, part: str) -> string.Template:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise TemplateError(f"template {path}: cannot read it ({error.strerror})") from None
    if len(raw) > TEMPLATE_BYTES_MAX:
        raise TemplateError(f"template {path}: larger than {TEMPLATE_BYTES_MAX} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TemplateError(f"template {path}: not UTF-8 text") from None
    if part == "subject":
        text = text.strip()
        if not text or "\n" in text or "\r" in text:
            raise TemplateError(f"template {path}: a subject is one line of text")
    template = string.Template(text)
    if not template.is_valid():
        raise TemplateError(
            f"template {path}: a '$' that starts no placeholder (write $$ for a dollar sign)"
        )
    unknown = sorted(set(template.get_identifiers()) - PLACEHOLDERS[event])
    if unknown:
        raise TemplateError(
            f"template {path}: unknown placeholder {', '.join('$' + u for u in unknown)}"
            f" (known: {', '.join('$' + k for k in sorted(PLACEHOLDERS[event]))})"
        )
    return template


# -- rendering -----------------------------------------------------------------------


def has_email(event_type: str, data: Mapping[str, Any]) -> bool:
    """Whether an event sends an email: one of ``EMAIL_EVENTS``, and a lapsed hold
    for ``booking.expired``."""
    if event_type not in EMAIL_EVENTS:
        return False
    return event_type != "booking.expired" or data.get("trigger") in LAPSED_TRIGGERS


def render(
    templates: Templates,
    *,
    domain: str,
    event_type: str,
    data: dict[str, Any],
    slot: dict[str, Any] | None,
    to: str,
    mail_from: str,
    timezone: str = "UTC",
) -> EmailMessage | None:
    """The email of an event, or None when the event has none (``has_email``):
    ``compose``'s message, read back as an ``EmailMessage``.

    ``data`` is the event's resource as the API renders it (a Booking for
    ``booking.*``, a QueueEntry for ``queue.*``) with the event's own fields;
    ``slot`` the Slot resource when known (a QueueEntry's ``slotDetails``
    otherwise). Times are written in ``timezone`` (an IANA name; ValueError if
    unknown). A confirmation carries ``booking.ics`` when the slot is known.
    """
    raw = compose(
        templates, domain=domain, event_type=event_type, data=data, slot=slot, to=to,
        mail_from=mail_from, timezone=timezone,
    )  # fmt: skip
    if raw is None:
        return None
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def compose(
    templates: Templates,
    *,
    domain: str,
    event_type: str,
    data: dict[str, Any],
    slot: dict[str, Any] | None,
    to: str,
    mail_from: str,
    timezone: str = "UTC",
    headers: Mapping[str, str] | None = None,
) -> bytes | None:
    """``render``'s message as the bytes SMTP sends (CRLF line ends), or None.

    Built with the email package's MIME classes under its ``compat32`` policy:
    the modern ``EmailMessage`` API parses every header it is given and cost
    a delivery worker most of its time. So the values are checked here: no
    header value may hold a line break (``headers`` adds some, such as the
    event id).
    """
    if not has_email(event_type, data):
        return None
    zone = _zone(timezone)
    if slot is None and isinstance(data.get("slotDetails"), dict):
        slot = data["slotDetails"]
    values = _values(templates, domain, event_type, data, slot, zone)
    chosen = templates.of(domain, event_type)
    escaped = {name: html.escape(value, quote=True) for name, value in values.items()}
    alternative = MIMEMultipart("alternative")
    alternative.attach(MIMEText(chosen.text.substitute(values), "plain", "utf-8"))
    alternative.attach(MIMEText(chosen.html.substitute(escaped), "html", "utf-8"))
    message: MIMEMultipart = alternative
    if event_type == "booking.confirmed" and slot is not None:
        ics = booking_calendar(
            data, slot, organizer=mail_from, entity=templates.entities.get(domain)
        )
        calendar = MIMEText(ics.decode(), "calendar", "utf-8")
        for part in CONTENT_TYPE.split(";")[1:]:
            name, _, value = part.strip().partition("=")
            if name != "charset":
                calendar.set_param(name, value)
        calendar.add_header("Content-Disposition", "attachment", filename=CALENDAR_FILENAME)
        message = MIMEMultipart("mixed")
        message.attach(alternative)
        message.attach(calendar)
    subject = " ".join(chosen.subject.substitute(values).split())
    fields = {
        "Subject": subject if subject.isascii() else Header(subject, "utf-8").encode(),
        "From": mail_from,
        "To": to,
        "Date": formatdate(usegmt=True),
        "Message-ID": make_msgid(domain=mail_from.rpartition("@")[2] or None),
        # An automatic message (RFC 3834): auto-responders must not answer it.
        "Auto-Submitted": "auto-generated",
        **(headers or {}),
    }
    for name, value in fields.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"the {name} header would hold a line break")
        message[name] = value
    out = io.BytesIO()
    BytesGenerator(out, policy=_SMTP_LINES).flatten(message)
    return out.getvalue()


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def format_instant(text: str | None, zone: ZoneInfo) -> str:
    """An API instant for people: ``Thursday 24 December 2026, 09:30 UTC``."""
    if not text:
        return UNKNOWN
    try:
        moment = parse_instant(text)
    except ValueError:
        return UNKNOWN
    local = moment.astimezone(zone)
    return f"{local:%A} {local.day} {local:%B %Y, %H:%M} {local.tzname() or zone.key}"


def _values(
    templates: Templates,
    domain: str,
    event_type: str,
    data: Mapping[str, Any],
    slot: Mapping[str, Any] | None,
    zone: ZoneInfo,
) -> dict[str, str]:
    queue = event_type.startswith("queue.")
    booking_id = data.get("bookingId") if queue else data.get("id")
    values = {
        "booking_id": _text(booking_id),
        "user_id": _text(data.get("userId")),
        "slot_id": _text(data.get("slotId")),
        "domain": domain,
        "entity": templates.entities.get(domain, "Resource"),
        "resource": _text(None if slot is None else slot.get("resourceId")),
        "start": format_instant(None if slot is None else slot.get("startTime"), zone),
        "end": format_instant(None if slot is None else slot.get("endTime"), zone),
        "timezone": zone.key,
    }
    if event_type == "queue.offer":
        deadline = data.get("claimDeadline") or data.get("offerExpiresAt")
        values["claim_deadline"] = format_instant(deadline, zone)
    elif event_type == "booking.confirmed":
        values["confirmed_at"] = format_instant(data.get("confirmedAt"), zone)
    elif event_type == "booking.cancelled":
        reason = data.get("reason") or data.get("cancelReason")
        refund = data.get("refundPercentage")
        by = data.get("cancelledBy")
        values["reason"] = str(reason) if reason else NO_REASON
        values["refund_percentage"] = str(refund) if isinstance(refund, int) else "0"
        values["cancelled_by"] = BY_USER if by is None or by == data.get("userId") else BY_ADMIN
        values["cancelled_at"] = format_instant(data.get("cancelledAt"), zone)
    elif event_type == "booking.expired":
        values["expired_at"] = format_instant(data.get("expiresAt"), zone)
    return values


def _text(value: object) -> str:
    return UNKNOWN if value is None or value == "" else str(value)


# -- sending -----------------------------------------------------------------------


class Mailer:
    """Sends messages over one SMTP connection, opened on first use and again
    after a failure; sends are serialised by a lock (SMTP is one conversation).

    ``tls_context``: the TLS settings (certificate authorities) for STARTTLS
    and ``smtps://``; default: the system's, verifying the server.
    """

    def __init__(
        self,
        smtp_url: str,
        mail_from: str,
        *,
        timeout_s: float = 10.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        try:
            self._target: SmtpTarget = parse_smtp_url(smtp_url)
        except ValueError as error:
            raise MailError(f"SLOTENGINE_SMTP_URL: {error}") from None
        self._mail_from = mail_from
        self._timeout_s = timeout_s
        self._tls_context = tls_context
        self._lock = asyncio.Lock()
        self._client: aiosmtplib.SMTP | None = None

    def __repr__(self) -> str:
        return f"Mailer({self._target!r}, mail_from={self._mail_from!r})"

    async def send(self, message: EmailMessage) -> None:
        """Send ``message`` to its To, Cc and Bcc; ``MailError`` on any failure.

        A connection kept from an earlier send that turns out closed by the
        server is opened again once, at once.
        """
        if "From" not in message:
            message["From"] = self._mail_from
        await self._deliver(lambda client: client.send_message(message, sender=self._mail_from))

    async def send_raw(self, to: str, data: bytes) -> None:
        """Send ``compose``'s bytes to ``to``, as ``send`` does a message."""
        await self._deliver(lambda client: client.sendmail(self._mail_from, [to], data))

    async def _deliver(self, sending: Callable[[aiosmtplib.SMTP], Awaitable[Any]]) -> None:
        async with self._lock:
            reused = self._client is not None and self._client.is_connected
            try:
                await self._send(sending)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as error:
                await self._drop()
                if not reused:
                    raise MailError(_describe(error, self._target)) from None
                try:
                    await self._send(sending)
                except (aiosmtplib.SMTPException, OSError) as retried:
                    await self._drop()
                    raise MailError(_describe(retried, self._target)) from None
            except (aiosmtplib.SMTPException, OSError) as error:
                await self._drop()
                raise MailError(_describe(error, self._target)) from None
            except ValueError as error:  # no recipient, or no From: the message's fault
                raise MailError(_describe(error, self._target)) from None

    async def _send(self, sending: Callable[[aiosmtplib.SMTP], Awaitable[Any]]) -> None:
        client = self._client
        if client is None or not client.is_connected:
            client = self._new_client()
            self._client = client
            await client.connect()
        await sending(client)

    def _new_client(self) -> aiosmtplib.SMTP:
        target = self._target
        return aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            username=target.username,
            password=target.password,
            timeout=self._timeout_s,
            use_tls=target.implicit_tls,
            # Plain SMTP unless the URL asks for STARTTLS: never a silent upgrade.
            start_tls=target.starttls,
            tls_context=self._tls_context,
        )

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def close(self) -> None:
        """Say QUIT and close the connection, if one is open."""
        async with self._lock:
            client, self._client = self._client, None
            if client is not None and client.is_connected:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError):
                    client.close()


def _describe(error: BaseException, target: SmtpTarget) -> str:
    """A one-line account of a failure, without addresses or the password."""
    where = f"{target.host}:{target.port}"
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        codes = sorted({refusal.code for refusal in error.recipients})
        text = f"the SMTP server at {where} refused the recipient ({', '.join(map(str, codes))})"
    elif isinstance(error, aiosmtplib.SMTPSenderRefused):
        text = f"the SMTP server at {where} refused the sender ({error.code})"
    elif isinstance(error, aiosmtplib.SMTPAuthenticationError):
        text = f"the SMTP server at {where} refused the login ({error.code})"
    elif isinstance(error, aiosmtplib.SMTPResponseException):
        text = f"the SMTP server at {where} answered {error.code}: {error.message}"
    elif isinstance(error, aiosmtplib.SMTPTimeoutError | TimeoutError):
        text = f"the SMTP server at {where} did not answer in time"
    elif isinstance(error, aiosmtplib.SMTPConnectError | OSError):
        text = f"cannot reach the SMTP server at {where} ({type(error).__name__})"
    elif isinstance(error, ValueError):
        text = f"the message cannot be sent through {where}: {error}"
    else:
        text = f"sending through {where} failed ({type(error).__name__}: {error})"
    text = _ADDRESS.sub("<address>", " ".join(text.split()))
    if target.password:
        text = text.replace(target.password, "***")
    return text[:MAIL_ERROR_CHARS_MAX]
