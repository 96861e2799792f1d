"""The fingerprint of a command: what a client's Idempotency-Key stands for.

Owns ``fingerprint``, the one definition of "the same request" that the shard's
idempotency memory (``engine/core/remembered.py``) and the gateway's
cross-shard key registry (``gateway/idempotency.py``) both use, so that the two
can never disagree. It must never import more than the protocol: the gateway
imports it without importing the shard.
"""

import msgspec
from msgspec import UNSET

from engine.core.protocol import AnyCommand


def fingerprint(command: AnyCommand) -> bytes:
    """The request a command stands for: all of it but its request id, idempotency key
    and origin (unset, it is not encoded: fingerprints are those of before it existed)."""
    neutral = msgspec.structs.replace(command, request_id="", idempotency_key=None, origin=UNSET)
    return msgspec.msgpack.encode(neutral)
