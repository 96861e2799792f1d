"""The shard's slots and their administration: the index, and what a slot may become.

``SlotDirectory`` owns the shard's slots by id, by resource and by start
time, and the rules of creating, changing, deleting and listing them: the
routing check, the domain, the slot's shape (capacity, duration, not in the
past), no overlap on a resource, capacity never below what is booked, and the
slot's end timer. Every check comes before the first change, so a refusal
(an ``EngineError``) leaves the directory untouched.

It must never touch bookings, holds, the waiting line or events: what a change
means for them (cancelling on a forced delete, offering raised capacity, the
``SlotChanged`` event) is the shard's (``engine/core/shard.py``).
"""

from sortedcontainers import SortedList

from engine.core import errors
from engine.core.limits import LIST_LIMIT_MAX, SLOT_CAPACITY_MAX, SLOT_DURATION_MAX_MS
from engine.core.policy import DomainPolicy
from engine.core.protocol import CreateSlot, ListSlots, UpdateSlot
from engine.core.records import StoredSlot, pack_metadata
from engine.core.routing import PartitionSet
from engine.core.slot_state import SlotState, TimerKey
from engine.core.states import SLOT_TAKES_HOLDS
from engine.core.timer_wheel import TimerWheel


class SlotDirectory:
    def __init__(
        self,
        *,
        partitions: PartitionSet,
        policies: dict[str, DomainPolicy],
        timers: TimerWheel[TimerKey],
    ) -> None:
        self._partitions = partitions
        self._policies = policies
        self._timers = timers
        self.slots: dict[str, SlotState] = {}
        self._by_resource: dict[str, set[str]] = {}
        self._order: SortedList[tuple[int, str]] = SortedList()

    def serve(self, partitions: PartitionSet) -> None:
        """From now on the slots this directory may hold and create are of ``partitions``
        (the shard adopted or released some; it moves their slots in or out)."""
        self._partitions = partitions

    def get(self, slot_id: str) -> SlotState:
        slot = self.slots.get(slot_id)
        if slot is None:
            raise errors.NotFound("no such slot")
        return slot

    def restore(self, stored: StoredSlot) -> SlotState:
        """A stored slot back in the directory; one of an unknown domain follows the default's."""
        errors.require(self._partitions.owns(stored.id), f"{stored.id} misrouted")
        return self._add(stored, self._policies.get(stored.domain, self._policies["default"]))

    def create(self, command: CreateSlot, now_ms: int) -> SlotState:
        if not self._partitions.owns(command.slot_id):
            raise errors.ValidationFailed(
                "slot id does not belong to this shard", {"slotId": "misrouted"}
            )
        if command.slot_id in self.slots:
            raise errors.Conflict("a slot with this id exists")
        policy = self._policies.get(command.domain)
        if policy is None:
            raise errors.ValidationFailed(
                f"unknown domain {command.domain!r}", {"domain": "unknown domain"}
            )
        if not command.resource_id:
            raise errors.ValidationFailed("resourceId is empty", {"resourceId": "empty"})
        self._check_shape(command.start_ms, command.end_ms, command.capacity, now_ms)
        self._check_overlap(command.resource_id, command.start_ms, command.end_ms, None)
        return self._add(
            StoredSlot(
                id=command.slot_id,
                resource_id=command.resource_id,
                domain=command.domain,
                start_ms=command.start_ms,
                end_ms=command.end_ms,
                capacity=command.capacity,
                blocked=command.blocked,
                metadata=pack_metadata(command.metadata),
                version=1,
            ),
            policy,
        )

    def _add(self, stored: StoredSlot, policy: DomainPolicy) -> SlotState:
        slot = SlotState(stored, policy)
        self.slots[slot.id] = slot
        self._by_resource.setdefault(slot.resource_id, set()).add(slot.id)
        self._order.add((slot.start_ms, slot.id))
        self._timers.schedule(("end", slot.id), slot.end_ms)
        return slot

    def update(self, command: UpdateSlot, now_ms: int) -> SlotState:
        """Check and apply the change to the slot's settings; a new version of the slot."""
        slot = self.get(command.slot_id)
        if slot.ended:
            raise errors.SlotNotReservable("the slot has ended and can no longer change")
        start_ms = slot.start_ms if command.start_ms is None else command.start_ms
        end_ms = slot.end_ms if command.end_ms is None else command.end_ms
        capacity = slot.capacity if command.capacity is None else command.capacity
        self._check_shape(start_ms, end_ms, capacity, now_ms)
        if capacity < slot.confirmed + slot.held:
            raise errors.CapacityBelowBookings(
                f"capacity {capacity} is below the {slot.confirmed} confirmed bookings"
                f" and {slot.held} holds",
                {"currentBookings": slot.confirmed, "heldCount": slot.held},
            )
        if (start_ms, end_ms) != (slot.start_ms, slot.end_ms):
            self._check_overlap(slot.resource_id, start_ms, end_ms, slot.id)

        if start_ms != slot.start_ms:
            self._order.remove((slot.start_ms, slot.id))
            self._order.add((start_ms, slot.id))
            slot.start_ms = start_ms
        if end_ms != slot.end_ms:
            slot.end_ms = end_ms
            self._timers.schedule(("end", slot.id), end_ms)
        slot.capacity = capacity
        if command.metadata is not None:
            slot.metadata = pack_metadata(command.metadata)
        if command.blocked is not None:
            slot.blocked = command.blocked
        slot.version += 1
        return slot

    def deletable(self, slot_id: str, force: bool) -> SlotState:
        """The slot a delete may remove: one with active bookings only when forced."""
        slot = self.get(slot_id)
        if slot.active_by_user and not force:
            raise errors.SlotHasBookings(
                "the slot has active bookings; delete with force=true to cancel them",
                {"currentBookings": slot.confirmed, "heldCount": slot.held},
            )
        return slot

    def drop(self, slot: SlotState) -> None:
        """Forget the slot (deleted, or ended past its retention) and its idle timer."""
        self._timers.cancel(("idle", slot.id))
        del self.slots[slot.id]
        self._order.remove((slot.start_ms, slot.id))
        resource_slots = self._by_resource[slot.resource_id]
        resource_slots.discard(slot.id)
        if not resource_slots:
            del self._by_resource[slot.resource_id]
        slot.dirty = False

    def page(self, command: ListSlots, now_ms: int) -> list[SlotState]:
        """The slots a list asks for, by start time, at most its capped limit."""
        limit = max(1, min(command.limit, LIST_LIMIT_MAX))
        if command.after is not None:
            start_index = self._order.bisect_right(command.after)
        elif command.from_ms is not None:
            start_index = self._order.bisect_left((command.from_ms, ""))
        else:
            start_index = 0
        items: list[SlotState] = []
        for start_ms, slot_id in self._order.islice(start_index):
            if command.to_ms is not None and start_ms >= command.to_ms:
                break
            if command.from_ms is not None and start_ms < command.from_ms:
                continue
            slot = self.slots[slot_id]
            if command.resource_id is not None and slot.resource_id != command.resource_id:
                continue
            status = slot.status(now_ms)
            if command.status is not None and status != command.status:
                continue
            if command.available_only and not (status in SLOT_TAKES_HOLDS and slot.available):
                continue
            items.append(slot)
            if len(items) >= limit:
                break
        return items

    def _check_shape(self, start_ms: int, end_ms: int, capacity: int, now_ms: int) -> None:
        problems: dict[str, str] = {}
        if not 1 <= capacity <= SLOT_CAPACITY_MAX:
            problems["capacity"] = f"must be between 1 and {SLOT_CAPACITY_MAX}"
        if end_ms <= start_ms:
            problems["endTime"] = "must be after startTime"
        elif end_ms - start_ms > SLOT_DURATION_MAX_MS:
            problems["endTime"] = "the slot is longer than the longest allowed"
        elif end_ms <= now_ms:
            problems["endTime"] = "is in the past"
        if problems:
            raise errors.ValidationFailed("invalid slot", problems)

    def _check_overlap(
        self, resource_id: str, start_ms: int, end_ms: int, ignore_id: str | None
    ) -> None:
        for other_id in self._by_resource.get(resource_id, ()):
            other = self.slots[other_id]
            if other_id != ignore_id and other.start_ms < end_ms and start_ms < other.end_ms:
                raise errors.SlotOverlap(
                    "the resource already has a slot in this time window",
                    {"conflictingSlotId": other_id},
                )
