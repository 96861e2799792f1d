"""Every name the engine keeps in Redis: keys, channels, and the topics in its messages.

One deployment's names all start with its namespace ``{ns}``: ``slotengine:``
and a digest of its database (``persistence.migrate.deployment_namespace``), or
``slotengine`` alone where none is given (tests, tools). So deployments
sharing one Redis never see each other's keys.

Each name: its type; who writes it; who reads it; when it expires.

- ``{ns}:shard:{n}:owner``, string: shard ``n``'s lease, its owner's id.
  Written by the owner taking or renewing it (``engine/shell/lease.py``,
  ``SET NX PX``); read by owners (``engine/shell/owner.py``) and ``slotengine
  reconcile`` (``engine/cli.py``). Expires with the lease TTL unless renewed.
- ``{ns}:shard:{n}:token``, counter: shard ``n``'s fencing tokens (``INCR``
  by the owner taking the lease, in the same script). Never expires: it only
  grows.
- ``{ns}:shard:{n}:storage_lost``, string: since when (ms) shard ``n`` has
  committed nothing because PostgreSQL was unreachable. Set (``NX``: the
  earliest stays) by an owner whose flush failed; read and deleted by the owner
  that reloads the shard once PostgreSQL answers, which gives the holds whose
  deadline fell since then their grace (``engine/shell/owner.py``). Never
  expires: it is deleted once the grace is granted.
- ``{ns}:events:shard:{n}``, channel: shard ``n``'s committed events, one
  message a flush. Published by the shard (``engine/shell/events.py``);
  subscribed by every gateway's bus (``gateway/live/bus.py``).
- ``{ns}:events:bus``, channel: nobody publishes; every gateway's bus
  subscribes so that its connection stays subscribed with no watch.
- ``{ns}:rl:{endpoint}:{user}``, string: a user's rate-limit state (GCRA's
  ``TAT``) on one endpoint, written and read by ``gateway/ratelimit.py``.
  Expires when its ``TAT`` is reached (``PX``).
- ``{ns}:idem:{endpoint}:{len(user)}:{user}:{key}``, string: the fingerprint
  of the request an ``Idempotency-Key`` stands for, written and read by
  ``gateway/idempotency.py``. Expires after 24 h (``EX``).
- ``{ns}:live:{user}``, sorted set: a user's places for live connections,
  written and read by ``gateway/connlimit.py``. Expires with its last place.

Inside a message on a shard's channel each event is tagged with topics, not
keys: ``s:{slot id}`` (every event of a slot) and ``u:{user id}`` (a
booking's user); a gateway decodes only the events whose topic it watches.

These names are a contract with every running deployment: renaming one
strands what Redis holds (a lease another version would not see), so each
name is pinned by a test (``tests/config/test_redis_keys.py``), which also
finds any module that builds a name outside this one.

Why in ``config``: the shell, persistence, the gateway and the CLI all name
keys, and ``config`` is the one package all of them may import (the pure core
may not, and needs no Redis name). Prefixes are computed once per namespace
(``RedisKeys``), so the per-request names cost one f-string as before.

This module must never talk to Redis or import anything: it only names.
"""

from typing import Final

# The first part of every namespace; alone, the namespace used where none is given.
NAMESPACE_DEFAULT: Final = "slotengine"


def namespace_for_database(digest: str) -> str:
    """The namespace of the deployment whose database ``digest`` names."""
    return f"{NAMESPACE_DEFAULT}:{digest}"


def slot_topic(slot_id: str) -> str:
    """The topic, inside a shard's message, of every event of a slot."""
    return f"s:{slot_id}"


def user_topic(user_id: str) -> str:
    """The topic, inside a shard's message, of a booking's events for its user."""
    return f"u:{user_id}"


# Published on ``RedisKeys.bus_channel`` once the partition map has changed (a live
# move): every gateway reads the map again.
MAP_CHANGED: Final = b"partition-map-changed"


class RedisKeys:
    """The names of one namespace; build one per component (its prefixes once)."""

    __slots__ = ("_events", "_idem", "_live", "_rl", "_shard", "bus_channel", "namespace")

    def __init__(self, namespace: str = NAMESPACE_DEFAULT) -> None:
        self.namespace: Final = namespace
        self._shard: Final = f"{namespace}:shard"
        self._events: Final = f"{namespace}:events:shard"
        self._rl: Final = f"{namespace}:rl"
        self._idem: Final = f"{namespace}:idem"
        self._live: Final = f"{namespace}:live"
        # Subscribed by every gateway's bus so that its connection stays
        # subscribed when no watch needs a shard; the deployment's notices to every
        # gateway (``MAP_CHANGED``) are published on it.
        self.bus_channel: Final = f"{namespace}:events:bus"

    def __repr__(self) -> str:
        return f"RedisKeys({self.namespace!r})"

    def shard_owner(self, shard: int) -> str:
        """A shard's lease: the owner's id, set with a TTL and renewed while held."""
        return f"{self._shard}:{shard}:owner"

    def shard_token(self, shard: int) -> str:
        """A shard's fencing counter: only grows, never expires."""
        return f"{self._shard}:{shard}:token"

    def shard_storage_lost(self, shard: int) -> str:
        """Since when a shard has committed nothing for want of PostgreSQL (ms)."""
        return f"{self._shard}:{shard}:storage_lost"

    @property
    def rebalance_claim(self) -> str:
        """Held (with a TTL) by the one gateway rebalancing the deployment's actors."""
        return f"{self.namespace}:rebalance"

    def shard_events(self, shard: int) -> str:
        """The channel of a shard's committed events."""
        return f"{self._events}:{shard}"

    def rate_limit(self, endpoint: str, user_id: str) -> str:
        """A user's GCRA state on one endpoint (the user last: no two users share one)."""
        return f"{self._rl}:{endpoint}:{user_id}"

    def idempotency(self, endpoint: str, user_id: str, key: str) -> str:
        """What a user's ``Idempotency-Key`` stands for on one endpoint.

        User ids and keys may both contain ":": the user's length in front
        keeps (user "x:y", key "k") and (user "x", key "y:k") apart.
        """
        return f"{self._idem}:{endpoint}:{len(user_id)}:{user_id}:{key}"

    def live_connections(self, user_id: str) -> str:
        """A user's places for live connections, across every gateway."""
        return f"{self._live}:{user_id}"
