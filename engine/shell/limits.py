"""The shell's limits: batching across the actor boundary, the coalescer, the shard
actors, the lease, Redis calls, rebuilds and the in-memory sink.

Each value bounds a worst case of hosting shards: a batch, the commands waiting
for a shard, a wait on an actor call or on Redis, the memory of an actor. The
relations between them (and with the core's and persistence's limits they
depend on) that the code relies on are checked at import (``check``, through
the core's ``require_relation``).

``REDIS_CALL_TIMEOUT_MS`` and ``RETRY_AFTER_S`` serve the gateway too: they are
here, the lowest layer both the shell and the gateway import. The lease's TTL
is persistence's (``persistence/limits.py``): its checks reason about it too.

This module must never import anything but the core's and persistence's limits.
"""

from collections.abc import Mapping
from typing import Any, Final

# Limits of other layers that the relations below involve (``check`` reads them
# from this module's names).
from engine.core.limits import (
    REQUEST_OUTCOMES_RETENTION_MS,  # noqa: F401
    require_relation,
)
from persistence.limits import LEASE_TTL_MS, SHARD_LOAD_TIMEOUT_MS  # noqa: F401

# -- batching across the actor boundary --------------------------------------
# Measured: batches of 256 reach ~270k ops/s on 2 cores; larger batches add
# latency without adding throughput.
BATCH_COMMANDS_MAX: Final = 256
# Several batches in flight per shard keep the actor busy while the previous
# reply travels back.
BATCHES_IN_FLIGHT_MAX: Final = 4
# Ray's max_pending_calls on a shard actor: callers fail fast past this.
SHARD_PENDING_CALLS_MAX: Final = 64
# Retries of a batch whose actor died mid-call, and the first pause between them
# (it doubles): a connection that broke and came back at once is resent within
# milliseconds, and several resends fit in SHARD_UNAVAILABLE_PATIENCE_MS.
BATCH_RETRIES_MAX: Final = 5
BATCH_RETRY_BACKOFF_MS: Final = 100
# How long a caller keeps resending a batch whose shard cannot be reached (its
# engine process or actor died, restarts, or is still starting) before it
# answers 503: about a second, so that a client learns of the fault at once and
# comes back with its Idempotency-Key, instead of waiting out a restart (an
# engine process's lasts as long as its leases take to lapse). Counted from the
# first failure; every resend's own timeout ends with it too.
SHARD_UNAVAILABLE_PATIENCE_MS: Final = 1_000
# Every wait on an actor call has a limit.
ACTOR_CALL_TIMEOUT_MS: Final = 30_000
# A start waits this long for every shard actor's first answer: a new worker
# process (Ray's and the engine's imports) and its owner's load of the shard (up to
# SHARD_LOAD_TIMEOUT_MS). Seconds on an idle machine; on two cores loaded to a load
# average of 10, more than ACTOR_CALL_TIMEOUT_MS (measured), and a start that gives
# up then only starts again slower.
ACTOR_START_TIMEOUT_MS: Final = 120_000
# What a shard actor asks Ray for: no CPU (it would keep a node's CPU from other
# work and rule out a head started with none), and one MiB of memory, only so that
# its request is not empty: Ray places an actor that asks for nothing on a random
# node, whatever its node affinity (ray-project/ray#25360; measured: soft affinity
# ignored with nothing asked, honoured with this).
ACTOR_MEMORY_ASKED_BYTES: Final = 1 << 20
# A call to an actor on a lost node (a machine gone, a network cut: no connection
# refused) is not failed by Ray until its health checks declare the node dead. So a
# call still unanswered after ACTOR_PROBE_AFTER_MS is followed by a probe of the
# actor (a method with a thread of its own, answered even while the shard's event
# loop works); a probe unanswered within ACTOR_PROBE_TIMEOUT_MS fails the call as
# ShardUnavailable (unless Ray knows the process is gone and restarts it: then Ray
# fails the call itself), and the coalescer resends within its patience. A batch answers
# in milliseconds and a probe of a live process too, even on a loaded machine, so
# half a second each is two orders of magnitude above the usual; a probe that
# answers keeps a slow call (a slow flush, a long start) waiting as before.
ACTOR_PROBE_AFTER_MS: Final = 500
ACTOR_PROBE_TIMEOUT_MS: Final = 500
# A caller whose link to an actor's local socket broke (the actor restarted, say)
# sends through Ray meanwhile, and asks the actor for its socket at most this often.
ACTOR_SOCKET_ASK_MS: Final = 1_000
# The longest a caller waits for a shard whose actor gives no sign of life before
# its 503: the probe's verdict, then the patience of the resends, then a margin
# for the resends' backoff and a loaded event loop.
SHARD_SILENT_ANSWER_MS: Final = (
    ACTOR_PROBE_AFTER_MS + ACTOR_PROBE_TIMEOUT_MS + SHARD_UNAVAILABLE_PATIENCE_MS + 500
)
# Ray's own detection of a lost node, set where the engine starts a Ray head
# (gateway/server.py, docker-compose.yml; docs/operations.md "Ray's health checks"): the
# GCS checks each raylet every period, a check fails after its timeout, and a node
# whose checks fail this many times in a row is dead, its actors restarted
# elsewhere. A silent node is found within threshold * (timeout + period), a node
# whose processes are gone (connection refused) within threshold * period; Ray's
# defaults (3 s, 10 s, 5) take 15 s and 65 s. A raylet must then stay unanswering
# for 1.5 s to be declared dead.
RAY_HEALTH_CHECK_PERIOD_MS: Final = 500
RAY_HEALTH_CHECK_TIMEOUT_MS: Final = 500
RAY_HEALTH_CHECK_FAILURE_THRESHOLD: Final = 3
# How soon a lost node's shards must be served elsewhere: its detection, then the
# restart of its actors (a process, the lease, the load) in what is left.
NODE_FAILOVER_MS: Final = 5_000

# -- the caller-side coalescer ------------------------------------------------
# Commands waiting on the caller's side for one shard: four rounds of full
# batches in flight. A shard that far behind will not catch up by queueing
# more; the caller sheds load (503) instead.
PENDING_COMMANDS_PER_SHARD_MAX: Final = 4 * BATCHES_IN_FLIGHT_MAX * BATCH_COMMANDS_MAX
# A batch that is not full leaves only while fewer than this many batches are
# in flight to its shard; otherwise it waits for a reply and grows. Full batches
# still pipeline up to BATCHES_IN_FLIGHT_MAX. Measured with bench/ray.py on 2
# cores (1,000 callers, 4 shards): 1 gave batches of ~180 commands and the
# lowest p99; 4 gave batches of ~45 and about a quarter fewer operations/s.
PARTIAL_BATCHES_IN_FLIGHT_MAX: Final = 1
# A batch of reads alone waits only for the changes of the slots it reads, not
# for every change in flight: a shard remembers the latest hand-off of each
# changed slot; once it remembers this many, those already durable are
# forgotten.
SLOT_MARKS_PRUNE_AT: Final = 4_096
# Backpressure (PendingCallsLimitExceeded) clears within a call or two, so its
# backoff starts short; it doubles up to the cap and stops at the call timeout.
BUSY_BACKOFF_FIRST_MS: Final = 2
BUSY_BACKOFF_MAX_MS: Final = 100

# -- shard actors -------------------------------------------------------------
# Ray returns a result inline only up to 100 KiB (max_direct_call_object_size);
# past that it goes through the object store and a call costs about 2.5 times
# as much (measured). A full batch of queue answers is ~125 KiB of msgpack and
# compresses about tenfold, so replies above this size travel compressed.
REPLY_COMPRESS_ABOVE_BYTES: Final = 64 * 1024
# Until storage takes the events, an actor keeps only the latest few for
# inspection: an event holds copies of a booking and a slot (~1 KiB each).
ACTOR_RECENT_EVENTS_MAX: Final = 10_000
# A shard allocates a few objects per command and keeps hundreds of thousands
# alive (bookings, timers, remembered outcomes). With CPython's default
# threshold of 700 the collector took more than a tenth of a busy shard's time
# (measured); collecting young objects every 10,000 allocations costs about 3%
# and still reclaims cycles promptly.
GC_GEN0_THRESHOLD: Final = 10_000
# A shard that broke an invariant answers ShardFailed for this long before its
# process exits, so the failing call's answer reaches the caller first.
FATAL_EXIT_DELAY_MS: Final = 1_000
# Ending actors for good (a failed start removing what it created, `slotengine
# cluster stop|reset`): Ray kills a process at once, even a stopped one, and
# reports it dead within a second or two; past this the caller says which did
# not end. While waiting, the actor is asked again this often.
ACTOR_END_TIMEOUT_MS: Final = 20_000
ACTOR_DEATH_POLL_MS: Final = 50
# A graceful stop (`slotengine cluster stop`): the owner's last flush (the
# writer's close waits up to 10 s) and its lease's release, with a margin.
ACTOR_STOP_TIMEOUT_MS: Final = 15_000

# -- Redis, leases, rebuilds ----------------------------------------------------
# Every Redis call (a lease, a fencing token, a publish, a rate limit, an
# idempotency record): Redis answers in a millisecond, so one that has not
# answered in half a second is down or frozen, and the request that needs it
# gets 503 instead of a hang. Well within a lease renewal period. Shared with
# the gateway (rate limits, idempotency records, its Redis clients).
REDIS_CALL_TIMEOUT_MS: Final = 500
# A shard owner's lease renewal period, and the margin for clock drift: an owner
# that could not renew stops taking changes this long before its lease
# (LEASE_TTL_MS, persistence/limits.py) would lapse.
LEASE_RENEW_EVERY_MS: Final = 2_000
LEASE_DRIFT_MARGIN_MS: Final = 2_000
# How long a starting owner waits for a lease another owner still holds.
LEASE_ACQUIRE_TIMEOUT_MS: Final = 60_000
# Pause after a failed attempt to reload a shard (its storage failed, its lease
# was lost); it doubles with each attempt that fails again, up to the most. An
# owner tries until it serves, stops or is closed.
REBUILD_RETRY_MS: Final = 500
REBUILD_RETRY_MAX_MS: Final = 2_000
# After PostgreSQL was unreachable, the holds whose deadline fell after the
# shard's last commit last at least this long after the recovery
# (SLOTENGINE_OUTAGE_HOLD_GRACE_SECONDS, config/settings.py, sets it for a deployment).
OUTAGE_HOLD_GRACE_DEFAULT_MS: Final = 60_000
# Clients told to come back after a 503 wait this many seconds. Shared with the
# gateway (gateway/http.py, gateway/live/endpoints.py).
RETRY_AFTER_S: Final = 1

# -- the shard runtime --------------------------------------------------------
# The in-memory sink serves tests and runs without storage: it keeps the most
# recent events only, so a long run cannot grow it without bound.
MEMORY_SINK_EVENTS_MAX: Final = 100_000
# Pending ``wait_for`` calls on the in-memory sink; each is checked per publish.
MEMORY_SINK_WAITERS_MAX: Final = 1_024

# Not a relation here, on purpose: a flush may outlast its owner's lease. The
# fence in PostgreSQL, not timing, refuses a late flush (docs/durability.md), so
# WRITER_FLUSH_TIMEOUT_MS need not fit inside the lease.


def check(v: Mapping[str, Any]) -> None:
    """Refuse limits ``v`` (a module's names) whose relations the code relies on break."""
    require_relation(
        0 < v["LEASE_DRIFT_MARGIN_MS"] < v["LEASE_TTL_MS"],
        "0 < LEASE_DRIFT_MARGIN_MS < LEASE_TTL_MS: an owner stops taking changes a"
        " margin before its lease could lapse, and ShardLease refuses any other margin",
    )
    require_relation(
        v["REDIS_CALL_TIMEOUT_MS"] < v["LEASE_RENEW_EVERY_MS"],
        "REDIS_CALL_TIMEOUT_MS < LEASE_RENEW_EVERY_MS: a hung renewal must not outlast"
        " a renewal period",
    )
    require_relation(
        v["LEASE_RENEW_EVERY_MS"] + 2 * v["REDIS_CALL_TIMEOUT_MS"]
        < v["LEASE_TTL_MS"] - v["LEASE_DRIFT_MARGIN_MS"],
        "LEASE_RENEW_EVERY_MS + 2 * REDIS_CALL_TIMEOUT_MS < LEASE_TTL_MS -"
        " LEASE_DRIFT_MARGIN_MS: the next renewal (sent a period after the last one"
        " answered, each answer within the timeout) confirms the lease before the"
        " owner's write gate would shut",
    )
    require_relation(
        0 < v["REBUILD_RETRY_MS"] <= v["REBUILD_RETRY_MAX_MS"],
        "0 < REBUILD_RETRY_MS <= REBUILD_RETRY_MAX_MS: the pause between reloads grows"
        " from the first to the most",
    )
    require_relation(
        v["LEASE_ACQUIRE_TIMEOUT_MS"] > v["LEASE_TTL_MS"],
        "LEASE_ACQUIRE_TIMEOUT_MS > LEASE_TTL_MS: a replacement owner waits out a dead"
        " owner's lease instead of giving up before it lapses",
    )
    require_relation(
        v["SHARD_UNAVAILABLE_PATIENCE_MS"] < v["ACTOR_CALL_TIMEOUT_MS"],
        "SHARD_UNAVAILABLE_PATIENCE_MS < ACTOR_CALL_TIMEOUT_MS: a resend's timeout is what"
        " is left of the patience, which must not outlast the limit of any call",
    )
    require_relation(
        v["SHARD_SILENT_ANSWER_MS"] < v["ACTOR_CALL_TIMEOUT_MS"],
        "SHARD_SILENT_ANSWER_MS < ACTOR_CALL_TIMEOUT_MS: a silent actor is given up on"
        " (probe, then the resends' patience) well before a call's own limit",
    )
    require_relation(
        v["RAY_HEALTH_CHECK_FAILURE_THRESHOLD"]
        * (v["RAY_HEALTH_CHECK_TIMEOUT_MS"] + v["RAY_HEALTH_CHECK_PERIOD_MS"])
        <= v["NODE_FAILOVER_MS"] * 3 // 5,
        "RAY_HEALTH_CHECK_FAILURE_THRESHOLD * (RAY_HEALTH_CHECK_TIMEOUT_MS +"
        " RAY_HEALTH_CHECK_PERIOD_MS) <= NODE_FAILOVER_MS * 3 / 5: Ray finds a silent"
        " node in three fifths of the failover time, leaving the rest (2 s) to restart"
        " its shards elsewhere",
    )
    require_relation(
        0 < v["BATCH_RETRY_BACKOFF_MS"] < v["SHARD_UNAVAILABLE_PATIENCE_MS"]
        and v["BATCH_RETRIES_MAX"] >= 1,
        "0 < BATCH_RETRY_BACKOFF_MS < SHARD_UNAVAILABLE_PATIENCE_MS, BATCH_RETRIES_MAX >= 1:"
        " a batch whose actor died is resent at least once",
    )
    require_relation(
        v["BATCH_RETRY_BACKOFF_MS"] * (2 ** v["BATCH_RETRIES_MAX"] - 1) / 2
        >= v["SHARD_UNAVAILABLE_PATIENCE_MS"],
        "BATCH_RETRY_BACKOFF_MS * (2**BATCH_RETRIES_MAX - 1) / 2 >="
        " SHARD_UNAVAILABLE_PATIENCE_MS: even at the shortest jitter (half) the count of"
        " resends does not end them before the patience does",
    )
    require_relation(
        v["REQUEST_OUTCOMES_RETENTION_MS"]
        > v["ACTOR_CALL_TIMEOUT_MS"] + v["SHARD_UNAVAILABLE_PATIENCE_MS"],
        "REQUEST_OUTCOMES_RETENTION_MS > ACTOR_CALL_TIMEOUT_MS +"
        " SHARD_UNAVAILABLE_PATIENCE_MS: a shard remembers a request id longer than"
        " the latest resend of its batch, so a resend never applies twice",
    )
    require_relation(
        1 <= v["PARTIAL_BATCHES_IN_FLIGHT_MAX"] <= v["BATCHES_IN_FLIGHT_MAX"],
        "1 <= PARTIAL_BATCHES_IN_FLIGHT_MAX <= BATCHES_IN_FLIGHT_MAX: at 0 a batch that"
        " is not full would never leave",
    )
    require_relation(
        v["BATCHES_IN_FLIGHT_MAX"] <= v["SHARD_PENDING_CALLS_MAX"],
        "BATCHES_IN_FLIGHT_MAX <= SHARD_PENDING_CALLS_MAX: one caller's batches in"
        " flight must not trip the actor's backpressure by themselves",
    )
    require_relation(
        v["PENDING_COMMANDS_PER_SHARD_MAX"] >= v["BATCHES_IN_FLIGHT_MAX"] * v["BATCH_COMMANDS_MAX"],
        "PENDING_COMMANDS_PER_SHARD_MAX >= BATCHES_IN_FLIGHT_MAX * BATCH_COMMANDS_MAX:"
        " the commands waiting for a shard fill every batch it may have in flight",
    )
    require_relation(
        0 < v["BUSY_BACKOFF_FIRST_MS"] <= v["BUSY_BACKOFF_MAX_MS"],
        "0 < BUSY_BACKOFF_FIRST_MS <= BUSY_BACKOFF_MAX_MS: the backoff doubles from its"
        " first pause (a 0 would spin) up to its cap",
    )
    require_relation(
        v["ACTOR_START_TIMEOUT_MS"] > v["SHARD_LOAD_TIMEOUT_MS"] + v["ACTOR_CALL_TIMEOUT_MS"],
        "ACTOR_START_TIMEOUT_MS > SHARD_LOAD_TIMEOUT_MS + ACTOR_CALL_TIMEOUT_MS: a start"
        " outlasts a shard's load plus a new process's start",
    )


check(globals())
