"""The time units and domain policies that tests of every package build on.

One home for what each test package used to declare again: milliseconds per
second, minute, hour and day; ``policy``, a ``DomainPolicy`` with everyday
defaults that a test overrides by keyword; and ``POLICIES``, the domains the
shell, storage and gateway tests run with (``default``, ``short`` whose holds
and offers lapse in ``SHORT_HOLD_MS``, ``noqueue``).

Must never: hold a fixture that starts anything (servers and engines live in
the conftests and ``tests.support.fixtures``), or read the real clock.
"""

from typing import Any, Final

from engine.core.policy import DomainPolicy

__all__ = [
    "DAY_MS",
    "HOUR_MS",
    "MINUTE_MS",
    "POLICIES",
    "SECOND_MS",
    "SHORT_HOLD_MS",
    "policy",
]

SECOND_MS: Final = 1_000
MINUTE_MS: Final = 60 * SECOND_MS
HOUR_MS: Final = 60 * MINUTE_MS
DAY_MS: Final = 24 * HOUR_MS

# Short enough to watch a hold lapse through the real clock, long enough that
# a slow machine still confirms within it when a test wants to.
SHORT_HOLD_MS: Final = 300


def policy(name: str = "default", **overrides: Any) -> DomainPolicy:
    """A domain policy named ``name``: two-minute holds and offers, a queue of up to
    100 whose entries go stale after four hours, booking up to a year ahead,
    cancelling any time for a full refund; ``overrides`` change any field."""
    values: dict[str, Any] = {
        "name": name,
        "hold_ttl_ms": 2 * MINUTE_MS,
        "claim_ttl_ms": 2 * MINUTE_MS,
        "queue_enabled": True,
        "queue_size_max": 100,
        "queue_inactivity_ms": 4 * HOUR_MS,
        "advance_booking_ms": 365 * DAY_MS,
        "cancel_allowed_until_ms": 0,
        "refund_percentage": 100,
    }
    values.update(overrides)
    return DomainPolicy(**values)


POLICIES: Final[dict[str, DomainPolicy]] = {
    "default": policy(),
    "short": policy("short", hold_ttl_ms=SHORT_HOLD_MS, claim_ttl_ms=SHORT_HOLD_MS),
    "noqueue": policy("noqueue", queue_enabled=False),
}
