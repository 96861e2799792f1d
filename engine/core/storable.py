"""What PostgreSQL can store: the rule every accepted string and JSON value obeys.

A shard commits many users' changes in one transaction (group commit), so a
single value the database refuses would fail the flush for everybody in it.
The gateway checks these rules while it decodes a request (a 422 naming the
field), and the shard checks every state-changing command again before it
applies it (``ShardCore.execute``): whatever reaches a shard by another path,
a command the database would refuse is refused alone, before it changes
anything.

What PostgreSQL refuses, and so what is refused here:

- text with U+0000 (``text`` and ``jsonb`` both reject it), or that is not
  valid Unicode (a lone surrogate cannot be encoded as UTF-8);
- JSON numbers outside what crosses the engine's wire (msgpack carries 64-bit
  integers) or that are not finite; written with a fraction or an exponent
  too (``1e30``): JSON, and so the OpenAPI document, does not tell it from
  the integer it equals, so neither may the rule; and ``jsonb`` keeps a number
  as a decimal and gives ``1e20`` back as ``100000000000000000000``, an
  integer a shard loading it could not carry;
- JSON nested deeper than ``JSON_DEPTH_MAX`` or larger, encoded, than
  ``SLOT_METADATA_BYTES_MAX`` (limits, not PostgreSQL's: see ``limits``);
- a command's text longer than ``COMMAND_TEXT_CHARS_MAX`` (a reason, than
  ``CANCEL_REASON_CHARS_MAX``): ids, users and keys go into indexes, whose
  rows PostgreSQL holds to about 2.7 kB.

Pure functions, no I/O; each answers the first problem it finds as
``(path, message)`` so that callers can name the field.

It must never change a value (it only answers whether one is storable) nor
import anything of the core but its limits.
"""

import math
from typing import Any, Final

import msgspec

from engine.core.limits import (
    CANCEL_REASON_CHARS_MAX,
    COMMAND_TEXT_CHARS_MAX,
    JSON_DEPTH_MAX,
    SLOT_METADATA_BYTES_MAX,
)

NUL_MESSAGE: Final = "must not contain the character U+0000"
UNICODE_MESSAGE: Final = "must be valid Unicode (no lone surrogates)"
# Metadata numbers lie strictly between -2**63 and 2**63. Strictly: the float
# -2**63 is written -9.223372036854776e18, which jsonb keeps as the decimal
# -9223372036854776000, past what a shard loading it can carry; and JSON does
# not tell a float from the integer it equals, so the integer -2**63 goes too.
NUMBER_BOUND: Final = 2**63
NUMBER_MESSAGE: Final = "numbers must lie strictly between -2**63 and 2**63"

# A command's text fields, by name, that may be longer than COMMAND_TEXT_CHARS_MAX.
_TEXT_CHARS_MAX: Final = {"reason": CANCEL_REASON_CHARS_MAX}

_json_encode = msgspec.json.Encoder().encode
_astuple = msgspec.structs.astuple


def text_problem(value: str) -> str | None:
    """Why PostgreSQL would refuse ``value`` as text, or None."""
    if "\x00" in value:
        return NUL_MESSAGE
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return UNICODE_MESSAGE
    return None


def json_problem(value: Any, path: str, depth: int = 1) -> tuple[str, str] | None:
    """The first part of a decoded JSON value that ``jsonb`` would refuse, or None.

    ``path`` names the value (``metadata``); a member is named below it
    (``metadata.room``, ``metadata.seats[2]``). ``depth`` counts the containers
    above and including ``value``.
    """
    if isinstance(value, str):
        problem = text_problem(value)
        return None if problem is None else (path, problem)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return path, "numbers must be finite"
        if -NUMBER_BOUND < value < NUMBER_BOUND:
            return None
        return path, NUMBER_MESSAGE
    if isinstance(value, dict):
        if depth > JSON_DEPTH_MAX:
            return path, f"nested deeper than {JSON_DEPTH_MAX} levels"
        for key, member in value.items():
            if not isinstance(key, str):
                return path, "object keys must be strings"
            problem = text_problem(key)
            if problem is not None:
                return path, f"keys {problem}"
            found = json_problem(member, f"{path}.{key}", depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        if depth > JSON_DEPTH_MAX:
            return path, f"nested deeper than {JSON_DEPTH_MAX} levels"
        for index, member in enumerate(value):
            found = json_problem(member, f"{path}[{index}]", depth + 1)
            if found is not None:
                return found
        return None
    return path, f"{type(value).__name__} is not a JSON value"


def metadata_problem(metadata: dict[str, Any], path: str = "metadata") -> tuple[str, str] | None:
    """A slot's metadata: storable JSON, at most ``SLOT_METADATA_BYTES_MAX`` encoded."""
    found = json_problem(metadata, path)
    if found is not None:
        return found
    size = len(_json_encode(metadata))
    if size > SLOT_METADATA_BYTES_MAX:
        return path, f"is {size} bytes encoded, more than {SLOT_METADATA_BYTES_MAX}"
    return None


def command_problems(command: msgspec.Struct) -> dict[str, str] | None:
    """Every field of a command the database would refuse, camelCase name -> why.

    Runs for every state-changing command a shard applies, so the common case
    (a few short ASCII strings, no metadata) costs a handful of C calls.
    """
    values = _astuple(command)
    for value in values:
        kind = type(value)
        if (
            kind is str
            and ("\x00" in value or not value.isascii() or len(value) > COMMAND_TEXT_CHARS_MAX)
        ) or kind is dict:
            break
    else:
        return None
    problems: dict[str, str] = {}
    for name, value in zip(command.__struct_fields__, values, strict=True):
        found: tuple[str, str] | None = None
        if type(value) is str:
            chars_max = _TEXT_CHARS_MAX.get(name, COMMAND_TEXT_CHARS_MAX)
            message = text_problem(value) or (
                f"must be at most {chars_max} characters" if len(value) > chars_max else None
            )
            if message is not None:
                found = _camel(name), message
        elif type(value) is dict:
            found = metadata_problem(value, _camel(name))
        if found is not None:
            problems[found[0]] = found[1]
    return problems or None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
