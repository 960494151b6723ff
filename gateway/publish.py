"""The outbound side as the processor and the API see it: a bounded queue of MQTT publishes."""

from __future__ import annotations

from typing import Protocol


class Publisher(Protocol):
    """Queues a QoS 1 publish on ``MQTT_PUBLISH_TOPIC`` (or ``<topic>/<subtopic>``).

    ``publish`` waits while the outbound queue is full (backpressure); publishes queued while the
    broker is down are sent after reconnect, and re-sent until the broker confirms them.
    ``publish_nowait`` raises :class:`~gateway.errors.MqttUnavailable` when the queue is full.
    """

    async def publish(self, payload: bytes, subtopic: str | None = None) -> None:
        """Queue one publish; waits for room."""
        ...

    def publish_nowait(self, payload: bytes, subtopic: str | None = None) -> None:
        """Queue one publish or raise MqttUnavailable when the queue is full."""
        ...
