-- PostgreSQL partitions messages by received_at (its 0004); SQLite has no partitions: retention
-- there is the batched DELETE (gateway/retention.py). Kept so both dialects number alike.
SELECT 1;
