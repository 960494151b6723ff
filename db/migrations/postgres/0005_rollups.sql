-- Rollups (ROLLUP_INTERVALS): per device, measurement and epoch-aligned bucket of interval_s
-- seconds, the count, sum, min and max of the readings processed so far (avg = sum / count).
-- Maintained by the processor's commit; kept when raw messages are removed by retention.
-- rollup_intervals lists the intervals kept: the gateway adds (and backfills) and drops them at
-- start-up to match ROLLUP_INTERVALS.
CREATE TABLE rollup_intervals (
    interval_s  integer     PRIMARY KEY CHECK (interval_s > 0),
    added_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rollups (
    interval_s   integer          NOT NULL,
    device_id    text             NOT NULL,
    measurement  text             NOT NULL,
    bucket_start timestamptz      NOT NULL,
    count        bigint           NOT NULL,
    sum          double precision NOT NULL,
    min          double precision NOT NULL,
    max          double precision NOT NULL,
    PRIMARY KEY (interval_s, device_id, measurement, bucket_start)
);
