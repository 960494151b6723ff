-- A redelivery is the same packet: same device, seq AND timestamp. Keys were 'seq:<n>', which threw
-- away every reading of a device whose counter restarted (reboot, OTA update). The new key is
-- 'seq:<n>@<device_ts as YYYY-MM-DDTHH:MM:SS.ffffffZ in UTC>', exactly the text of
-- gateway.packets.Packet.dedupe_key. Keys with '@' never collide with old ones, so the unique
-- constraint holds row by row. asyncpg stores Python's datetime.min/max as -infinity/infinity.
UPDATE messages
SET dedupe_key = dedupe_key || '@' || CASE
        WHEN device_ts = '-infinity' THEN '0001-01-01T00:00:00.000000Z'
        WHEN device_ts = 'infinity' THEN '9999-12-31T23:59:59.999999Z'
        ELSE to_char(device_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    END
WHERE seq IS NOT NULL AND dedupe_key = 'seq:' || seq;
