-- Initial schema. Names are the same in both dialects (operators query them with plain SQL).
-- Times are UTC text 'YYYY-MM-DDTHH:MM:SS.ffffffZ' (fixed width, so text order is time order);
-- JSON is text. AUTOINCREMENT so ids are never reused, even after rows are deleted.

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id       TEXT    NOT NULL,
    dedupe_key      TEXT    NOT NULL,
    device_ts       TEXT    NOT NULL,
    received_at     TEXT    NOT NULL,
    seq             INTEGER,
    measurements    TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    battery         REAL,
    source          TEXT    NOT NULL,
    topic           TEXT,
    processed_at    TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TEXT,
    lease_owner     TEXT,
    lease_until     TEXT,
    dead_at         TEXT,
    CONSTRAINT messages_device_dedupe UNIQUE (device_id, dedupe_key)
);

CREATE INDEX messages_backlog ON messages (id) WHERE processed_at IS NULL AND dead_at IS NULL;
CREATE INDEX messages_dead ON messages (id) WHERE dead_at IS NOT NULL;
CREATE INDEX messages_device_ts ON messages (device_id, device_ts);
CREATE INDEX messages_ts ON messages (device_ts);
-- No index on received_at: no query needs one (ids are arrival-ordered), and each index
-- costs every insert.

CREATE TABLE rejects (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    source      TEXT NOT NULL,
    topic       TEXT,
    payload     BLOB NOT NULL,
    reason      TEXT NOT NULL,
    errors      TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX rejects_received_at ON rejects (received_at);

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    type        TEXT NOT NULL,
    data        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    device_id   TEXT,
    message_id  INTEGER
);
CREATE INDEX events_created_at ON events (created_at);
