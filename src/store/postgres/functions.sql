-- provisiond's functions, at the newest version. Applied after schema.sql when the
-- schema is created, and again after the steps of migrations/ when it is migrated:
-- every function is replaced as a whole (its name and arguments stay as they were, or
-- a migration step drops the old one first).

-- Stores the fan-out of one or more events (a group commit): first every dedupe key,
-- in key order (an item whose key was stored within its window is skipped); then, in
-- the items' order, which is sorted by lane, the lane's row (locked: ids of one lane
-- follow commit order) and the delivery. Every accept takes its locks in these two
-- orders, and settlements take one lane's only, so no two wait on each other in a ring.
CREATE OR REPLACE FUNCTION {s}.enqueue(
    p_handler text[], p_entity text[], p_event text[], p_object text[], p_message text[],
    p_body text[], p_key bytea[], p_event_id text[], p_window bigint[], p_now bigint
) RETURNS TABLE (item integer, delivery bigint) LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    n integer := coalesce(array_length(p_handler, 1), 0);
    fresh boolean[] := array_fill(true, ARRAY[n]);
BEGIN
    FOR i IN SELECT k.i FROM unnest(p_key) WITH ORDINALITY AS k(key, i)
             WHERE k.key IS NOT NULL ORDER BY k.key, k.i LOOP
        INSERT INTO {s}.dedupe AS d (key, stored_at) VALUES (p_key[i], p_now)
            ON CONFLICT (key) DO UPDATE SET stored_at = excluded.stored_at
            WHERE d.stored_at <= p_now - p_window[i];
        fresh[i] := FOUND;
    END LOOP;
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN NOT fresh[i];
        INSERT INTO {s}.lanes AS l (handler, entity, pending, waiting_since)
            VALUES (p_handler[i], p_entity[i], 1, now())
            ON CONFLICT (handler, entity) DO UPDATE SET pending = l.pending + 1,
                waiting_since = CASE WHEN l.pending = 0 THEN now() ELSE l.waiting_since END;
        INSERT INTO {s}.deliveries
            (handler, entity, event, object_id, message_id, body, next_at, enqueued_at, event_id)
            VALUES (p_handler[i], p_entity[i], p_event[i], p_object[i], p_message[i], p_body[i],
                    p_now, p_now, p_event_id[i])
            RETURNING id INTO delivery;
        item := i;
        RETURN NEXT;
    END LOOP;
END $$;

-- Settles one attempt, if the caller still holds the lane with `p_token` (fencing):
-- 0, and nothing written, otherwise; 1 when settled; 2 when settled and the lane, with
-- nothing left, freed. p_kind: 0 delivered, 1 retry, 2 dead. Committed without waiting
-- for the WAL flush (the next accept's commit flushes it): a settlement lost in a
-- database crash means the attempt is made again, which at-least-once allows.
CREATE OR REPLACE FUNCTION {s}.settle(
    p_id bigint, p_handler text, p_entity text, p_owner text, p_token bigint,
    p_kind integer, p_attempts integer, p_next_at bigint, p_error text, p_reason text,
    p_now bigint, p_at bigint, p_event text, p_object text, p_outcome text,
    p_event_id text, p_row text
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    left_over bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM 1 FROM {s}.lanes
        WHERE handler = p_handler AND entity = p_entity AND owner = p_owner AND token = p_token
        FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF p_row IS NOT NULL THEN
        INSERT INTO {s}.executions (at, handler, event, object_id, outcome, event_id, row)
            VALUES (p_at, p_handler, p_event, p_object, p_outcome, p_event_id, p_row);
    END IF;
    IF p_kind = 1 THEN
        UPDATE {s}.deliveries SET attempts = p_attempts, next_at = p_next_at, last_error = p_error
            WHERE id = p_id;
        RETURN 1;
    END IF;
    IF p_kind = 2 THEN
        INSERT INTO {s}.dead_letters
            SELECT id, handler, entity, event, object_id, message_id, body, p_attempts, next_at,
                   enqueued_at, coalesce(p_error, last_error), event_id, p_reason, p_now
            FROM {s}.deliveries WHERE id = p_id
            ON CONFLICT (id) DO NOTHING;
    END IF;
    DELETE FROM {s}.deliveries WHERE id = p_id;
    IF NOT FOUND THEN
        RETURN 1;
    END IF;
    UPDATE {s}.lanes SET pending = pending - 1,
            owner = CASE WHEN pending - 1 > 0 THEN owner END,
            lease_until = CASE WHEN pending - 1 > 0 THEN lease_until END
        WHERE handler = p_handler AND entity = p_entity
        RETURNING pending INTO left_over;
    IF left_over > 0 THEN
        RETURN 1;
    END IF;
    RETURN 2;
END $$;

-- Puts dead letter `p_id` back in the queue under a new id, behind what its lane queued
-- meanwhile; the message id and the accept time stay, attempts start again.
CREATE OR REPLACE FUNCTION {s}.replay(p_id bigint, p_now bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r {s}.dead_letters%ROWTYPE;
    fresh bigint;
BEGIN
    DELETE FROM {s}.dead_letters WHERE id = p_id RETURNING * INTO r;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO {s}.lanes AS l (handler, entity, pending, waiting_since)
        VALUES (r.handler, r.entity, 1, now())
        ON CONFLICT (handler, entity) DO UPDATE SET pending = l.pending + 1,
            waiting_since = CASE WHEN l.pending = 0 THEN now() ELSE l.waiting_since END;
    INSERT INTO {s}.deliveries
        (handler, entity, event, object_id, message_id, body, next_at, enqueued_at, event_id)
        VALUES (r.handler, r.entity, r.event, r.object_id, r.message_id, r.body, p_now,
                r.enqueued_at, r.event_id)
        RETURNING id INTO fresh;
    RETURN fresh;
END $$;
