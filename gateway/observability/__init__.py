"""Operations endpoints: ``GET /health`` and ``GET /metrics`` (docs/api.md, "Operations").

The modules: ``metrics`` (the gateway's own series, timing of Redis and
database calls, the observer ``request_context`` tells of every answer),
``sampler`` (the engine's statistics and series), ``health`` (the probes of
the services and ``/health``), ``endpoints`` (``/metrics`` and
``add_observability``, which wires them into an app). They build on
``gateway.http`` and never on the routes or the live updates; none of them
ever changes engine state.

Wiring (``gateway.observability.endpoints.add_observability``, after
``create_app``, before the app starts)::

    app = create_app(engine, verifier)
    add_observability(
        app, engine=engine, transport=transport, database_url=..., redis_url=...
    )

``engine`` and ``transport`` may be None when they are only known on startup:
they are then read from ``app[ENGINE_KEY]`` / ``app[TRANSPORT_KEY]`` at request
time. Service URLs resolved on startup are given later with
``app[OBSERVABILITY_KEY].configure(database_url=..., redis_url=...)``.

Metrics live in a registry of the application's own (``app[METRICS_KEY]``),
never in prometheus-client's global one, so several apps in one process
(tests, workers) do not collide. Every label takes a bounded set of values:

- ``booking_reservations_total{status,outcome}``: answers of
  ``POST /api/bookings/reserve``. ``status`` is ``created`` (201),
  ``existing`` (200 with the user's hold), ``queued`` (202),
  ``already_queued`` (200 with the user's queue entry), else the API error
  code (``SlotFull``, ``QueueFull``, ``RateLimited``, ...; at most
  ``ERROR_CODES_MAX`` distinct codes, then ``other``). ``outcome`` is
  ``success``, ``queued`` or ``failure``.
- ``booking_confirmations_total``: ``POST /api/bookings/{booking_id}/confirm``
  answered 200 with a ``confirmedAt`` no earlier than the request's arrival
  (less ``CONFIRM_CLOCK_SKEW_S`` for clocks of other hosts), once per booking:
  a repeated confirm of a CONFIRMED booking (200, unchanged) or an idempotent
  replay is not counted again. Repeats soon after the first are recognised by
  the booking ids counted in the last ``CONFIRMED_IDS_KEPT_S`` seconds, later
  ones by their old ``confirmedAt``; only a repeat sent within the margin to
  another gateway counts twice.
- ``booking_expirations_total{shard}``: holds the engine expired (its shards'
  ``expirations_total``); a shard's count restarts at 0 when its owner
  reloads, which Prometheus treats as a counter reset.
- ``queue_waiting{shard}``: WAITING entries per shard (exact).
- ``queue_length{slot_id}``: the ``QUEUE_TOP_N`` longest queues. Found by
  paging ``ListSlots`` through shards that have anyone waiting, at most once
  per ``QUEUE_SCAN_EVERY_S`` and at most ``QUEUE_SCAN_SLOTS_MAX`` slots per
  shard (in start-time order): exact below that many slots per shard, the
  soonest slots' queues above it. ``queue_waiting`` stays exact.
- ``average_wait_time_seconds``: the mean ``estimatedWaitSeconds`` of the
  WAITING queue entries this gateway answered (reserve, join, position) in the
  last ``WAIT_WINDOW_S`` seconds; 0 when it answered none.
- ``engine_shard_up{shard}``: 1 when the shard answered its last statistics.
- Per shard actor, from what its owner says of itself (label ``shard`` only;
  left out for a shard that did not answer):
  ``engine_shard_owner_state{shard,state}`` (1 for the owner's state, 0 for
  the other states of ``OwnerState``), ``engine_shard_in_flight_commands``
  (applied, their replies waiting for the commit),
  ``engine_shard_lease_valid_seconds``, ``engine_shard_fence_token``,
  ``engine_shard_rebuilds_total``, ``engine_shard_partitions``, ``engine_shard_pending_events``,
  ``engine_shard_flush_lag_seconds`` (the age of the oldest change not
  committed yet, 0 when none) and ``engine_shard_last_flush_age_seconds``
  (since the writer's last commit; absent before the first).
- ``http_request_duration_seconds{endpoint,method,status}``: ``endpoint`` is
  the route's template (``/api/bookings/{booking_id}/confirm``), ``unmatched``
  for requests no route takes. WebSocket and event-stream answers are not
  observed (their duration is a connection's lifetime).
- ``redis_operation_duration_seconds{operation}`` and
  ``database_query_duration_seconds{query_type}``: the durations of the
  engine's real Redis operations and database statements
  (``persistence/timings.py`` names them). This gateway's own (rate limits,
  idempotency keys, live connection places, the health probes, whatever is
  timed through ``observe_redis(operation)`` / ``observe_database(query_type)``,
  whose labels must be constant identifiers) carry no ``shard``; each shard
  actor's (its lease, its publishes, its flushes, loads, partition moves and
  maintenance) carry ``shard``, from its owner's statistics.
- Per shard actor: ``engine_shard_flush_events{shard}``,
  ``engine_shard_flush_rows{shard}`` and ``engine_shard_commit_lag_seconds{shard}``
  (histograms: a flush's size, and the time from its first change to its
  commit), ``engine_shard_db_connections{shard,state}`` (the owner's
  PostgreSQL connections: ``in_use``, ``idle``, ``max``).

The engine's series (expirations, queue sizes, shard up, the actors' facts) are the engine's,
not this gateway's: every gateway of a deployment reports the same values, so
aggregate them with ``max by (shard)`` (or ``max by (slot_id)``), not ``sum``.
They are fetched before a scrape is rendered (awaited, never blocking the
loop) and reused for ``STATISTICS_MAX_AGE_S``; a shard that does not answer
keeps its last values and reads ``engine_shard_up 0``.

``/health`` runs its checks concurrently, each within ``CHECK_TIMEOUT_S``:

- ``database``: ``SELECT 1`` on one connection, opened on first use and kept.
- ``redis``: ``PING``.
- ``engine``: every shard answers ``statistics`` through the transport and,
  where the host reports its owners, every owner is SERVING.
- ``queue``: the engine's background work on every shard: its runtime has not
  failed, the timer that expires holds and offers places is armed for the next
  deadline, and (where owners are reported) the write-behind writer has not
  failed nor been fenced and is not so far behind that changes are refused.

200 ``healthy`` when all are up; 503 ``unhealthy`` when the database or the
engine is down (nothing can be booked), 503 ``degraded`` when only Redis or
the queue is down (reads go on; new changes may be refused). A 503 carries
``retryAfter`` and ``Retry-After``. A component whose URL is not configured
reads ``down``. Either answer lists ``shards``: a line per shard actor (its
owner's state and token, lease validity, commands in flight, pending events,
flush lag, time since its last commit), from the same sample as the verdict,
which it never changes.
"""
