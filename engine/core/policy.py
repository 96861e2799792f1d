"""A domain's rules, resolved to the units the core works in (milliseconds).

``config.domains`` reads the TOML files and settings and produces these; the
core only ever sees a finished ``DomainPolicy``.

It must never read a file, a setting or the environment (``config.domains``
does): the core stays pure.
"""

import msgspec

from engine.core.limits import HOLD_EXTENSION_DEFAULT_S, HOLD_EXTENSIONS_DEFAULT


class DomainPolicy(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    hold_ttl_ms: int
    claim_ttl_ms: int
    queue_enabled: bool
    queue_size_max: int
    queue_inactivity_ms: int
    advance_booking_ms: int
    # Users may cancel until this long before the slot starts (0: until start).
    cancel_allowed_until_ms: int
    refund_percentage: int
    domain_type: str = "resource"
    entity_name: str = "Resource"
    slot_duration_minutes: int | None = None
    # What one extension of a hold adds, and how many a hold may have (0: none).
    hold_extension_ms: int = HOLD_EXTENSION_DEFAULT_S * 1_000
    hold_extensions_max: int = HOLD_EXTENSIONS_DEFAULT


PolicyBook = dict[str, DomainPolicy]
