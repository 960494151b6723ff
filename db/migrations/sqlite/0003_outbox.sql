-- The outbox: MQTT publishes written in the transaction that marks their message processed, so
-- none is lost by a crash between the commit and the broker's PUBACK. The publisher deletes a row
-- once the broker confirmed it; a refused publish is retried with backoff (attempts, last_error,
-- next_attempt_at) and after the last attempt kept with dead_at set (a dead letter).
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at      TEXT    NOT NULL,
    subtopic        TEXT,                -- NULL: MQTT_PUBLISH_TOPIC itself
    payload         BLOB    NOT NULL,
    message_id      INTEGER,
    event_id        INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TEXT,
    lease_owner     TEXT,
    lease_until     TEXT,
    dead_at         TEXT
);
CREATE INDEX outbox_pending ON outbox (id) WHERE dead_at IS NULL;
CREATE INDEX outbox_dead ON outbox (id) WHERE dead_at IS NOT NULL;
