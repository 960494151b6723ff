-- A redelivery is the same packet: same device, seq AND timestamp. Keys were 'seq:<n>', which threw
-- away every reading of a device whose counter restarted (reboot, OTA update). The new key is
-- 'seq:<n>@<device_ts>' (device_ts is already UTC text YYYY-MM-DDTHH:MM:SS.ffffffZ), exactly the
-- text of gateway.packets.Packet.dedupe_key.
UPDATE messages
SET dedupe_key = dedupe_key || '@' || device_ts
WHERE seq IS NOT NULL AND dedupe_key = 'seq:' || seq;
