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
--     by statement triggers on bookings, checked at commit);
--   * capacity > 0, end > start, statuses from the state machine only;
--   * the audit log is append-only (only the retention purge may delete).

CREATE EXTENSION IF NOT EXISTS btree_gist;

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
    -- Deferred: one flush may move a slot away and put another in its place.
    CONSTRAINT slots_no_overlap EXCLUDE USING gist (
        resource_id WITH =,
        int8range(start_ms, end_ms) WITH &&
    ) WHERE (deleted_at_ms IS NULL) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX slots_by_shard ON slots (shard, end_ms) WHERE deleted_at_ms IS NULL;
CREATE INDEX slots_by_start ON slots (start_ms, id) WHERE deleted_at_ms IS NULL;
CREATE INDEX slots_by_resource ON slots (resource_id, start_ms) WHERE deleted_at_ms IS NULL;

CREATE TABLE bookings (
    id                text PRIMARY KEY,
    slot_id           text NOT NULL REFERENCES slots (id),
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
    slot_id        text NOT NULL REFERENCES slots (id),
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
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('slotengine.audit_purge', true) = 'on' THEN
        RETURN OLD;
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
    PERFORM set_config('slotengine.audit_purge', 'on', true);
    DELETE FROM audit_log
     WHERE id IN (SELECT id FROM audit_log WHERE at_ms < older_than_ms ORDER BY id LIMIT batch_rows);
    GET DIAGNOSTICS purged = ROW_COUNT;
    PERFORM set_config('slotengine.audit_purge', 'off', true);
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
-- (msgpack-encoded OutcomeRecords), kept minutes: long enough for any retry.
CREATE TABLE request_outcomes (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    shard    integer NOT NULL,
    at_ms    bigint NOT NULL,
    requests integer NOT NULL,
    outcomes bytea NOT NULL
);
CREATE INDEX request_outcomes_by_shard ON request_outcomes (shard, at_ms);

-- Slot counts follow the bookings: statement triggers add up each statement's
-- changes per slot (one UPDATE per statement, not per row) ...
CREATE FUNCTION bookings_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
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

-- ... and the capacity check runs at commit, when a flush has settled (within
-- one flush a capacity may drop before the hold that made room expires).
CREATE FUNCTION slots_check_capacity() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    current slots%ROWTYPE;
BEGIN
    SELECT * INTO current FROM slots WHERE id = NEW.id;
    IF FOUND AND current.confirmed_count + current.held_count > current.capacity THEN
        RAISE EXCEPTION 'slot %: % confirmed + % held bookings exceed its capacity %',
            current.id, current.confirmed_count, current.held_count, current.capacity
            USING ERRCODE = 'check_violation', CONSTRAINT = 'slots_within_capacity';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER slots_within_capacity
    AFTER INSERT OR UPDATE OF capacity, confirmed_count, held_count ON slots
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION slots_check_capacity();
