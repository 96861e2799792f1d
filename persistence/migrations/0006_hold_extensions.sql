-- A hold's extensions (POST /api/bookings/{id}/extend): how many times its
-- deadline was moved on, so that a shard that reloads it still holds it to its
-- domain's holdExtensionsMax. The flush writes the count with the booking:
-- booking_write carries it as its last attribute (after updated_at_ms), and
-- write_shard_flush is 0004's with the count in its booking update and insert.
--
-- A flush of a release that predates this migration sends booking_write
-- records of the former shape and is refused; the rolling restart of
-- docs/operations.md (a new release with a migration that changes the flush)
-- applies.

ALTER TABLE bookings ADD COLUMN extensions smallint NOT NULL DEFAULT 0
    CONSTRAINT bookings_extensions_not_negative CHECK (extensions >= 0);

ALTER TYPE booking_write ADD ATTRIBUTE extensions smallint;

-- As in 0004, with each booking's extensions.
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
