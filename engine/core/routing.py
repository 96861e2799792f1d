"""Stable routing of ids to shards.

Every slot of one resource lives on the same shard, so that the rule "slots of
a resource never overlap" is checked by a single writer. The shard is chosen by
a 32-bit routing key hashed from the resource id and written into every id the
engine hands out: a slot id and the ids of its bookings all start with it, so
any id routes without a lookup, and the mapping never changes for a given
shard count.

    slot id:    "<routing key, 8 hex>-s<random hex>"
    booking id: "<routing key, 8 hex>-b<random hex>"
"""

import hashlib
import re
from typing import Final

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
