-- Rollups (ROLLUP_INTERVALS): per device, measurement and epoch-aligned bucket of interval_s
-- seconds, the count, sum, min and max of the readings processed so far (avg = sum / count).
-- Maintained by the processor's commit; kept when raw messages are removed by retention.
-- rollup_intervals lists the intervals kept: the gateway adds (and backfills) and drops them at
-- start-up to match ROLLUP_INTERVALS. bucket_start: UTC text like every time column.
CREATE TABLE rollup_intervals (
    interval_s  INTEGER PRIMARY KEY CHECK (interval_s > 0),
    added_at    TEXT    NOT NULL
);

CREATE TABLE rollups (
    interval_s   INTEGER NOT NULL,
    device_id    TEXT    NOT NULL,
    measurement  TEXT    NOT NULL,
    bucket_start TEXT    NOT NULL,
    count        INTEGER NOT NULL,
    sum          REAL    NOT NULL,
    min          REAL    NOT NULL,
    max          REAL    NOT NULL,
    PRIMARY KEY (interval_s, device_id, measurement, bucket_start)
) WITHOUT ROWID;
