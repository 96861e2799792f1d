"""Commands into a shard, results out of it, and the events it emits.

These structs are also the wire format across the actor boundary: a batch of
commands travels as msgspec-encoded bytes (``BatchCodec``), so encoding is
cheap and decoding validates. Every command carries a ``request_id`` chosen by
the caller; the shard remembers the outcome of each state-changing request id
for a while, so a batch retried after an actor failure never applies twice.

User commands may carry the client's ``idempotency_key``: the shard keeps the
first outcome per (user, command, key) with a fingerprint of the command, and
answers a replay with that outcome, or ``IdempotencyKeyReused`` if the
fingerprint differs.
"""

from typing import Any, Final

import msgspec
from msgspec import UNSET, UnsetType

from engine.core.records import Booking, QueueEntry, QueueView, SlotView
from engine.core.states import BookingStatus, SlotStatus

# -- commands ------------------------------------------------------------------


class Origin(msgspec.Struct, gc=False, frozen=True, array_like=True):
    """Where a change came from, for its audit rows only: the HTTP request's
    ``X-Request-Id``, the client's IP address and user agent (each None when
    unknown).

    The gateway sets it on the state-changing commands it sends. The shard hands
    it to storage beside its events (``ShardCore.drain_audit``), never inside
    them: no event published to subscribers, webhooks or the outbox carries it.
    """

    request_id: str
    client_ip: str | None = None
    user_agent: str | None = None


class Command(msgspec.Struct, gc=False, tag=True, tag_field="op", frozen=True, kw_only=True):
    request_id: str
    # Unset (so not encoded at all, and not part of a fingerprint) unless the
    # gateway sets it on a change.
    origin: Origin | UnsetType = UNSET


class CreateSlot(Command, gc=False, frozen=True, kw_only=True):
    slot_id: str
    resource_id: str
    domain: str
    start_ms: int
    end_ms: int
    capacity: int
    metadata: dict[str, Any] = {}
    blocked: bool = False
    actor: str = "admin"


class UpdateSlot(Command, gc=False, frozen=True, kw_only=True):
    slot_id: str
    start_ms: int | None = None
    end_ms: int | None = None
    capacity: int | None = None
    metadata: dict[str, Any] | None = None
    blocked: bool | None = None
    actor: str = "admin"


class DeleteSlot(Command, gc=False, frozen=True, kw_only=True):
    slot_id: str
    force: bool = False
    actor: str = "admin"


class GetSlot(Command, gc=False, frozen=True, kw_only=True):
    slot_id: str
    # The reader follows the slot's changes live (a watch's snapshot): the
    # shard publishes its events from now on (``ShardCore.watched``).
    watch: bool = False


class ListSlots(Command, gc=False, frozen=True, kw_only=True):
    """Slots of this shard ordered by (start_ms, id), after the cursor."""

    resource_id: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    status: SlotStatus | None = None
    available_only: bool = False
    limit: int = 50
    after: tuple[int, str] | None = None


class Reserve(Command, gc=False, frozen=True, kw_only=True):
    slot_id: str
    user_id: str
    idempotency_key: str | None = None


class Confirm(Command, gc=False, frozen=True, kw_only=True):
    booking_id: str
    user_id: str
    idempotency_key: str | None = None


class Cancel(Command, gc=False, frozen=True, kw_only=True):
    booking_id: str
    user_id: str
    as_admin: bool = False
    reason: str | None = None
    idempotency_key: str | None = None


class ExtendHold(Command, gc=False, frozen=True, kw_only=True):
    """Move a RESERVED hold's deadline on by its domain's extension (its owner only)."""

    booking_id: str
    user_id: str
    idempotency_key: str | None = None


class ReleaseHold(Command, gc=False, frozen=True, kw_only=True):
    """Give a RESERVED hold up now (its owner only): EXPIRED, the place offered on."""

    booking_id: str
    user_id: str
    idempotency_key: str | None = None


class GetBooking(Command, gc=False, frozen=True, kw_only=True):
    booking_id: str
    user_id: str
    as_admin: bool = False


class ListBookings(Command, gc=False, frozen=True, kw_only=True):
    """A user's bookings on this shard, newest first, after the cursor."""

    user_id: str
    status: BookingStatus | None = None
    limit: int = 50
    after: tuple[int, str] | None = None
    watch: bool = False


class JoinQueue(Command, gc=False, frozen=True, kw_only=True):
    slot_id: str
    user_id: str
    idempotency_key: str | None = None


class LeaveQueue(Command, gc=False, frozen=True, kw_only=True):
    slot_id: str
    user_id: str


class QueuePosition(Command, gc=False, frozen=True, kw_only=True):
    slot_id: str
    user_id: str
    watch: bool = False


class TouchWaiting(Command, gc=False, frozen=True, kw_only=True):
    """Users watching their queue places live: each (slot id, user id) that is
    WAITING on this shard counts as seen now, as a position poll would.

    Sent to one shard (``shard=``), for the places of its partitions a gateway's
    live connections watch; places elsewhere or no longer waiting are skipped.
    """

    places: list[tuple[str, str]]


AnyCommand = (
    CreateSlot
    | UpdateSlot
    | DeleteSlot
    | GetSlot
    | ListSlots
    | Reserve
    | Confirm
    | Cancel
    | ExtendHold
    | ReleaseHold
    | GetBooking
    | ListBookings
    | JoinQueue
    | LeaveQueue
    | QueuePosition
    | TouchWaiting
)

# Commands whose repetition is harmless, so their outcomes are not remembered
# by request id: reads, and the position poll and the watchers' touch (they only
# refresh activity, and would otherwise crowd out the outcomes of real changes).
READ_ONLY_COMMANDS: tuple[type[Command], ...] = (
    GetSlot,
    ListSlots,
    GetBooking,
    ListBookings,
    QueuePosition,
    TouchWaiting,
)

# The field naming the slot or booking a command is about: its id routes the
# command to its partition (``engine/core/routing.py``). ``ListSlots`` routes by
# its resource when it names one; ``ListBookings`` spans every shard, and
# ``TouchWaiting`` names its shard.
ROUTING_FIELD: Final[dict[type[Command], str]] = {
    CreateSlot: "slot_id",
    UpdateSlot: "slot_id",
    DeleteSlot: "slot_id",
    GetSlot: "slot_id",
    Reserve: "slot_id",
    JoinQueue: "slot_id",
    LeaveQueue: "slot_id",
    QueuePosition: "slot_id",
    Confirm: "booking_id",
    Cancel: "booking_id",
    ExtendHold: "booking_id",
    ReleaseHold: "booking_id",
    GetBooking: "booking_id",
}

# -- results -------------------------------------------------------------------


class Result(msgspec.Struct, gc=False, tag=True, tag_field="kind", frozen=True, kw_only=True):
    # The HTTP status the API answers with (201 created, 200 existing, ...).
    status: int


class SlotResult(Result, gc=False, frozen=True, kw_only=True):
    slot: SlotView


class SlotPage(Result, gc=False, frozen=True, kw_only=True):
    items: list[SlotView]


class BookingResult(Result, gc=False, frozen=True, kw_only=True):
    booking: Booking


class BookingPage(Result, gc=False, frozen=True, kw_only=True):
    items: list[Booking]


class QueueResult(Result, gc=False, frozen=True, kw_only=True):
    entry: QueueView


class Done(Result, gc=False, frozen=True, kw_only=True):
    """Success without a body (204)."""


class Failure(Result, gc=False, frozen=True, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] = {}
    # For 503 (a dependency is down) and 429: when to try again.
    retry_after_s: int | None = None


# A 503 whose change may have been applied all the same (its commit was under way
# when storage failed, or it was sent and no answer came back) says so in its
# details: {"outcome": "unknown"}. A retry with the same Idempotency-Key returns
# what became of it; a 503 without it applied nothing.
OUTCOME_DETAIL: Final = "outcome"
OUTCOME_UNKNOWN: Final = "unknown"


def outcome_unknown(details: dict[str, Any]) -> bool:
    """Whether a refusal's ``details`` say that its change may have been applied."""
    return details.get(OUTCOME_DETAIL) == OUTCOME_UNKNOWN


# A 503 from a shard that does not serve the command's partition (the caller's
# partition map is older than the shard's) names the partition in its details:
# {"partitionNotServed": p}. Nothing was applied or remembered; the caller reads
# the map again and sends the command where it now goes.
NOT_SERVED_DETAIL: Final = "partitionNotServed"


def not_served(result: "AnyResult") -> int | None:
    """The partition a shard said it does not serve, or None."""
    if type(result) is not Failure:
        return None
    partition = result.details.get(NOT_SERVED_DETAIL)
    return partition if type(partition) is int else None


AnyResult = SlotResult | SlotPage | BookingResult | BookingPage | QueueResult | Done | Failure

# -- events --------------------------------------------------------------------


class Event(msgspec.Struct, gc=False, tag=True, tag_field="type", frozen=True, kw_only=True):
    at_ms: int
    # The request that caused it, or "" for a timer.
    request_id: str
    # Who caused it: a user id, "admin:<id>", or "system" for timers.
    actor: str


class BookingChanged(Event, gc=False, frozen=True, kw_only=True):
    """A booking transition; also its audit record."""

    booking: Booking
    from_status: BookingStatus
    to_status: BookingStatus
    trigger: str


class QueueChanged(Event, gc=False, frozen=True, kw_only=True):
    """A queue entry joined, left, was offered a hold, converted or expired."""

    entry: QueueEntry
    change: str
    # For change == "notified": the hold's deadline.
    offer_expires_at_ms: int | None = None


class QueueMoved(Event, gc=False, frozen=True, kw_only=True):
    """Positions behind ``removed_seq`` moved up by one.

    ``departures`` numbers the line's departures within shard incarnation
    ``epoch`` (as in ``SlotView``), so a live subscriber can tell an update it
    already has from one it missed.
    """

    slot_id: str
    removed_seq: int
    total_in_queue: int
    epoch: str = ""
    departures: int = 0
    # The line's current pace: the estimated wait of the first place.
    wait_per_place_ms: int = 0


class SlotChanged(Event, gc=False, frozen=True, kw_only=True):
    """A slot was created, updated, deleted, or its counts changed."""

    slot: SlotView
    change: str


AnyEvent = BookingChanged | QueueChanged | QueueMoved | SlotChanged


class AttemptRefused(msgspec.Struct, gc=False, frozen=True, array_like=True):
    """A reservation attempt (``Reserve``, ``JoinQueue``) the shard refused: an
    audit record, not an event. It goes to storage with the request outcomes
    (``ShardCore.drain_audit``) and is never published: nothing changed.
    """

    at_ms: int
    command: Reserve | JoinQueue
    # The refusal's code (``SlotFull``, ``AlreadyBooked``, ...).
    code: str


# -- what the shard remembers, as storage keeps it ------------------------------


class OutcomeRecord(msgspec.Struct, gc=False, frozen=True, array_like=True):
    """The first outcome of a state-changing request id (retries across a failure)."""

    request_id: str
    at_ms: int
    result: AnyResult


class KeyRecord(msgspec.Struct, gc=False, frozen=True, array_like=True):
    """The first outcome of a client Idempotency-Key, with the request's fingerprint.

    ``partition`` is the partition of the command's routing id, so that the
    record moves with its partition; -1 when unknown (a command without a
    routing id, or a record stored before the field existed: being the last
    field, with a default, records encoded without it still decode).
    """

    user_id: str
    command: str
    key: str
    at_ms: int
    fingerprint: bytes
    result: AnyResult
    partition: int = -1


# -- batches across the actor boundary ----------------------------------------


class Batch(msgspec.Struct, gc=False, frozen=True, omit_defaults=True):
    """Commands for one shard. ``traces``: the W3C ``traceparent`` of each traced
    command's span (tracing on), which the shard's span of the batch links to;
    empty, as it is with tracing off, it is not encoded at all."""

    commands: list[AnyCommand]
    traces: list[str] = []


class BatchReply(msgspec.Struct, gc=False, frozen=True):
    results: list[AnyResult]


class EarlyReply(msgspec.Struct, gc=False, frozen=True):
    """Answers sent ahead of a batch's reply: ``results[i]`` answers command ``indices[i]``."""

    indices: list[int]
    results: list[AnyResult]


class BatchCodec:
    """Encoders and decoders for batches; build one per process (not a module global)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._batch_decoder = msgspec.msgpack.Decoder(Batch)
        self._reply_decoder = msgspec.msgpack.Decoder(BatchReply)
        self._early_decoder = msgspec.msgpack.Decoder(EarlyReply)

    def encode_batch(self, commands: list[AnyCommand], traces: list[str] | None = None) -> bytes:
        if traces:
            return self._encoder.encode(Batch(commands, traces))
        return self._encoder.encode(Batch(commands))

    def decode_batch(self, data: bytes) -> list[AnyCommand]:
        return self._batch_decoder.decode(data).commands

    def decode_traced_batch(self, data: bytes) -> Batch:
        """The batch with the trace contexts it carries (``Batch.traces``)."""
        return self._batch_decoder.decode(data)

    def encode_reply(self, results: list[AnyResult]) -> bytes:
        return self._encoder.encode(BatchReply(results))

    def decode_reply(self, data: bytes) -> list[AnyResult]:
        return self._reply_decoder.decode(data).results

    def encode_early(self, indices: list[int], results: list[AnyResult]) -> bytes:
        return self._encoder.encode(EarlyReply(indices, results))

    def decode_early(self, data: bytes) -> EarlyReply:
        return self._early_decoder.decode(data)
