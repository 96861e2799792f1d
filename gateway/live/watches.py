"""The watches: one live connection's view of the engine.

``QueueWatch`` (one user's place in one slot's queue, and the slot) and
``BookingWatch`` (one user's bookings) read a snapshot after subscribing and
then apply the bus's events, skipping those the snapshot reflects and
reading again on a gap (see ``gateway/live/__init__.py``). They own the
live messages' content and put them, encoded, in their connection's
``Outbox``. They never change engine state, never wait in ``deliver`` and
never import the endpoints.
"""

import asyncio
import contextlib
from typing import Final

import msgspec

from engine.core import protocol as p
from engine.core.records import Booking, QueueView, SlotView
from engine.core.states import BookingStatus, QueueStatus
from engine.core.waiting_line import describe_wait
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShellError
from gateway import schemas as s
from gateway.live.outbox import Outbox

# Events a watch keeps while it reads a snapshot; past this it reads another one.
PENDING_EVENTS_MAX: Final = 1_024
# Encoded slot.updated messages kept for sharing among the watches of a slot.
SLOT_MESSAGES_CACHED_MAX: Final = 10_000
# Active bookings a /ws/bookings connection starts with, at most.
ACTIVE_BOOKINGS_MAX: Final = 200
# Booking versions a BookingWatch remembers to skip stale updates.
BOOKING_VERSIONS_MAX: Final = 1_000

_ACTIVE = (BookingStatus.RESERVED, BookingStatus.CONFIRMED)


_encode = msgspec.json.Encoder().encode


def _wait_seconds(position: int | None, wait_per_place_ms: int) -> int | None:
    if position is None:
        return None
    return -(-(position * wait_per_place_ms) // 1000)


class _WatchBase:
    """What every watch has: at most one resync task, cancelled on close."""

    _resyncing: asyncio.Task[None] | None = None

    async def close(self) -> None:
        task = self._resyncing
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class QueueWatch(_WatchBase):
    """One user's place in one slot's queue and the slot, as a stream of messages.

    Invariants once synced: ``position`` is the user's place as of departure
    number ``departures`` of line incarnation ``epoch``; ``slot_revision`` is the
    revision of the last slot view sent. While not synced, events wait in
    ``_pending`` (bounded) for the snapshot being read.
    """

    def __init__(
        self, engine: EngineClient, ids: RequestIds, slot_id: str, user_id: str, outbox: Outbox
    ) -> None:
        self._engine = engine
        self._ids = ids
        self.slot_id = slot_id
        self.user_id = user_id
        self._outbox = outbox
        self._synced = False
        self._pending: list[p.AnyEvent] = []
        self._again = False
        self.epoch = ""
        self.departures = 0
        self.slot_revision = -1
        self.seq = 0
        self.status: QueueStatus | None = None
        self.position: int | None = None
        self.total = 0
        self.wait_per_place_ms = 0
        self.booking_id: str | None = None
        self.resyncs = 0

    async def start(self) -> None:
        """The first snapshot and messages; ``LookupError`` if the slot does not exist."""
        snapshot = await self._read_snapshot()
        self._adopt(*snapshot, first=True)
        self._replay()
        if self._again:
            self.resync()

    def deliver(self, event: p.AnyEvent) -> None:
        if self._synced:
            self._apply(event)
        elif len(self._pending) < PENDING_EVENTS_MAX:
            self._pending.append(event)
        else:
            self._pending.clear()
            self._again = True

    def resync(self) -> None:
        self._synced = False
        if self._resyncing is not None and not self._resyncing.done():
            self._again = True
            return
        self._resyncing = asyncio.get_running_loop().create_task(self._resync())

    async def _resync(self) -> None:
        while True:
            self.resyncs += 1
            self._again = False
            try:
                snapshot = await self._read_snapshot()
            except (ShellError, LookupError):
                # The engine is away or the slot is gone: the next event retries
                # (no epoch matches the empty one).
                self._pending.clear()
                self.epoch = ""
                self._synced = True
                return
            self._adopt(*snapshot, first=False)
            self._replay()
            if not self._again:
                return
            self._synced = False

    async def _read_snapshot(self) -> tuple[SlotView, QueueView | None]:
        engine = self._engine
        entry_result = await engine.execute(
            p.QueuePosition(
                request_id=self._ids.next(), slot_id=self.slot_id, user_id=self.user_id, watch=True
            )
        )
        if isinstance(entry_result, p.QueueResult):
            return entry_result.entry.slot, entry_result.entry
        slot_result = await engine.execute(
            p.GetSlot(request_id=self._ids.next(), slot_id=self.slot_id, watch=True)
        )
        if isinstance(slot_result, p.SlotResult):
            return slot_result.slot, None
        assert isinstance(slot_result, p.Failure)
        if slot_result.status == 404:
            raise LookupError(slot_result.message)
        raise ShellError(slot_result.message)

    def _adopt(self, slot: SlotView, entry: QueueView | None, *, first: bool) -> None:
        slot_is_new = first or slot.epoch != self.epoch or slot.revision > self.slot_revision
        self.epoch = slot.epoch
        self.departures = slot.departures
        self.total = slot.queue_length
        estimated_wait_seconds: int | None = None
        if entry is None:
            self.status = None
            self.position = None
            self.seq = 0
            self.booking_id = None
        else:
            self.status = entry.status
            self.position = entry.position
            self.seq = entry.seq
            self.booking_id = entry.booking_id
            estimated_wait_seconds = entry.estimated_wait_seconds
            if entry.position:
                self.wait_per_place_ms = (estimated_wait_seconds or 0) * 1000 // entry.position
        self._synced = True
        self._send_position(estimated_wait_seconds)
        if slot_is_new:
            self._send_slot(slot)

    def _replay(self) -> None:
        pending, self._pending = self._pending, []
        for event in pending:
            self.deliver(event)

    def _apply(self, event: p.AnyEvent) -> None:
        kind = type(event)
        if kind is p.QueueMoved:
            self._moved(event)  # type: ignore[arg-type]
        elif kind is p.SlotChanged:
            slot = event.slot  # type: ignore[union-attr]
            if slot.epoch != self.epoch or slot.revision > self.slot_revision:
                self._send_slot(slot)
        elif kind is p.QueueChanged and event.entry.user_id == self.user_id:  # type: ignore[union-attr]
            self._own_entry_changed(event)  # type: ignore[arg-type]

    def _moved(self, event: p.QueueMoved) -> None:
        if event.epoch != self.epoch:
            self.resync()
            return
        if event.departures <= self.departures:
            return  # the snapshot has it already
        if event.departures != self.departures + 1:
            self.resync()  # some departures never reached us
            return
        self.departures = event.departures
        self.total = event.total_in_queue
        if self.status is not QueueStatus.WAITING or self.position is None:
            return
        if event.removed_seq == self.seq:
            return  # this user's own departure: the entry's change follows and says so
        if event.removed_seq < self.seq:
            self.position -= 1
        self.wait_per_place_ms = event.wait_per_place_ms
        self._send_position(_wait_seconds(self.position, self.wait_per_place_ms))

    def _own_entry_changed(self, event: p.QueueChanged) -> None:
        entry = event.entry
        if entry.seq < self.seq:
            return  # an earlier entry of this user, superseded
        if event.change == "joined":
            if entry.seq != self.seq:
                self.resync()  # joined while connected: the position needs a read
            return
        self.seq = entry.seq
        self.position = None
        if event.change == "left":
            self.status = None
            self.booking_id = None
        else:
            self.status = entry.status
            self.booking_id = entry.booking_id
        if event.change == "notified" and entry.booking_id and event.offer_expires_at_ms:
            self._outbox.put(
                _encode(
                    s.QueueOfferMessage(
                        slot_id=self.slot_id,
                        booking_id=entry.booking_id,
                        expires_at=s.rfc3339(event.offer_expires_at_ms),
                    )
                )
            )
        self._send_position(None)

    def _send_position(self, estimated_wait_seconds: int | None) -> None:
        status = None if self.status is None else self.status.value
        self._outbox.put(
            _encode(
                s.QueuePositionMessage(
                    slot_id=self.slot_id,
                    position=self.position,
                    status=status,  # type: ignore[arg-type]
                    total_in_queue=self.total,
                    estimated_wait_time=describe_wait(estimated_wait_seconds),
                    estimated_wait_seconds=estimated_wait_seconds,
                    booking_id=self.booking_id,
                )
            )
        )

    def _send_slot(self, slot: SlotView) -> None:
        if slot.epoch == self.epoch:
            self.slot_revision = max(self.slot_revision, slot.revision)
        self._outbox.put(_slot_message(slot))


class _SlotMessages:
    """One encoded ``slot.updated`` per slot view, shared by every watch of the slot."""

    def __init__(self, entries_max: int) -> None:
        self._entries_max = entries_max
        self._cache: dict[str, tuple[SlotView, bytes]] = {}

    def __call__(self, slot: SlotView) -> bytes:
        cached = self._cache.get(slot.id)
        if cached is not None and cached[0] is slot:
            return cached[1]
        data = _encode(s.SlotUpdatedMessage(slot_id=slot.id, slot=s.slot_out(slot)))
        if len(self._cache) >= self._entries_max:
            self._cache.clear()
        self._cache[slot.id] = (slot, data)
        return data


_slot_message = _SlotMessages(SLOT_MESSAGES_CACHED_MAX)


class BookingWatch(_WatchBase):
    """One user's bookings: the active ones first, then every change, each version once."""

    def __init__(self, engine: EngineClient, ids: RequestIds, user_id: str, outbox: Outbox) -> None:
        self._engine = engine
        self._ids = ids
        self.user_id = user_id
        self._outbox = outbox
        self._versions: dict[str, int] = {}
        self._synced = False
        self._pending: list[Booking] = []
        self._again = False

    async def start(self) -> None:
        await self._sync()

    def deliver(self, event: p.AnyEvent) -> None:
        if type(event) is not p.BookingChanged:
            return
        booking = event.booking
        if booking.user_id != self.user_id:
            return
        if self._synced:
            self._send(booking)
        elif len(self._pending) < PENDING_EVENTS_MAX:
            self._pending.append(booking)

    def resync(self) -> None:
        if self._resyncing is not None and not self._resyncing.done():
            # The read under way may have asked fewer shards (the map changed): again.
            self._again = True
        elif self._synced:
            self._synced = False
            self._resyncing = asyncio.get_running_loop().create_task(self._resync())

    async def _resync(self) -> None:
        while True:
            self._again = False
            try:
                await self._sync()
            except ShellError:
                self._synced = True
                return
            if not self._again:
                return
            self._synced = False

    async def _sync(self) -> None:
        engine = self._engine
        pages = await asyncio.gather(
            *(
                engine.execute(
                    p.ListBookings(
                        request_id=self._ids.next(),
                        user_id=self.user_id,
                        status=status,
                        limit=ACTIVE_BOOKINGS_MAX,
                        watch=True,
                    ),
                    shard=shard,
                )
                for shard in range(engine.shard_count)
                for status in _ACTIVE
            )
        )
        if any(isinstance(page, p.Failure) for page in pages):
            raise ShellError("the engine could not list the bookings")
        bookings = [b for page in pages if isinstance(page, p.BookingPage) for b in page.items]
        bookings.sort(key=lambda b: (b.reserved_at_ms, b.id))
        for booking in bookings:
            self._send(booking)
        self._synced = True
        pending, self._pending = self._pending, []
        for booking in pending:
            self._send(booking)

    def _send(self, booking: Booking) -> None:
        if self._versions.get(booking.id, 0) >= booking.version:
            return
        if len(self._versions) >= BOOKING_VERSIONS_MAX:
            self._versions.pop(next(iter(self._versions)))
        self._versions[booking.id] = booking.version
        self._outbox.put(
            _encode(
                s.BookingUpdatedMessage(slot_id=booking.slot_id, booking=s.booking_out(booking))
            )
        )
