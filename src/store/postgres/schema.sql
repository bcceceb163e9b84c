-- provisiond's schema, version 1. `{s}` is `store.schema`. Applied in one transaction,
-- under an advisory lock, by the first sidecar that finds the schema missing.

CREATE TABLE {s}.deliveries (
    id          bigserial PRIMARY KEY,
    handler     text NOT NULL,
    entity      text NOT NULL,
    event       text NOT NULL,
    object_id   text NOT NULL,
    message_id  text NOT NULL,
    body        text NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    next_at     bigint NOT NULL,
    enqueued_at bigint NOT NULL,
    last_error  text,
    event_id    text
);
CREATE INDEX deliveries_lane ON {s}.deliveries (handler, entity, id);

CREATE TABLE {s}.dead_letters (
    id          bigint PRIMARY KEY,
    handler     text NOT NULL,
    entity      text NOT NULL,
    event       text NOT NULL,
    object_id   text NOT NULL,
    message_id  text NOT NULL,
    body        text NOT NULL,
    attempts    integer NOT NULL,
    next_at     bigint NOT NULL,
    enqueued_at bigint NOT NULL,
    last_error  text,
    event_id    text,
    reason      text NOT NULL,
    died_at     bigint NOT NULL
);

-- One row per lane (handler + entity) that has had work. `pending` counts its queued
-- deliveries and is changed only under the row's lock, by the same transaction that
-- inserts or removes one: so a lane's ids are assigned in commit order, and a sidecar
-- that frees a lane sees every delivery committed before. `owner` and `token` are the
-- lease: `token` grows with every claim, and a settlement names the token it holds.
CREATE TABLE {s}.lanes (
    handler     text NOT NULL,
    entity      text NOT NULL,
    pending     bigint NOT NULL DEFAULT 0,
    owner       text,
    token       bigint NOT NULL DEFAULT 0,
    lease_until timestamptz,
    PRIMARY KEY (handler, entity)
);
CREATE INDEX lanes_with_work ON {s}.lanes (handler) WHERE pending > 0;
-- The lanes a claim may take: with work and held by nobody. A lane enters it only when
-- it is freed with work left or gets work while free, so it stays small and cheap.
CREATE INDEX lanes_free ON {s}.lanes (handler) WHERE pending > 0 AND owner IS NULL;
CREATE INDEX lanes_by_owner ON {s}.lanes (owner) WHERE owner IS NOT NULL;

CREATE TABLE {s}.dedupe (
    key       bytea PRIMARY KEY,
    stored_at bigint NOT NULL
);
CREATE INDEX dedupe_by_time ON {s}.dedupe (stored_at);

CREATE TABLE {s}.executions (
    id        bigserial PRIMARY KEY,
    at        bigint NOT NULL,
    handler   text NOT NULL,
    event     text NOT NULL,
    object_id text NOT NULL,
    outcome   text NOT NULL,
    event_id  text,
    row       text NOT NULL
);
CREATE INDEX executions_by_time ON {s}.executions (at);

-- The live sidecars and their after-stage handlers, renewed with their leases.
CREATE TABLE {s}.sidecars (
    id       text PRIMARY KEY,
    handlers text[] NOT NULL,
    seen_at  timestamptz NOT NULL
);

-- Stores the fan-out of one or more events (a group commit): first every dedupe key,
-- in key order (an item whose key was stored within its window is skipped); then, in
-- the items' order, which is sorted by lane, the lane's row (locked: ids of one lane
-- follow commit order) and the delivery. Every accept takes its locks in these two
-- orders, and settlements take one lane's only, so no two wait on each other in a ring.
CREATE FUNCTION {s}.enqueue(
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
        INSERT INTO {s}.lanes AS l (handler, entity, pending) VALUES (p_handler[i], p_entity[i], 1)
            ON CONFLICT (handler, entity) DO UPDATE SET pending = l.pending + 1;
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
CREATE FUNCTION {s}.settle(
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
CREATE FUNCTION {s}.replay(p_id bigint, p_now bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r {s}.dead_letters%ROWTYPE;
    fresh bigint;
BEGIN
    DELETE FROM {s}.dead_letters WHERE id = p_id RETURNING * INTO r;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO {s}.lanes AS l (handler, entity, pending) VALUES (r.handler, r.entity, 1)
        ON CONFLICT (handler, entity) DO UPDATE SET pending = l.pending + 1;
    INSERT INTO {s}.deliveries
        (handler, entity, event, object_id, message_id, body, next_at, enqueued_at, event_id)
        VALUES (r.handler, r.entity, r.event, r.object_id, r.message_id, r.body, p_now,
                r.enqueued_at, r.event_id)
        RETURNING id INTO fresh;
    RETURN fresh;
END $$;
