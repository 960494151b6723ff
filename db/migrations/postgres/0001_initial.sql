-- Initial schema. Names are the same in both dialects (operators query them with plain SQL).
-- Every unique key starts with device_id so the tables can be partitioned by device later.

CREATE TABLE messages (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- grows with arrival
    device_id       text        NOT NULL,
    dedupe_key      text        NOT NULL,
    device_ts       timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    seq             bigint,
    measurements    jsonb       NOT NULL,
    status          text        NOT NULL,
    battery         double precision,
    source          text        NOT NULL,
    topic           text,
    processed_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz,
    lease_owner     text,
    lease_until     timestamptz,
    dead_at         timestamptz,
    CONSTRAINT messages_device_dedupe UNIQUE (device_id, dedupe_key)
);

-- The processor's work queue: small, because processed and dead rows drop out of it.
CREATE INDEX messages_backlog ON messages (id) WHERE processed_at IS NULL AND dead_at IS NULL;
CREATE INDEX messages_dead ON messages (id) WHERE dead_at IS NOT NULL;
CREATE INDEX messages_device_ts ON messages (device_id, device_ts);
CREATE INDEX messages_ts ON messages (device_ts);
-- No index on received_at: no query needs one (ids are arrival-ordered), and each index
-- costs every insert.
CREATE INDEX messages_measurements ON messages USING gin (measurements jsonb_path_ops);

CREATE TABLE rejects (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL,
    source      text        NOT NULL,
    topic       text,
    payload     bytea       NOT NULL,
    reason      text        NOT NULL,
    errors      jsonb       NOT NULL DEFAULT '[]'
);
CREATE INDEX rejects_received_at ON rejects (received_at);

-- Ids are taken under an advisory lock held until commit, so they grow in commit order.
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    device_id   text,
    message_id  bigint
);
CREATE INDEX events_created_at ON events (created_at);
