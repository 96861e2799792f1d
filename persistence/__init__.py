"""Durable state in PostgreSQL: migrations, write-behind group commit, recovery, fencing.

It will own the schema and the batched writer a shard's events go to, the
reload of a shard's state after a restart, the reconciliation checks and
repairs, and the retention purge. It must never change booking state on its
own: it records what the shards decided and hands it back to them when they
start.

``persistence.services`` starts, finds and stops the PostgreSQL and Redis
servers themselves: the embedded default, the tests' private servers and
CI's, one implementation for all three.
"""
