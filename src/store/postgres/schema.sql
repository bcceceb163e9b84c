-- provisiond's tables, at the newest version (`SCHEMA_VERSION`). `{s}` is
-- `store.schema`. Applied in one transaction, under an advisory lock, by the first
-- sidecar that finds the schema missing, followed by functions.sql. A schema of an
-- older version is brought up to date by the steps in migrations/ instead.

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
-- `waiting_since` is when a lane held by nobody began to wait with work (it got work
-- while free, or was freed or handed back with work left): claims take the lanes that
-- have waited longest first.
CREATE TABLE {s}.lanes (
    handler       text NOT NULL,
    entity        text NOT NULL,
    pending       bigint NOT NULL DEFAULT 0,
    owner         text,
    token         bigint NOT NULL DEFAULT 0,
    lease_until   timestamptz,
    waiting_since timestamptz,
    PRIMARY KEY (handler, entity)
);
CREATE INDEX lanes_with_work ON {s}.lanes (handler) WHERE pending > 0;
-- The lanes a claim may take, longest waiting first: with work and held by nobody. A
-- lane enters it only when it is freed with work left or gets work while free, so it
-- stays small and cheap.
CREATE INDEX lanes_waiting ON {s}.lanes (handler, waiting_since)
    WHERE pending > 0 AND owner IS NULL;
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
