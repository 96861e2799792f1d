"""Stable routing of ids to partitions, and of partitions to shards.

Every slot of one resource lives in the same partition, so that the rule
"slots of a resource never overlap" is checked by a single writer. The
partition is chosen by a 32-bit routing key hashed from the resource id and
written into every id the engine hands out: a slot id and the ids of its
bookings all start with it, so any id routes without a lookup, and an id's
partition (``routing key % P``) never changes, P being fixed when the database
is created (``persistence/partitioning.py`` records it).

    slot id:    "<routing key, 8 hex>-s<random hex>"
    booking id: "<routing key, 8 hex>-b<random hex>"

Partitions are assigned to shards (the single writers: an in-process shard or
a Ray actor) by a ``PartitionMap``, stored with a version in PostgreSQL; a
shard serves the ``PartitionSet`` the map gives it. This module owns the
arithmetic of both; it must never read or decide the stored map.
"""

import hashlib
import re
from typing import Final

import msgspec

_ID_PATTERN: Final = re.compile(r"^([0-9a-f]{8})-[sb][0-9a-zA-Z_-]{1,100}$")


def routing_key(resource_id: str) -> int:
    """A stable 32-bit hash of the resource id (the same in every process)."""
    return int.from_bytes(hashlib.blake2b(resource_id.encode(), digest_size=4).digest(), "big")


def make_slot_id(resource_id: str, unique: str) -> str:
    return f"{routing_key(resource_id):08x}-s{unique}"


def make_booking_id(slot_id: str, unique: str) -> str:
    return f"{slot_id[:8]}-b{unique}"


def shard_of(entity_id: str, shard_count: int) -> int | None:
    """The shard owning a slot or booking id, or None for an id the engine never issued."""
    match = _ID_PATTERN.match(entity_id)
    if match is None:
        return None
    return int(match.group(1), 16) % shard_count


def shard_of_resource(resource_id: str, shard_count: int) -> int:
    return routing_key(resource_id) % shard_count


# P for a database created without SLOTENGINE_PARTITIONS: enough for a big
# cluster (4,096 partitions over 64 shard actors is 64 each, moved one at a time),
# and a power of two, so that for any shard count dividing it the spread map
# sends every slot to the shard ``routing key % shards`` chose before partitions.
PARTITIONS_DEFAULT: Final = 4096
PARTITIONS_MAX: Final = 65_536


def partition_of(entity_id: str, partitions: int) -> int | None:
    """The partition of a slot or booking id, or None for an id the engine never issued."""
    return shard_of(entity_id, partitions)


def outcome_partition(result: object, partitions: int) -> int | None:
    """The partition a remembered outcome moves with: that of the slot its result
    names (a booking's, a queue place's, a slot's); None for a result that names
    none (a 204, a refusal), which stays with the shard that decided it. Worked
    out when a partition moves, never on the path of a command."""
    slot_id = getattr(getattr(result, "booking", None), "slot_id", None)
    if slot_id is None:
        slot_id = getattr(getattr(result, "entry", None), "slot_id", None)
    if slot_id is None:
        slot_id = getattr(getattr(result, "slot", None), "id", None)
    return None if not isinstance(slot_id, str) else partition_of(slot_id, partitions)


def partition_of_resource(resource_id: str, partitions: int) -> int:
    return routing_key(resource_id) % partitions


class PartitionSet(msgspec.Struct, frozen=True):
    """The partitions one shard serves, of ``partitions`` in all."""

    partitions: int
    owned: frozenset[int]

    @classmethod
    def single(cls, shard_id: int, shard_count: int) -> "PartitionSet":
        """One partition per shard (P = the shard count): the layout before partitions."""
        return cls(shard_count, frozenset((shard_id,)))

    def owns(self, entity_id: str) -> bool:
        return partition_of(entity_id, self.partitions) in self.owned


class PartitionMap(msgspec.Struct, frozen=True):
    """Which shard serves each partition: ``owners[p]``, at a stored ``version``."""

    owners: tuple[int, ...]
    version: int = 0

    @property
    def partitions(self) -> int:
        return len(self.owners)

    @property
    def shard_count(self) -> int:
        return max(self.owners) + 1

    @classmethod
    def spread(cls, partitions: int, shard_count: int, version: int = 0) -> "PartitionMap":
        """Partition p on shard ``p % shard_count``: even, and for a shard count that
        divides P every slot stays on the shard it had before partitions."""
        if not 1 <= shard_count <= partitions:
            raise ValueError(f"{shard_count} shards cannot share {partitions} partitions")
        return cls(tuple(p % shard_count for p in range(partitions)), version)

    def shard_of(self, entity_id: str) -> int | None:
        partition = partition_of(entity_id, len(self.owners))
        return None if partition is None else self.owners[partition]

    def shard_of_resource(self, resource_id: str) -> int:
        return self.owners[partition_of_resource(resource_id, len(self.owners))]

    def owned_by(self, shard: int) -> PartitionSet:
        return PartitionSet(
            len(self.owners), frozenset(p for p, owner in enumerate(self.owners) if owner == shard)
        )

    def counts(self) -> dict[int, int]:
        """Partitions per shard."""
        counts: dict[int, int] = {}
        for owner in self.owners:
            counts[owner] = counts.get(owner, 0) + 1
        return counts

    def respread(self, shard_count: int) -> "PartitionMap":
        """The map over shards ``0..shard_count-1`` that moves the fewest partitions:
        each shard keeps up to its fair share (P // shard_count, one more for the
        first P % shard_count shards) of what it has, and the rest go to the shards
        below their share. The version is unchanged (the store bumps it)."""
        partitions = len(self.owners)
        if not 1 <= shard_count <= partitions:
            raise ValueError(f"{shard_count} shards cannot share {partitions} partitions")
        base, extra = divmod(partitions, shard_count)
        share = [base + (1 if shard < extra else 0) for shard in range(shard_count)]
        kept = [0] * shard_count
        owners = list(self.owners)
        loose: list[int] = []
        for p, owner in enumerate(owners):
            if owner < shard_count and kept[owner] < share[owner]:
                kept[owner] += 1
            else:
                loose.append(p)
        shard = 0
        for p in loose:
            while kept[shard] >= share[shard]:
                shard += 1
            owners[p] = shard
            kept[shard] += 1
        return PartitionMap(tuple(owners), self.version)

    def moved(self, other: "PartitionMap") -> dict[int, tuple[int, int]]:
        """The partitions that ``other`` assigns elsewhere: partition -> (from, to)."""
        return {
            p: (before, after)
            for p, (before, after) in enumerate(zip(self.owners, other.owners, strict=True))
            if before != after
        }
