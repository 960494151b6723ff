"""The systemd notify protocol (``sd_notify``), spoken directly: one datagram to ``$NOTIFY_SOCKET``.

Under ``Type=notify`` systemd waits for ``READY=1`` before it considers the service started, shows
``STATUS=`` lines in ``systemctl status``, restarts the service when ``WATCHDOG=1`` stops arriving
within ``WatchdogSec=``, and knows a stop or reload is in progress from ``STOPPING=1`` /
``RELOADING=1``. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.

A notification must never take the gateway down: sends do not raise, and a failing socket is
logged once at DEBUG.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger("gateway.systemd")


class Notifier:
    """Sends state notifications to the service manager named by ``NOTIFY_SOCKET``.

    ``environ`` defaults to ``os.environ`` (read once, here). An address starting with ``@`` is in
    the abstract namespace (Linux). Only ``AF_UNIX`` addresses are supported; anything else makes
    the notifier disabled.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address: str | bytes | None = _parse_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failed_logged = False

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (``NOTIFY_SOCKET`` is set and usable)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None without a watchdog.

        None as well when ``WATCHDOG_PID`` names another process (the watchdog is not ours).
        """
        return self._watchdog_interval

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"KEY=value"`` lines) as one datagram; True when it was sent."""
        if self._address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a manager that does not read its queue.
                self._sock.setblocking(False)
            self._sock.sendto(data, self._address)
        except OSError as exc:
            if not self._failed_logged:
                self._failed_logged = True
                log.debug("sd_notify to %r failed: %s (further failures not logged)", self._address, exc)
            return False
        return True

    def ready(self) -> bool:
        """Tell systemd every component has started (``READY=1``); also after a reload."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """Set the one-line ``STATUS=`` shown by ``systemctl status`` (newlines become spaces)."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        """Tell systemd a clean shutdown has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """Tell systemd a reload has begun; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is included as systemd 253+ requires for ``Type=notify-reload``.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """Keep the watchdog from firing (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before a start or stop times out (``EXTEND_TIMEOUT_USEC``)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    async def run_watchdog(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send ``WATCHDOG=1`` every :attr:`watchdog_interval` seconds. Runs until cancelled.

        The ping is tied to the event loop making progress and to nothing else: a stuck loop stops
        it (and systemd restarts us), while a database or broker outage does not, because a restart
        would not fix those and would only turn an outage into a restart loop. Without a watchdog
        it just waits, so it can sit in a nursery unconditionally.
        """
        interval = self._watchdog_interval
        task_status.started()
        if interval is None or self._address is None:
            await trio.sleep_forever()
            return
        while True:
            self.watchdog()
            await trio.sleep(interval)

    async def run_status(
        self,
        status: Callable[[], str],
        *,
        every: float = 1.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send ``status()`` as the ``STATUS=`` line whenever it changes, looking every ``every``
        seconds. Runs until cancelled."""
        task_status.started()
        last = ""
        while True:
            text = status()
            if text != last:
                self.status(text)
                last = text
            await trio.sleep(every)

    def close(self) -> None:
        """Close the socket (it is reopened on the next send)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _parse_address(raw: str) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode("utf-8")
    if raw.startswith("/"):
        return raw
    log.debug("NOTIFY_SOCKET %r is not an AF_UNIX address; notifications disabled", raw)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
