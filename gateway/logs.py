"""Structured logs: one JSON object a line, written off the event loop.

Records go through a ``QueueHandler`` (an append, cheap on the event loop) to a
``QueueListener`` thread that formats and writes them, so a slow terminal or
log shipper never stalls a request.

What may appear in a line is an allow-list: the message, the logger, the
level, the time, and the ``extra`` fields named in ``FIELDS``. Tokens never
reach a log (query strings and headers are not logged), user ids are not
logged (personal data), and URLs have their passwords masked. Should a token
slip into a message or a traceback all the same (a library quoting a request),
``RedactTokens`` masks anything shaped like a JWT in every record written.
"""

import contextlib
import copy
import logging
import logging.handlers
import queue
import re
import sys
import time
from typing import IO, Any, Final

import msgspec

# The extra fields a line may carry; anything else passed as ``extra`` is dropped.
FIELDS: Final = (
    "event",
    "request_id",
    "method",
    "route",
    "status",
    "error",
    "duration_ms",
    "slot_id",
    "booking_id",
    "shard",
)
# Records waiting for the writer thread; past this, new ones are dropped (never block).
PENDING_RECORDS_MAX: Final = 100_000

_PASSWORD_IN_URL: Final = re.compile(r"(//[^/@:\s]*:)[^/@\s]*@")
# A JWT's header and claims are base64url JSON objects, so each starts with "eyJ"
# ('{"'); its parts are joined by dots. The match goes on across a stray byte as
# a parser quotes it (raw, "\x01", "%01"), so that the rest of a token split by
# one (its signature) is masked with it.
_JWT: Final = re.compile(
    r"eyJ[A-Za-z0-9_-]*"
    r"(?:(?:\.|\\+x[0-9A-Fa-f]{2}|\\+[a-z0-9]|%[0-9A-Fa-f]{2}|[\x00-\x1f\x7f])+[A-Za-z0-9_-]*)*"
)
_JWT_MARK: Final = "eyJ"
REDACTED_TOKEN: Final = "[redacted token]"
_encode = msgspec.json.Encoder().encode
_TRACEBACKS: Final = logging.Formatter()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _PASSWORD_IN_URL.sub(r"\1***@", record.getMessage()),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return _encode(line).decode()


def _timestamp(created: float) -> str:
    whole = int(created)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        + f".{int((created - whole) * 1000):03d}Z"
    )


class RedactTokens(logging.Filter):
    """Masks anything shaped like a JWT in a record: its message, traceback and fields.

    It changes the record itself, before any handler formats it: the message
    is merged with its arguments and the traceback formatted here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A format string its arguments do not fit: the string alone (the
            # arguments may be anything).
            message = f"unformattable log message {record.msg!r}"
        record.msg = _JWT.sub(REDACTED_TOKEN, message) if _JWT_MARK in message else message
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            # Formatters would format it again from exc_info, token and all.
            record.exc_info = None
        if record.exc_text and _JWT_MARK in record.exc_text:
            record.exc_text = _JWT.sub(REDACTED_TOKEN, record.exc_text)
        if record.stack_info and _JWT_MARK in record.stack_info:
            record.stack_info = _JWT.sub(REDACTED_TOKEN, record.stack_info)
        for name in FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str) and _JWT_MARK in value:
                record.__dict__[name] = _JWT.sub(REDACTED_TOKEN, value)
        return True


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Enqueues without waiting; a full queue drops the record instead of stalling.

    Only the message is merged here (on the caller's thread); formatting waits
    for the writer thread.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


def configure_logging(level: str, stream: IO[str] | None = None) -> logging.handlers.QueueListener:
    """JSON lines at ``level`` and above on ``stream`` (stderr); returns the started writer."""
    records: queue.Queue[logging.LogRecord] = queue.Queue(PENDING_RECORDS_MAX)
    writer = logging.StreamHandler(stream if stream is not None else sys.stderr)
    writer.setFormatter(JsonFormatter())
    listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    enqueue = _DroppingQueueHandler(records)
    # On the handler, not the root logger: a logger's filters skip the records
    # its children pass up to it.
    enqueue.addFilter(RedactTokens())
    root.addHandler(enqueue)
    root.setLevel(level.upper())
    # Libraries' chatter stays at warning unless asked for.
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    listener.start()
    return listener
