"""Contact details masked out of free text the audit log keeps.

The audit log may hold no contact details (docs/api.md, "Audit log"), yet two
of its texts come from people: a cancellation's reason and a client's user
agent (a crawler's often names its operator's address). What looks like an
email address in either, or like a phone number in a reason, is replaced by
``REDACTED``. Pure: no I/O, no clock.
"""

import re
from typing import Final

REDACTED: Final = "[redacted]"
_EMAIL: Final = re.compile(r"[^\s@<>()\[\],;:\"']+@[^\s@<>()\[\],;:\"']+\.[A-Za-z]{2,}")
# Seven digits or more, each after at most one separator, optionally after a "+".
_PHONE: Final = re.compile(r"(?<![\w+])\+?\d(?:[\s().-]?\d){6,}(?!\w)")


def redact_emails(text: str) -> str:
    """``text`` with every email address masked (a user agent)."""
    return _EMAIL.sub(REDACTED, text) if "@" in text else text


def redact_contact_details(text: str) -> str:
    """``text`` with every email address and phone number masked (a reason)."""
    return _PHONE.sub(REDACTED, redact_emails(text))
