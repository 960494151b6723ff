-- Reject replay. Every stored row records the version of the packet schema it was validated
-- against (gateway.packets.SCHEMA_VERSION; rows stored before this migration were version 1). A
-- reject that a replay stored as a reading keeps its row as the audit trail: when (replayed_at)
-- and as which reading (message_id). A constant default makes ADD COLUMN a catalogue change, no
-- table rewrite (also on a partitioned messages table: it reaches every partition).
ALTER TABLE messages ADD COLUMN schema_version integer NOT NULL DEFAULT 1;
ALTER TABLE rejects ADD COLUMN schema_version integer NOT NULL DEFAULT 1;
ALTER TABLE rejects ADD COLUMN replayed_at timestamptz;
ALTER TABLE rejects ADD COLUMN message_id bigint;
