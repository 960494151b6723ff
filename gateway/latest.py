"""The latest reading of each device, kept in memory from what this instance stored.

At start-up the composition root seeds it from the store (:meth:`LatestReadings.seed`, each
device's newest stored reading), so a restart does not empty it. Then ingest feeds it after each
commit (:meth:`LatestReadings.stored`), the API after ``POST /packets``
(:meth:`LatestReadings.remember`); ``GET /api/v1/latest``, ``/ping`` and the dashboard read it.
Bounded: past ``max_devices`` the device seen longest ago is forgotten. Plain data, Trio thread only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.store.base import InsertOutcome, NewMessage, StoredMessage


class LatestReadings:
    """The latest reading per device (see the module docstring)."""

    def __init__(self, *, max_devices: int = 10_000) -> None:
        self.max_devices = max_devices
        self._latest: dict[str, dict[str, Any]] = {}  # oldest update first

    def stored(self, messages: list[NewMessage], outcomes: list[InsertOutcome]) -> None:
        """A committed batch (ingest's ``on_stored``): keep each device's last new reading.

        Duplicates are skipped; only the last reading of a device in the batch is encoded.
        """
        latest: dict[str, dict[str, Any]] = {}
        for message, outcome in zip(reversed(messages), reversed(outcomes), strict=True):
            if outcome.duplicate or message.device_id in latest:
                continue
            latest[message.device_id] = message.to_json(outcome.id)
        for device in reversed(latest):  # in batch order: the last one is the newest update
            self._put(device, latest[device])

    def seed(self, newest_first: Iterable[StoredMessage]) -> int:
        """Add stored readings (each device's newest, newest first: ``Store.latest_per_device``)
        for devices not known yet; returns how many were added.

        A device already here was updated by a commit since start-up, which is newer than what
        the store had when it was read, so it is kept. Seeded devices count as seen before them.
        """
        known = dict(self._latest)  # oldest update first
        self._latest.clear()
        added = 0
        for message in reversed(list(newest_first)):  # oldest first, so the bound drops the oldest
            if message.device_id not in known:
                self._put(message.device_id, _reading(message))
                added += 1
        for device, reading in known.items():
            self._put(device, reading)
        return added

    def remember(self, readings: Iterable[Mapping[str, Any]]) -> None:
        """Record committed readings (dicts with ``device_id``) as the latest of their devices."""
        for reading in readings:
            device = reading.get("device_id")
            if isinstance(device, str):
                self._put(device, dict(reading))

    def _put(self, device: str, reading: dict[str, Any]) -> None:
        if device not in self._latest and len(self._latest) >= self.max_devices:
            # Forget the oldest device seen rather than grow without bound.
            self._latest.pop(next(iter(self._latest)))
        self._latest.pop(device, None)
        self._latest[device] = reading

    def latest(self) -> dict[str, dict[str, Any]]:
        """The latest reading per device (a copy, sorted by device id)."""
        return {k: self._latest[k] for k in sorted(self._latest)}

    @property
    def devices(self) -> int:
        """How many devices :meth:`latest` knows."""
        return len(self._latest)


def _reading(message: StoredMessage) -> dict[str, Any]:
    """A stored row as :meth:`NewMessage.to_json` shows a new one (no processing fields)."""
    full = message.to_json()
    return {k: full[k] for k in _READING_KEYS}


_READING_KEYS = (
    "id",
    "device_id",
    "timestamp",
    "received_at",
    "seq",
    "measurements",
    "status",
    "battery",
    "source",
    "schema_version",
)
