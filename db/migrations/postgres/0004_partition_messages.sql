-- messages becomes declaratively partitioned by received_at (ranges in UTC, a month or a day each:
-- MESSAGE_PARTITION), so expired readings go by dropping a partition instead of a DELETE.
--
-- The idempotency key. A unique constraint of a partitioned table must contain the partition key,
-- and a redelivery arrives later than the first copy: UNIQUE (device_id, dedupe_key, received_at)
-- would let a redelivery that lands in another period (or simply a later instant) be stored twice.
-- (device_ts would do as partition key, since the dedupe key embeds it, but then retention and the
-- partition a reading lands in would follow the device's clock, which we do not trust.) So the key
-- moves to a small table of its own, message_keys, PRIMARY KEY (device_id, dedupe_key), written in
-- the same statement as the reading: the key's INSERT ... ON CONFLICT DO NOTHING draws the id and
-- only the rows it inserted go into messages. It replaces the unique index messages had, so an
-- insert still updates one unique btree (plus one narrow heap row). Keys go with their readings: the
-- batched delete removes both, and before a partition is dropped its keys are deleted in batches
-- (walking the partition by id).
--
-- The existing table is not copied: it is attached as the first partition, [MINVALUE, tomorrow),
-- keeping its rows, ids and indexes (only its primary key is rebuilt as (id, received_at), which a
-- partitioned table needs; ids stay unique because one sequence draws them all). Attaching scans it
-- once to check the range. Later partitions and a DEFAULT one (so an insert never fails when none
-- was created ahead) are made by the gateway (PostgresStore.maintain_partitions).
LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;

ALTER TABLE messages RENAME TO messages_legacy;
ALTER TABLE messages_legacy RENAME CONSTRAINT messages_pkey TO messages_legacy_pkey;
ALTER INDEX messages_backlog RENAME TO messages_legacy_backlog;
ALTER INDEX messages_dead RENAME TO messages_legacy_dead;
ALTER INDEX messages_device_ts RENAME TO messages_legacy_device_ts;
ALTER INDEX messages_ts RENAME TO messages_legacy_ts;
ALTER INDEX messages_measurements RENAME TO messages_legacy_measurements;

-- The identity's sequence goes with the identity: its position moves to a plain sequence first.
CREATE SEQUENCE messages_id_seq_0004 AS bigint;
SELECT setval('messages_id_seq_0004', last_value, is_called) FROM messages_id_seq;
ALTER TABLE messages_legacy ALTER COLUMN id DROP IDENTITY;
ALTER SEQUENCE messages_id_seq_0004 RENAME TO messages_id_seq;

CREATE TABLE message_keys (
    device_id   text        NOT NULL,
    dedupe_key  text        NOT NULL,
    message_id  bigint      NOT NULL,
    PRIMARY KEY (device_id, dedupe_key)
);
INSERT INTO message_keys (device_id, dedupe_key, message_id) SELECT device_id, dedupe_key, id FROM messages_legacy;
ALTER TABLE messages_legacy DROP CONSTRAINT messages_device_dedupe;
ALTER TABLE messages_legacy DROP CONSTRAINT messages_legacy_pkey;

CREATE TABLE messages (
    id              bigint      NOT NULL DEFAULT nextval('messages_id_seq'),  -- grows with arrival
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
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
ALTER SEQUENCE messages_id_seq OWNED BY messages.id;

-- The same indexes as before; attaching finds the legacy table's own and adopts them.
CREATE INDEX messages_backlog ON messages (id) WHERE processed_at IS NULL AND dead_at IS NULL;
CREATE INDEX messages_dead ON messages (id) WHERE dead_at IS NOT NULL;
CREATE INDEX messages_device_ts ON messages (device_id, device_ts);
CREATE INDEX messages_ts ON messages (device_ts);
CREATE INDEX messages_measurements ON messages USING gin (measurements jsonb_path_ops);

DO $$
DECLARE
    upper_bound timestamptz := date_trunc('day', greatest(now(), (SELECT max(received_at) FROM messages_legacy)),
                                          'UTC') + interval '1 day';
BEGIN
    EXECUTE format('ALTER TABLE messages ATTACH PARTITION messages_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
                   upper_bound);
END
$$;
CREATE TABLE messages_default PARTITION OF messages DEFAULT;
