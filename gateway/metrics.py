"""Prometheus collectors, defined once here and updated by the components.

They live in the default registry (one gateway per process in production). Tests compare
deltas, never absolute values.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# MQTT
MQTT_CONNECTED = Gauge("gateway_mqtt_connected", "1 when connected to the broker")
MQTT_RECONNECTS = Counter("gateway_mqtt_reconnects_total", "Connections established after the first")
MQTT_TAKEOVERS = Counter(
    "gateway_mqtt_session_takeovers_total", "Times another client with our client id took the session over"
)
MQTT_RECEIVED = Counter("gateway_mqtt_received_total", "Messages received from the broker")
MQTT_INFLIGHT = Gauge("gateway_mqtt_inflight", "Messages received and not yet committed and acknowledged")
MQTT_INFLIGHT_BYTES = Gauge("gateway_mqtt_inflight_bytes", "Payload bytes of the messages in gateway_mqtt_inflight")
MQTT_PUBLISHED = Counter("gateway_mqtt_published_total", "Publishes confirmed by the broker")
MQTT_PUBLISH_QUEUE = Gauge("gateway_mqtt_publish_queue", "Publishes waiting or unconfirmed")
MQTT_PUBLISH_LATENCY = Histogram("gateway_mqtt_publish_seconds", "Publish to PUBACK", buckets=_LAT)
MQTT_PUBLISH_REFUSED = Counter(
    "gateway_mqtt_publish_refused_total", "Publishes the broker refused (PUBACK reason code >= 0x80)", ["code"]
)

# Outbox (durable outbound publishes)
OUTBOX_PENDING = Gauge("gateway_outbox_pending", "Publishes in the outbox waiting for a PUBACK")
OUTBOX_DEAD = Gauge("gateway_outbox_dead", "Dead-lettered publishes kept in the outbox")
OUTBOX_OLDEST = Gauge("gateway_outbox_oldest_seconds", "Age of the oldest waiting publish")
OUTBOX_RETRIES = Counter("gateway_outbox_retries_total", "Refused publishes scheduled for another attempt")
OUTBOX_DEAD_LETTERED = Counter("gateway_outbox_dead_lettered_total", "Publishes dead-lettered after the last attempt")

# Ingest
INGEST_STORED = Counter("gateway_messages_stored_total", "Readings stored", ["source"])
INGEST_DUPLICATES = Counter("gateway_messages_duplicate_total", "Redelivered readings recognised", ["source"])
INGEST_REJECTED = Counter("gateway_messages_rejected_total", "Packets refused, stored as rejects", ["reason"])
INGEST_BATCH = Histogram(
    "gateway_ingest_batch_size", "Messages per committed batch", buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000)
)
INGEST_LATENCY = Histogram("gateway_ingest_seconds", "Receive to commit", buckets=_LAT)
INGEST_DB_ERRORS = Counter("gateway_ingest_db_errors_total", "Batch writes that failed and were retried")

# Disk spool (PostgreSQL outages longer than SPOOL_AFTER)
SPOOL_ROWS = Gauge("gateway_spool_rows", "Messages in the disk spool waiting to drain to PostgreSQL")
SPOOL_BYTES = Gauge("gateway_spool_bytes", "Bytes the disk spool's rows take in its file")
SPOOL_FULL = Gauge("gateway_spool_full", "1 while the disk spool is at SPOOL_MAX_BYTES (ingest stops acking)")
SPOOL_SPOOLED = Counter("gateway_spool_spooled_total", "Messages committed to the disk spool and acked there")
SPOOL_DRAINED = Counter("gateway_spool_drained_total", "Spooled messages drained to PostgreSQL")

# Processor
PROCESSOR_PROCESSED = Counter("gateway_processor_processed_total", "Messages marked processed")
PROCESSOR_FAILED = Counter("gateway_processor_failed_total", "Message processing failures", ["action"])
PROCESSOR_DEAD = Counter("gateway_processor_dead_total", "Messages dead-lettered")
PROCESSOR_BACKLOG = Gauge("gateway_processor_backlog", "Unprocessed messages")
PROCESSOR_LAG = Gauge("gateway_processor_lag_seconds", "Age of the oldest unprocessed message")
PROCESSOR_RUN = Histogram("gateway_processor_run_seconds", "One processor run", buckets=_LAT)
EVENTS_APPENDED = Counter("gateway_events_total", "Events appended", ["type"])

# SSE
SSE_CLIENTS = Gauge("gateway_sse_clients", "Connected SSE clients")
SSE_DROPPED = Counter("gateway_sse_dropped_total", "SSE subscribers disconnected for being too slow")
SSE_STUCK = Counter("gateway_sse_stuck_total", "SSE streams cut because the client stopped reading")
SSE_REFUSED = Counter("gateway_sse_refused_total", "SSE streams refused at a limit", ["limit"])  # per_key|total

# HTTP: labelled only with values from fixed sets (see method_label), never with raw paths.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # the route label of a request no route template matched
HTTP_REQUESTS = Counter("gateway_http_requests_total", "HTTP requests", ["route", "method", "status"])
HTTP_LATENCY = Histogram("gateway_http_request_seconds", "HTTP request latency", ["route"], buckets=_LAT)

# Supervisor / database
RESTARTS = Counter("gateway_restarts_total", "Supervised group restarts", ["component"])
DB_UP = Gauge("gateway_database_up", "1 when the database answers")
COMPONENT_UP = Gauge("gateway_component_up", "1 when the component is healthy", ["component"])
ALERTS_ACTIVE = Gauge("gateway_alert_active", "1 while a built-in alert is firing", ["alert"])
RETENTION_DELETED = Counter(
    "gateway_retention_deleted_total", "Rows deleted because their retention expired", ["table"]
)
DISK_FREE_RATIO = Gauge(
    "gateway_disk_free_ratio", "Free fraction of the filesystem holding the path (database, logs)", ["path"]
)


def method_label(method: str) -> str:
    """The ``method`` label for an HTTP method: itself when it is a standard one, else ``other``."""
    return method if method in HTTP_METHODS else "other"


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, with one update per bucket (per batch, not per value).

    prometheus_client (0.2x) keeps per-bucket counts and a sum; it has no batch observe.
    """
    if not values:
        return
    bounds = histogram._upper_bounds
    counts: dict[int, int] = {}
    for v in values:
        i = bisect_left(bounds, v)
        counts[i] = counts.get(i, 0) + 1
    for i, n in counts.items():
        histogram._buckets[i].inc(n)
    histogram._sum.inc(sum(values))
