"""Persistence's limits: the write-behind writer, the database waits and the lease TTL.

Each value bounds a worst case of storage: how much a shard's writer may hold,
how long a flush, a statement or a shard's load may take, and how long a shard
owner's lease lives. The relations between them that the code relies on are
checked at import (``check``, through the core's ``require_relation``).

``LEASE_TTL_MS`` is here, not with the rest of the lease in
``engine/shell/limits.py``: the reconciliation checks (``persistence/checks.py``)
reason about it too, and persistence may not import the shell. The gateway
reads ``WRITER_PENDING_EVENTS_MAX`` (its health compares a writer's backlog with
it), the one name it takes from here.

This module must never import anything but the core's limits.
"""

from collections.abc import Mapping
from typing import Any, Final

from engine.core.limits import require_relation

# -- the write-behind writer --------------------------------------------------
# Events handed to a shard's writer and not yet committed. Past this the shard
# refuses new changes (503) until the database catches up: a slow database
# slows the engine down instead of growing its memory.
WRITER_PENDING_EVENTS_MAX: Final = 50_000
# One flush (one transaction) carries at most this many events; more pending
# go in the next one. Busy shards reach 400-600 events a flush at 1,000 callers.
WRITER_FLUSH_EVENTS_MAX: Final = 5_000
# One flush (a transaction) may take this long before it counts as failed, and
# its waiting changes get 503 (their outcome unknown: it may have committed).
# A full flush commits in tens of milliseconds; a client that booked waits for
# its flush, so this is what a stalled PostgreSQL adds to an answer at most.
WRITER_FLUSH_TIMEOUT_MS: Final = 2_000
# With tracing on: the traced batches a writer remembers until the flush that
# commits their changes links to them. A flush links to at most the SDK's
# span link limit (128 by default) anyway; past this many waiting (a stalled
# database), the oldest are forgotten rather than memory growing.
WRITER_TRACED_BATCHES_MAX: Final = 4_096

# -- the database ---------------------------------------------------------------
# Opening a connection to PostgreSQL: the server answers in milliseconds, or it
# is down and the shard answers 503 meanwhile anyway.
DATABASE_CONNECT_TIMEOUT_MS: Final = 2_000
# Any other statement of a shard owner (the fence token, a transaction's BEGIN
# and ROLLBACK): each is a short statement, and one that hangs must fail while
# a client still waits.
DATABASE_STATEMENT_TIMEOUT_MS: Final = 2_000
# Loading a shard (its slots, bookings, queues, outcomes and keys) takes seconds
# for a large one; meanwhile the shard answers 503 at once, so this only ends a
# load that hangs, and the owner tries again.
SHARD_LOAD_TIMEOUT_MS: Final = 60_000
# The request outcomes a shard taking a partition over reads of its previous
# shard: the last minute's. A gateway resends a change only within its patience
# (a second) of a failure, and a move step takes seconds at most.
MOVED_OUTCOMES_WINDOW_MS: Final = 60_000

# -- the lease (shared with the shell) -------------------------------------------
# A shard owner's lease in Redis lives this long past its last renewal. The
# shell renews it (LEASE_RENEW_EVERY_MS) and stops taking changes a drift margin
# before it could lapse (LEASE_DRIFT_MARGIN_MS, engine/shell/limits.py).
LEASE_TTL_MS: Final = 10_000


def check(v: Mapping[str, Any]) -> None:
    """Refuse limits ``v`` (a module's names) whose relations the code relies on break."""
    require_relation(
        v["WRITER_FLUSH_EVENTS_MAX"] <= v["WRITER_PENDING_EVENTS_MAX"],
        "WRITER_FLUSH_EVENTS_MAX <= WRITER_PENDING_EVENTS_MAX: the writer holds no more"
        " than the latter, so a larger flush bound would bound nothing",
    )
    require_relation(
        v["WRITER_FLUSH_TIMEOUT_MS"] <= v["DATABASE_STATEMENT_TIMEOUT_MS"],
        "WRITER_FLUSH_TIMEOUT_MS <= DATABASE_STATEMENT_TIMEOUT_MS: a flush is one statement"
        " on the owner's connection, whose statement timeout would otherwise end it first",
    )


check(globals())
