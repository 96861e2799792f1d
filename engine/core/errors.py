"""The engine's one exception tree.

Expected business outcomes (a full slot, a lapsed hold) are ``EngineError``
subclasses with a stable machine-readable ``code`` and the HTTP status the
API answers with; the core turns them into ``Failure`` results and leaves its
state unchanged. A broken invariant is not an expected outcome: it raises
``InvariantViolation``, which crashes the shard so it rebuilds from storage.

It must never import anything but ``typing``, so that every other module may
import it.
"""

from typing import Any, ClassVar


class EngineError(Exception):
    """A business rule refused a command. The state is unchanged."""

    code: ClassVar[str] = "EngineError"
    status: ClassVar[int] = 409

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


class NotFound(EngineError):
    code = "NotFound"
    status = 404


class ValidationFailed(EngineError):
    code = "ValidationError"
    status = 422


class Conflict(EngineError):
    code = "Conflict"
    status = 409


class SlotOverlap(Conflict):
    code = "SlotOverlap"


class CapacityBelowBookings(Conflict):
    code = "CapacityBelowBookings"


class SlotHasBookings(Conflict):
    code = "SlotHasBookings"


class SlotNotReservable(Conflict):
    code = "SlotNotReservable"


class OutsideBookingWindow(Conflict):
    code = "OutsideBookingWindow"


class SlotFull(Conflict):
    code = "SlotFull"


class QueueFull(Conflict):
    code = "QueueFull"


class QueueDisabled(Conflict):
    code = "QueueDisabled"


class SlotAvailable(Conflict):
    code = "SlotAvailable"


class AlreadyBooked(Conflict):
    code = "AlreadyBooked"


class AlreadyHeld(Conflict):
    code = "AlreadyHeld"


class IdempotencyKeyReused(Conflict):
    code = "IdempotencyKeyReused"


class ReservationExpired(Conflict):
    code = "ReservationExpired"


class InvalidTransition(Conflict):
    code = "InvalidTransition"


class CancellationWindowClosed(Conflict):
    code = "CancellationWindowClosed"


class ExtensionLimitReached(Conflict):
    code = "ExtensionLimitReached"


class HoldAtSlotStart(Conflict):
    code = "HoldAtSlotStart"


class ServiceUnavailable(EngineError):
    """A dependency (storage, lease) is down: nothing was applied."""

    code = "ServiceUnavailable"
    status = 503


class InvariantViolation(AssertionError):
    """A bug: the state broke a rule that must always hold. Never caught by the core."""


def require(condition: bool, message: str) -> None:
    """An assertion that survives ``python -O``.

    The message is built before the call: on a hot path, test the condition
    and raise ``InvariantViolation`` directly so it is formatted only on failure.
    """
    if not condition:
        raise InvariantViolation(message)


ERRORS_BY_CODE: dict[str, type[EngineError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        ValidationFailed,
        Conflict,
        SlotOverlap,
        CapacityBelowBookings,
        SlotHasBookings,
        SlotNotReservable,
        OutsideBookingWindow,
        SlotFull,
        QueueFull,
        QueueDisabled,
        SlotAvailable,
        AlreadyBooked,
        AlreadyHeld,
        IdempotencyKeyReused,
        ReservationExpired,
        InvalidTransition,
        CancellationWindowClosed,
        ExtensionLimitReached,
        HoldAtSlotStart,
        ServiceUnavailable,
    )
}
