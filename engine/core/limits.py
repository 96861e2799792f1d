"""Every limit of the engine, in one place, with its unit last in the name.

A limit is a promise about the worst case: each queue, batch, buffer, table
and wait in the engine is bounded by one of these. Settings may narrow a
default (the domain's queue size, the hold TTL) but never go past a ``*_MAX``.
"""

from typing import Final

# -- time ------------------------------------------------------------------
# One tick of the timer wheel. Deadlines are whole milliseconds, so a 1 ms tick
# makes expiry exact: a timer fires at its deadline, never before, and the
# shell decides how late (it wakes at the wheel's next deadline).
TIMER_TICK_MS: Final = 1
# 64 buckets a level (6 bits) keeps a level's scan cheap; 7 levels cover
# 64**7 ms (about 139 years), so nothing ever lands in an overflow list.
TIMER_WHEEL_BUCKETS: Final = 64
TIMER_WHEEL_LEVELS: Final = 7

# -- holds and queues (defaults from the specification) ---------------------
HOLD_TTL_DEFAULT_S: Final = 120
CLAIM_TTL_DEFAULT_S: Final = 120
# A hold shorter than a second cannot be confirmed by a human; longer than a
# day is a booking, not a hold.
HOLD_TTL_MIN_S: Final = 1
HOLD_TTL_MAX_S: Final = 86_400
QUEUE_SIZE_DEFAULT: Final = 100
# The position structure is O(log n); this cap bounds memory per slot.
QUEUE_SIZE_MAX: Final = 100_000
QUEUE_INACTIVITY_DEFAULT_S: Final = 14_400
QUEUE_INACTIVITY_MAX_S: Final = 30 * 86_400
# How many recent queue advances feed the wait estimate (a moving window).
WAIT_ESTIMATE_SAMPLES_MAX: Final = 32

# -- slots -------------------------------------------------------------------
SLOT_CAPACITY_MAX: Final = 100_000
ADVANCE_BOOKING_DAYS_DEFAULT: Final = 365
ADVANCE_BOOKING_DAYS_MAX: Final = 3_650
# A slot may not last longer than this (a week is already generous).
SLOT_DURATION_MAX_MS: Final = 7 * 86_400_000
# Metadata is a few labels for display (a room, a language), not a document;
# measured as its compact JSON encoding.
SLOT_METADATA_BYTES_MAX: Final = 4_096
# Nesting of any JSON a client sends (a body, a slot's metadata): decoders and
# checks recurse once a level, and no booking needs more than a few levels.
JSON_DEPTH_MAX: Final = 32
ID_CHARS_MAX: Final = 128
CANCEL_REASON_CHARS_MAX: Final = 500
# The longest string a shard stores from a command (a cancellation's reason: up to
# CANCEL_REASON_CHARS_MAX): a btree index row holds at most ~2.7 kB, and a user id
# and an idempotency key share one (4 bytes a character at worst). Room above the
# API's own limits (ids 128 characters, an admin actor "admin:" and one, keys 200).
COMMAND_TEXT_CHARS_MAX: Final = 256

# -- idempotency and retries -----------------------------------------------
# Client Idempotency-Keys are kept at least 24 h (docs/api.md).
IDEMPOTENCY_RETENTION_MS: Final = 24 * 3_600_000
IDEMPOTENCY_KEY_CHARS_MAX: Final = 200
# A key record costs ~600 B in a shard's memory (measured), so this bounds it
# near 120 MB; under a flood of keyed requests the oldest keys go before 24 h
# unless storage keeps them.
IDEMPOTENCY_RECORDS_MAX: Final = 200_000
# Outcomes by request id, so that a batch retried across an actor failure
# never applies twice. Ten minutes covers every retry the coalescer makes.
REQUEST_OUTCOMES_RETENTION_MS: Final = 10 * 60_000
REQUEST_OUTCOMES_MAX: Final = 200_000

# -- memory of finished work -------------------------------------------------
# Final bookings (EXPIRED, CANCELLED, COMPLETED) stay readable in memory this
# long, then only the database has them.
FINAL_BOOKING_RETENTION_MS: Final = 24 * 3_600_000
# An ended slot stays in memory this long after its end time.
ENDED_SLOT_RETENTION_MS: Final = 24 * 3_600_000

# -- batching across the actor boundary --------------------------------------
# Measured: batches of 256 reach ~270k ops/s on 2 cores; larger batches add
# latency without adding throughput.
BATCH_COMMANDS_MAX: Final = 256
# Several batches in flight per shard keep the actor busy while the previous
# reply travels back.
BATCHES_IN_FLIGHT_MAX: Final = 4
# Ray's max_pending_calls on a shard actor: callers fail fast past this.
SHARD_PENDING_CALLS_MAX: Final = 64
SHARDS_DEFAULT: Final = 4
SHARDS_MAX: Final = 1_024
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

# -- listing -----------------------------------------------------------------
LIST_LIMIT_DEFAULT: Final = 50
LIST_LIMIT_MAX: Final = 200

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

# -- storage: write-behind, leases -------------------------------------------
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
# Every Redis call (a lease, a fencing token, a publish, a rate limit, an
# idempotency record): Redis answers in a millisecond, so one that has not
# answered in half a second is down or frozen, and the request that needs it
# gets 503 instead of a hang. Well within a lease renewal period.
REDIS_CALL_TIMEOUT_MS: Final = 500
# A shard owner's lease in Redis, its renewal period, and the margin for clock
# drift: an owner that could not renew stops taking changes this long before
# its lease would lapse.
LEASE_TTL_MS: Final = 10_000
LEASE_RENEW_EVERY_MS: Final = 2_000
LEASE_DRIFT_MARGIN_MS: Final = 2_000
# How long a starting owner waits for a lease another owner still holds.
LEASE_ACQUIRE_TIMEOUT_MS: Final = 60_000
# Pause between attempts to rebuild a shard whose storage failed.
REBUILD_RETRY_MS: Final = 500
# Clients told to come back after a 503 wait this many seconds.
RETRY_AFTER_S: Final = 1

# -- the shard runtime --------------------------------------------------------
# The in-memory sink serves tests and runs without storage: it keeps the most
# recent events only, so a long run cannot grow it without bound.
MEMORY_SINK_EVENTS_MAX: Final = 100_000
# Pending ``wait_for`` calls on the in-memory sink; each is checked per publish.
MEMORY_SINK_WAITERS_MAX: Final = 1_024
