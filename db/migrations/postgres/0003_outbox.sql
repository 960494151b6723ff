-- The outbox: MQTT publishes written in the transaction that marks their message processed, so
-- none is lost by a crash between the commit and the broker's PUBACK. The publisher deletes a row
-- once the broker confirmed it; a refused publish is retried with backoff (attempts, last_error,
-- next_attempt_at) and after the last attempt kept with dead_at set (a dead letter).
CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    subtopic        text,                -- NULL: MQTT_PUBLISH_TOPIC itself
    payload         bytea       NOT NULL,
    message_id      bigint,
    event_id        bigint,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz,
    lease_owner     text,
    lease_until     timestamptz,
    dead_at         timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE dead_at IS NULL;
CREATE INDEX outbox_dead ON outbox (id) WHERE dead_at IS NOT NULL;
