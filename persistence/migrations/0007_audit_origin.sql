-- Where each audited change came from, and the reservation attempts refused.
--
-- audit_log gains three nullable columns, set on the rows of changes that came
-- through the HTTP API (NULL for timers, and for rows written before):
--   * http_request_id: the request's X-Request-Id, as the client sent it or the
--     gateway made it; the same id answers in the response's X-Request-Id
--     header and names the request in the gateway's log lines. (request_id
--     stays the engine's own id of the command, unique per command.)
--   * client_ip: the client's address, from the socket, or from the trusted
--     proxy header when the peer is a trusted proxy (docs/operations.md); text,
--     cast it to inet to compare with networks.
--   * user_agent: the User-Agent header, at most 256 characters, with what
--     looks like an email address masked.
-- Refused reservation attempts (POST /api/bookings/reserve, POST
-- /api/slots/{id}/queue) are rows of a new entity, 'attempt': entity_id and
-- slot_id the slot, to_status NULL, trigger 'refused', the refusal's code in
-- details.reason.
--
-- No index on the new columns: every flush would pay for it. Look a request up
-- within a time range (the BRIN index on at_ms) or by its entity.
--
-- audit_write carries the three as its last attributes, and write_shard_flush
-- is 0006's with them in its audit insert. A flush of a release that predates
-- this migration sends audit_write records of the former shape and is refused;
-- the rolling restart of docs/operations.md (a new release with a migration
-- that changes the flush) applies.

ALTER TABLE audit_log
    ADD COLUMN http_request_id text,
    ADD COLUMN client_ip text,
    ADD COLUMN user_agent text CONSTRAINT audit_log_user_agent_bounded
        CHECK (char_length(user_agent) <= 256),
    DROP CONSTRAINT audit_log_entity_check,
    ADD CONSTRAINT audit_log_entity_check
        CHECK (entity IN ('booking', 'queue', 'slot', 'attempt')) NOT VALID;
-- NOT VALID: the rows already there passed the narrower check, so the table is
-- not scanned (under its lock) to prove it again; new rows are checked.

ALTER TYPE audit_write
    ADD ATTRIBUTE http_request_id text,
    ADD ATTRIBUTE client_ip text,
    ADD ATTRIBUTE user_agent text;

-- As in 0006, with each audit row's origin.
CREATE OR REPLACE FUNCTION write_shard_flush(
    p_shard integer, p_token bigint, p_owner text, p_generation bigint,
    p_check_fence boolean,
    p_slots slot_write[], p_changed_bookings booking_write[], p_new_bookings booking_write[],
    p_entries entry_write[], p_left_slot_ids text[], p_left_user_ids text[],
    p_audit audit_write[], p_outcomes_at_ms bigint, p_outcomes_count integer,
    p_outcomes bytea, p_keys key_write[]
) RETURNS void LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    v_partitions integer;
BEGIN
    IF p_check_fence THEN
        UPDATE shard_fences SET token = p_token, owner = p_owner, updated_at = now()
         WHERE shard = p_shard AND generation = p_generation
           AND (token < p_token OR (token = p_token AND owner = p_owner));
        IF NOT FOUND THEN
            IF EXISTS (SELECT 1 FROM shard_fences
                        WHERE shard = p_shard
                          AND (token < p_token OR (token = p_token AND owner = p_owner))) THEN
                -- Still the owner, but its partitions changed: it reloads them.
                RAISE EXCEPTION 'shard %: partitions generation % of % has moved on',
                    p_shard, p_generation, p_owner
                    USING ERRCODE = 'SLF02';
            END IF;
            RAISE EXCEPTION 'shard %: token % of % is fenced off', p_shard, p_token, p_owner
                USING ERRCODE = 'SLF01';
        END IF;
    END IF;

    IF cardinality(p_slots) > 0 THEN
        SELECT partitions INTO STRICT v_partitions FROM partition_map;
        INSERT INTO slots AS s (id, partition, resource_id, domain, start_ms, end_ms, capacity,
                                blocked, metadata, version, created_at_ms, updated_at_ms,
                                deleted_at_ms)
        SELECT u.id, (('x' || left(u.id, 8))::bit(32)::bigint % v_partitions)::integer,
               u.resource_id, u.domain, u.start_ms, u.end_ms, u.capacity,
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
               version = u.version, updated_at_ms = u.updated_at_ms,
               extensions = u.extensions
          FROM unnest(p_changed_bookings) u
         WHERE b.id = u.id AND b.version <= u.version;
    END IF;

    IF cardinality(p_new_bookings) > 0 THEN
        INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,
                              confirmed_at_ms, completed_at_ms, cancelled_at_ms, cancel_reason,
                              cancelled_by, refund_percentage, via_queue, version,
                              updated_at_ms, extensions)
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
                               user_id, from_status, to_status, trigger, details,
                               http_request_id, client_ip, user_agent)
        SELECT u.at_ms, p_shard, u.request_id, u.actor, u.entity, u.entity_id, u.slot_id,
               u.user_id, u.from_status, u.to_status, u.trigger, u.details,
               u.http_request_id, u.client_ip, u.user_agent
          FROM unnest(p_audit) u;
    END IF;

    IF p_outcomes_count > 0 THEN
        INSERT INTO request_outcomes (shard, at_ms, requests, outcomes)
        VALUES (p_shard, p_outcomes_at_ms, p_outcomes_count, p_outcomes);
    END IF;

    IF cardinality(p_keys) > 0 THEN
        INSERT INTO idempotency_records (shard, user_id, command, key, at_ms, fingerprint,
                                         result, partition)
        SELECT p_shard, u.user_id, u.command, u.key, u.at_ms, u.fingerprint, u.result,
               u.partition
          FROM unnest(p_keys) u
        ON CONFLICT (shard, user_id, command, key) DO UPDATE
           SET at_ms = EXCLUDED.at_ms, fingerprint = EXCLUDED.fingerprint,
               result = EXCLUDED.result, partition = EXCLUDED.partition;
    END IF;
END
$$;
