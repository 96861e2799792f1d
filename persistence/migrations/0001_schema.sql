-- The engine's tables. PostgreSQL is the source of truth: shard actors hold
-- the working copy in memory and write every change here (write-behind, one
-- transaction per flush) before they acknowledge it.
--
-- Times are epoch milliseconds (bigint), exactly as the engine keeps them.
-- The database keeps its own safety nets, so a bug in the engine, or a row
-- written by hand, cannot double-book:
--   * no two live slots of one resource overlap (exclusion constraint);
--   * one active (RESERVED or CONFIRMED) booking per user and slot (partial
--     unique index);
--   * a slot's confirmed + held bookings never exceed its capacity (counts kept
--     by statement triggers on bookings, checked by a CHECK on slots);
--   * capacity > 0, end > start, statuses from the state machine only;
--   * the audit log is append-only (only the retention purge may delete).

CREATE TABLE slots (
    id              text PRIMARY KEY,
    shard           integer NOT NULL CHECK (shard >= 0),
    resource_id     text NOT NULL CHECK (resource_id <> ''),
    domain          text NOT NULL,
    start_ms        bigint NOT NULL,
    end_ms          bigint NOT NULL,
    capacity        integer NOT NULL,
    blocked         boolean NOT NULL DEFAULT false,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    version         integer NOT NULL DEFAULT 1,
    created_at_ms   bigint NOT NULL,
    updated_at_ms   bigint NOT NULL,
    deleted_at_ms   bigint,
    -- Kept by the triggers on bookings, never written by the engine.
    confirmed_count integer NOT NULL DEFAULT 0,
    held_count      integer NOT NULL DEFAULT 0,
    CONSTRAINT slots_capacity_positive CHECK (capacity > 0),
    CONSTRAINT slots_end_after_start CHECK (end_ms > start_ms),
    CONSTRAINT slots_counts_not_negative CHECK (confirmed_count >= 0 AND held_count >= 0),
    CONSTRAINT slots_within_capacity CHECK (confirmed_count + held_count <= capacity)
) WITH (fillfactor = 70);  -- room for the count updates to stay HOT

-- No two live slots of one resource overlap. Deferred: one flush may move a
-- slot away and put another in its place. With btree_gist (any PostgreSQL with
-- its contrib modules) it is the textbook constraint; a server without them
-- (the embedded build) gets the same rule on the built-in box type: a slot is
-- a segment at x = a 53-bit hash of its resource, from its start to just
-- before its end, so segments meet only for one resource and overlapping
-- times (a hash collision would refuse a legitimate slot, about 1 in 2^53 per
-- pair of resources).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'btree_gist') THEN
        CREATE EXTENSION IF NOT EXISTS btree_gist;
        ALTER TABLE slots ADD CONSTRAINT slots_no_overlap EXCLUDE USING gist (
            resource_id WITH =,
            int8range(start_ms, end_ms) WITH &&
        ) WHERE (deleted_at_ms IS NULL) DEFERRABLE INITIALLY DEFERRED;
    ELSE
        ALTER TABLE slots ADD CONSTRAINT slots_no_overlap EXCLUDE USING gist (
            box(
                point((hashtextextended(resource_id, 0) >> 11)::float8, start_ms::float8),
                point((hashtextextended(resource_id, 0) >> 11)::float8, end_ms::float8 - 0.5)
            ) WITH &&
        ) WHERE (deleted_at_ms IS NULL) DEFERRABLE INITIALLY DEFERRED;
    END IF;
END
$$;
CREATE INDEX slots_by_shard ON slots (shard, end_ms) WHERE deleted_at_ms IS NULL;
CREATE INDEX slots_by_start ON slots (start_ms, id) WHERE deleted_at_ms IS NULL;
CREATE INDEX slots_by_resource ON slots (resource_id, start_ms) WHERE deleted_at_ms IS NULL;

CREATE TABLE bookings (
    id                text PRIMARY KEY,
    -- No foreign key: the writer inserts a slot before its bookings in the same
    -- transaction, a key check per booking cost ~40% of an insert (measured), and
    -- reconciliation reports any booking whose slot is missing.
    slot_id           text NOT NULL,
    user_id           text NOT NULL,
    status            text NOT NULL CONSTRAINT bookings_status_known
        CHECK (status IN ('RESERVED', 'CONFIRMED', 'EXPIRED', 'CANCELLED', 'COMPLETED')),
    reserved_at_ms    bigint NOT NULL,
    expires_at_ms     bigint NOT NULL,
    confirmed_at_ms   bigint,
    completed_at_ms   bigint,
    cancelled_at_ms   bigint,
    cancel_reason     text,
    cancelled_by      text,
    refund_percentage smallint CHECK (refund_percentage BETWEEN 0 AND 100),
    via_queue         boolean NOT NULL DEFAULT false,
    version           integer NOT NULL DEFAULT 1,
    updated_at_ms     bigint NOT NULL,
    CONSTRAINT bookings_hold_after_reserve CHECK (expires_at_ms > reserved_at_ms)
);
CREATE UNIQUE INDEX bookings_one_active_per_user_slot
    ON bookings (user_id, slot_id) WHERE status IN ('RESERVED', 'CONFIRMED');
CREATE INDEX bookings_by_user ON bookings (user_id, reserved_at_ms DESC, id DESC);
CREATE INDEX bookings_by_slot ON bookings (slot_id, status);
CREATE INDEX bookings_holds_by_deadline ON bookings (expires_at_ms) WHERE status = 'RESERVED';

CREATE TABLE queue_entries (
    slot_id        text NOT NULL,  -- no foreign key, as for bookings
    user_id        text NOT NULL,
    seq            bigint NOT NULL CHECK (seq > 0),
    status         text NOT NULL CONSTRAINT queue_entries_status_known
        CHECK (status IN ('WAITING', 'NOTIFIED', 'EXPIRED', 'CONVERTED')),
    joined_at_ms   bigint NOT NULL,
    last_seen_ms   bigint NOT NULL,
    notified_at_ms bigint,
    booking_id     text,
    ended_at_ms    bigint,
    version        integer NOT NULL DEFAULT 1,
    updated_at_ms  bigint NOT NULL,
    PRIMARY KEY (slot_id, user_id),
    CONSTRAINT queue_entries_seq_unique UNIQUE (slot_id, seq),
    CONSTRAINT queue_entries_notified_has_booking
        CHECK (status <> 'NOTIFIED' OR booking_id IS NOT NULL)
);
CREATE INDEX queue_entries_waiting ON queue_entries (slot_id, seq) WHERE status = 'WAITING';
CREATE INDEX queue_entries_by_user ON queue_entries (user_id);

-- Append-only: one row per transition of a booking or queue entry and per
-- slot change. Only the retention purge (purge_audit_log) deletes.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms       bigint NOT NULL,
    shard       integer NOT NULL,
    request_id  text NOT NULL,
    actor       text NOT NULL,
    entity      text NOT NULL CHECK (entity IN ('booking', 'queue', 'slot')),
    entity_id   text NOT NULL,
    slot_id     text NOT NULL,
    user_id     text,
    from_status text,
    to_status   text,
    trigger     text NOT NULL,
    details     jsonb
);
CREATE INDEX audit_log_by_entity ON audit_log (entity_id, id);
CREATE INDEX audit_log_by_time ON audit_log USING brin (at_ms);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    caller text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- Only from inside purge_audit_log (the call stack says so; a setting
        -- any session may change would not).
        GET DIAGNOSTICS caller = PG_CONTEXT;
        IF caller LIKE '%function purge_audit_log(bigint,integer)%' THEN
            RETURN OLD;
        END IF;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Deletes audit rows older than the cut-off, at most batch_rows of them;
-- returns how many went. The only way rows leave the audit log.
CREATE FUNCTION purge_audit_log(older_than_ms bigint, batch_rows integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    purged bigint;
BEGIN
    DELETE FROM audit_log
     WHERE id IN (SELECT id FROM audit_log WHERE at_ms < older_than_ms ORDER BY id LIMIT batch_rows);
    GET DIAGNOSTICS purged = ROW_COUNT;
    RETURN purged;
END
$$;

-- One row per shard: the newest fencing token that wrote, and its owner.
CREATE TABLE shard_fences (
    shard      integer PRIMARY KEY CHECK (shard >= 0),
    token      bigint NOT NULL CHECK (token > 0),
    owner      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Client Idempotency-Keys per (shard, user, command, key), kept 24 h.
CREATE TABLE idempotency_records (
    shard       integer NOT NULL,
    user_id     text NOT NULL,
    command     text NOT NULL,
    key         text NOT NULL,
    at_ms       bigint NOT NULL,
    fingerprint bytea NOT NULL,
    result      bytea NOT NULL,
    PRIMARY KEY (shard, user_id, command, key)
);
CREATE INDEX idempotency_records_by_time ON idempotency_records (shard, at_ms);

-- The first outcome of each state-changing request id, one row per flush
-- (zlib-compressed msgpack of OutcomeRecords), kept minutes: long enough for
-- any retry.
CREATE TABLE request_outcomes (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    shard    integer NOT NULL,
    at_ms    bigint NOT NULL,
    requests integer NOT NULL,
    outcomes bytea NOT NULL
);
CREATE INDEX request_outcomes_by_shard ON request_outcomes (shard, at_ms);
-- Compressed by the writer already.
ALTER TABLE request_outcomes ALTER COLUMN outcomes SET STORAGE EXTERNAL;

-- Slot counts follow the bookings: statement triggers add up each statement's
-- changes per slot (one UPDATE per statement, not per row), and the CHECK
-- slots_within_capacity refuses a statement that would overfill a slot.
-- Both functions join a handful of rows (a flush, a statement's changes) to big
-- tables: nested loops over the primary keys, whatever the statistics say, so a
-- plan made while a table was small never turns into a scan of it.
CREATE FUNCTION bookings_count_changes() RETURNS trigger LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE slots s
           SET confirmed_count = s.confirmed_count + d.confirmed,
               held_count = s.held_count + d.held
          FROM (SELECT slot_id,
                       count(*) FILTER (WHERE status = 'CONFIRMED') AS confirmed,
                       count(*) FILTER (WHERE status = 'RESERVED') AS held
                  FROM new_rows GROUP BY slot_id) d
         WHERE s.id = d.slot_id AND (d.confirmed <> 0 OR d.held <> 0);
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE slots s
           SET confirmed_count = s.confirmed_count + d.confirmed,
               held_count = s.held_count + d.held
          FROM (SELECT slot_id, sum(confirmed) AS confirmed, sum(held) AS held
                  FROM (SELECT slot_id,
                               (status = 'CONFIRMED')::int AS confirmed,
                               (status = 'RESERVED')::int AS held
                          FROM new_rows
                        UNION ALL
                        SELECT slot_id,
                               -(status = 'CONFIRMED')::int,
                               -(status = 'RESERVED')::int
                          FROM old_rows) c
                 GROUP BY slot_id) d
         WHERE s.id = d.slot_id AND (d.confirmed <> 0 OR d.held <> 0);
    ELSE
        UPDATE slots s
           SET confirmed_count = s.confirmed_count - d.confirmed,
               held_count = s.held_count - d.held
          FROM (SELECT slot_id,
                       count(*) FILTER (WHERE status = 'CONFIRMED') AS confirmed,
                       count(*) FILTER (WHERE status = 'RESERVED') AS held
                  FROM old_rows GROUP BY slot_id) d
         WHERE s.id = d.slot_id AND (d.confirmed <> 0 OR d.held <> 0);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER bookings_count_inserts AFTER INSERT ON bookings
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bookings_count_changes();
CREATE TRIGGER bookings_count_updates AFTER UPDATE ON bookings
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bookings_count_changes();
CREATE TRIGGER bookings_count_deletes AFTER DELETE ON bookings
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bookings_count_changes();

-- TRUNCATE has no transition table: every count goes with the bookings.
CREATE FUNCTION bookings_count_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE slots SET confirmed_count = 0, held_count = 0
     WHERE confirmed_count <> 0 OR held_count <> 0;
    RETURN NULL;
END
$$;
CREATE TRIGGER bookings_count_truncate AFTER TRUNCATE ON bookings
    FOR EACH STATEMENT EXECUTE FUNCTION bookings_count_truncate();

-- One flush of a shard's write-behind buffer, in one statement (so one round
-- trip and, called outside a transaction block, one transaction):
--   1. the fence: the shard's fence row moves to p_token only if it is newer,
--      or the same token of the same owner; otherwise SQLSTATE SLF01 and
--      nothing is written (the caller's owner must stop);
--   2. slots, with capacity only raised for now (step 5 lowers it), so that no
--      intermediate state of the flush overfills a slot;
--   3. bookings that existed before the flush (their changes only free or
--      convert places, so counts only go down), then 4. the new ones;
--   5. lowered capacities; 6. queue entries; 7. audit rows; 8. request
--      outcomes; 9. idempotency records.
CREATE TYPE slot_write AS (
    id text, resource_id text, domain text, start_ms bigint, end_ms bigint, capacity integer,
    blocked boolean, metadata jsonb, version integer, created_at_ms bigint,
    updated_at_ms bigint, deleted_at_ms bigint
);
CREATE TYPE booking_write AS (
    id text, slot_id text, user_id text, status text, reserved_at_ms bigint,
    expires_at_ms bigint, confirmed_at_ms bigint, completed_at_ms bigint,
    cancelled_at_ms bigint, cancel_reason text, cancelled_by text, refund_percentage smallint,
    via_queue boolean, version integer, updated_at_ms bigint
);
CREATE TYPE entry_write AS (
    slot_id text, user_id text, seq bigint, status text, joined_at_ms bigint,
    last_seen_ms bigint, notified_at_ms bigint, booking_id text, ended_at_ms bigint,
    version integer, updated_at_ms bigint
);
CREATE TYPE audit_write AS (
    at_ms bigint, request_id text, actor text, entity text, entity_id text, slot_id text,
    user_id text, from_status text, to_status text, trigger text, details jsonb
);
CREATE TYPE key_write AS (
    user_id text, command text, key text, at_ms bigint, fingerprint bytea, result bytea
);

CREATE FUNCTION write_shard_flush(
    p_shard integer, p_token bigint, p_owner text, p_check_fence boolean,
    p_slots slot_write[], p_changed_bookings booking_write[], p_new_bookings booking_write[],
    p_entries entry_write[], p_left_slot_ids text[], p_left_user_ids text[],
    p_audit audit_write[], p_outcomes_at_ms bigint, p_outcomes_count integer,
    p_outcomes bytea, p_keys key_write[]
) RETURNS void LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
BEGIN
    IF p_check_fence THEN
        UPDATE shard_fences SET token = p_token, owner = p_owner, updated_at = now()
         WHERE shard = p_shard
           AND (token < p_token OR (token = p_token AND owner = p_owner));
        IF NOT FOUND THEN
            RAISE EXCEPTION 'shard %: token % of % is fenced off', p_shard, p_token, p_owner
                USING ERRCODE = 'SLF01';
        END IF;
    END IF;

    IF cardinality(p_slots) > 0 THEN
        INSERT INTO slots AS s (id, shard, resource_id, domain, start_ms, end_ms, capacity,
                                blocked, metadata, version, created_at_ms, updated_at_ms,
                                deleted_at_ms)
        SELECT u.id, p_shard, u.resource_id, u.domain, u.start_ms, u.end_ms, u.capacity,
               u.blocked, u.metadata, u.version, u.created_at_ms, u.updated_at_ms,
               u.deleted_at_ms
          FROM unnest(p_slots) u
        ON CONFLICT (id) DO UPDATE
           SET start_ms = EXCLUDED.start_ms, end_ms = EXCLUDED.end_ms,
               capacity = greatest(s.capacity, EXCLUDED.capacity), blocked = EXCLUDED.blocked,
               metadata = EXCLUDED.metadata, version = EXCLUDED.version,
               updated_at_ms = EXCLUDED.updated_at_ms, deleted_at_ms = EXCLUDED.deleted_at_ms;
    END IF;

    IF cardinality(p_changed_bookings) > 0 THEN
        UPDATE bookings b
           SET status = u.status, expires_at_ms = u.expires_at_ms,
               confirmed_at_ms = u.confirmed_at_ms, completed_at_ms = u.completed_at_ms,
               cancelled_at_ms = u.cancelled_at_ms, cancel_reason = u.cancel_reason,
               cancelled_by = u.cancelled_by, refund_percentage = u.refund_percentage,
               version = u.version, updated_at_ms = u.updated_at_ms
          FROM unnest(p_changed_bookings) u
         WHERE b.id = u.id AND b.version <= u.version;
    END IF;

    IF cardinality(p_new_bookings) > 0 THEN
        INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,
                              confirmed_at_ms, completed_at_ms, cancelled_at_ms, cancel_reason,
                              cancelled_by, refund_percentage, via_queue, version,
                              updated_at_ms)
        SELECT * FROM unnest(p_new_bookings);
    END IF;

    IF cardinality(p_slots) > 0 THEN
        UPDATE slots s SET capacity = u.capacity
          FROM unnest(p_slots) u
         WHERE s.id = u.id AND s.capacity > u.capacity;
    END IF;

    IF cardinality(p_left_slot_ids) > 0 THEN
        DELETE FROM queue_entries q
         USING unnest(p_left_slot_ids, p_left_user_ids) AS gone (slot_id, user_id)
         WHERE q.slot_id = gone.slot_id AND q.user_id = gone.user_id;
    END IF;

    IF cardinality(p_entries) > 0 THEN
        INSERT INTO queue_entries AS q (slot_id, user_id, seq, status, joined_at_ms,
                                        last_seen_ms, notified_at_ms, booking_id, ended_at_ms,
                                        version, updated_at_ms)
        SELECT * FROM unnest(p_entries)
        ON CONFLICT (slot_id, user_id) DO UPDATE
           SET seq = EXCLUDED.seq, status = EXCLUDED.status,
               joined_at_ms = EXCLUDED.joined_at_ms, last_seen_ms = EXCLUDED.last_seen_ms,
               notified_at_ms = EXCLUDED.notified_at_ms, booking_id = EXCLUDED.booking_id,
               ended_at_ms = EXCLUDED.ended_at_ms, version = EXCLUDED.version,
               updated_at_ms = EXCLUDED.updated_at_ms;
    END IF;

    IF cardinality(p_audit) > 0 THEN
        INSERT INTO audit_log (at_ms, shard, request_id, actor, entity, entity_id, slot_id,
                               user_id, from_status, to_status, trigger, details)
        SELECT u.at_ms, p_shard, u.request_id, u.actor, u.entity, u.entity_id, u.slot_id,
               u.user_id, u.from_status, u.to_status, u.trigger, u.details
          FROM unnest(p_audit) u;
    END IF;

    IF p_outcomes_count > 0 THEN
        INSERT INTO request_outcomes (shard, at_ms, requests, outcomes)
        VALUES (p_shard, p_outcomes_at_ms, p_outcomes_count, p_outcomes);
    END IF;

    IF cardinality(p_keys) > 0 THEN
        INSERT INTO idempotency_records (shard, user_id, command, key, at_ms, fingerprint,
                                         result)
        SELECT p_shard, u.user_id, u.command, u.key, u.at_ms, u.fingerprint, u.result
          FROM unnest(p_keys) u
        ON CONFLICT (shard, user_id, command, key) DO UPDATE
           SET at_ms = EXCLUDED.at_ms, fingerprint = EXCLUDED.fingerprint,
               result = EXCLUDED.result;
    END IF;
END
$$;
