-- Notifications: a transactional outbox, webhook endpoints, deliveries, and the
-- contact details emails go to.
--
-- A shard's flush writes its notifiable events to outbox_batches in the same
-- statement (so the same transaction) as the change itself: an event exists
-- exactly when its change is committed. One row per flush, not per event: the
-- events are one msgpack array (what the shard's writer already holds), so a
-- flush pays one small insert whatever its size.
--
-- Delivery workers (`slotengine notify`, engine/notify/) take undispatched
-- batches with FOR UPDATE SKIP LOCKED, fan each event out into deliveries (one
-- per subscribed webhook endpoint, one per email recipient) and mark the batch
-- dispatched, in one transaction. They then claim due deliveries under a lease
-- (lease_until_ms, with the attempt number as a fence: a late answer of a
-- worker whose lease lapsed changes nothing).

CREATE TABLE outbox_batches (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    shard         integer NOT NULL,
    -- When the flush was written: the commit, give or take the round trip.
    committed_ms  bigint NOT NULL,
    events        integer NOT NULL CHECK (events > 0),
    payload       bytea NOT NULL,
    dispatched_ms bigint
);
CREATE INDEX outbox_batches_undispatched ON outbox_batches (id) WHERE dispatched_ms IS NULL;
CREATE INDEX outbox_batches_by_time ON outbox_batches USING brin (committed_ms);
ALTER TABLE outbox_batches ALTER COLUMN payload SET STORAGE EXTERNAL;

-- Called in the flush's own statement (persistence/store.py write_flush).
CREATE FUNCTION append_outbox(p_shard integer, p_committed_ms bigint, p_events integer,
                              p_payload bytea) RETURNS void LANGUAGE sql AS $$
    INSERT INTO outbox_batches (shard, committed_ms, events, payload)
    SELECT p_shard, p_committed_ms, p_events, p_payload WHERE p_events > 0;
$$;

CREATE TABLE webhook_endpoints (
    id            text PRIMARY KEY,
    url           text NOT NULL,
    -- Event types, or {'*'} for all of them.
    events        text[] NOT NULL CHECK (cardinality(events) > 0),
    -- The whsec_ signing secret, sealed with the data key (AES-GCM).
    secret        bytea NOT NULL,
    created_at_ms bigint NOT NULL,
    deleted_at_ms bigint
);

CREATE TABLE deliveries (
    -- Derived from the event and the target (engine/notify/worker.py): one
    -- delivery per event and target, however often a batch is fanned out.
    id              text PRIMARY KEY,
    -- The event's stable id: the webhook-id of every attempt.
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('webhook', 'email')),
    endpoint_id     text,
    -- The user an email goes to (the address is looked up when it is sent).
    user_id         text,
    -- Per subject (booking, queue entry, slot): ordering for receivers.
    subject         text NOT NULL,
    seq             integer NOT NULL,
    body            bytea NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'failed', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_ms bigint NOT NULL,
    lease_until_ms  bigint,
    last_error      text,
    committed_ms    bigint NOT NULL,
    created_at_ms   bigint NOT NULL,
    delivered_at_ms bigint,
    CONSTRAINT deliveries_target CHECK (
        (channel = 'webhook' AND endpoint_id IS NOT NULL)
        OR (channel = 'email' AND user_id IS NOT NULL)
    )
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_ms)
    WHERE status IN ('pending', 'failed');
-- /health and the workers count the dead ones.
CREATE INDEX deliveries_dead ON deliveries (id) WHERE status = 'dead';
CREATE INDEX deliveries_by_endpoint ON deliveries (endpoint_id, status, id);
CREATE INDEX deliveries_by_time ON deliveries USING brin (created_at_ms);

-- A user's contact details, sealed with the data key (AES-GCM; never stored,
-- logged or audited in the clear). key_id names the key that sealed them, so a
-- key rotation finds what is still sealed with an older key.
CREATE TABLE contacts (
    user_id       text PRIMARY KEY,
    email         bytea NOT NULL,
    key_id        text NOT NULL,
    -- 'token' (the token's email claim) or 'api' (PUT /api/me/contact).
    source        text NOT NULL CHECK (source IN ('token', 'api')),
    updated_at_ms bigint NOT NULL
);
CREATE INDEX contacts_by_key ON contacts (key_id);
