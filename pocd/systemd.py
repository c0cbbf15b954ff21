"""systemd's service notification protocol (sd_notify(3)) and the watchdog's health check.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket `$NOTIFY_SOCKET` names (a
leading '@' is the abstract namespace), so it is written here in a few lines: `sdnotify`, its
package, was last released in 2017 and adds nothing, and `systemd-python` builds against
libsystemd's headers.

The watchdog (`WatchdogSec=`, given as `$WATCHDOG_USEC`) is pinged by `Health`'s caller only
while the daemon works: the ping is sent from the event loop, so a blocked loop sends none, and
only when the store writer and the engine show progress within the watchdog's interval.

Must not: raise because systemd is absent or its socket is gone (a notification is advice; the
daemon runs on without it), or block the event loop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

__all__ = ["Health", "Systemd"]

log = structlog.get_logger("pocd.systemd")


class Systemd:
    """The notifications to the service manager that started this process, if one did."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._socket: socket.socket | None = None
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        if address.startswith(("/", "\0")):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(address)
            except OSError as exc:
                sock.close()
                log.warning("cannot reach systemd's notify socket", error=str(exc))
            else:
                sock.setblocking(False)
                self._socket = sock
        elif address:
            log.warning("unsupported NOTIFY_SOCKET address", address=address)
        # The watchdog is this process's when WATCHDOG_PID, if set, names it.
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s: float | None = int(usec) / 1e6 if usec.isdigit() and mine else None

    @property
    def active(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> None:
        """Send `fields` (`"READY=1"`, `"STATUS=..."`) as one notification."""
        if self._socket is None:
            return
        try:
            self._socket.send("\n".join(fields).encode())
        except OSError as exc:  # systemd gone or its queue full: the next one may pass
            log.warning("systemd notification not sent", error=str(exc), fields=fields[:1])

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd 253+ pairs the reload with the READY=1 that ends it.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@dataclass(frozen=True, slots=True)
class Health:
    """Whether the store writer and the engine make progress: each one either has nothing to
    do or did some work within `within` seconds (steady clock). `writer_beat`,
    `engine_beat` are the steady times of their last progress; `writer_idle`,
    `engine_idle` whether they have nothing waiting."""

    within: float
    writer_beat: Callable[[], float]
    writer_idle: Callable[[], bool]
    engine_beat: Callable[[], float]
    engine_idle: Callable[[], bool]

    def problems(self, now: float | None = None) -> list[str]:
        """What is stalled, as sentences; empty while both make progress."""
        now = time.monotonic() if now is None else now
        found = []
        for name, beat, idle in (
            ("the store writer", self.writer_beat, self.writer_idle),
            ("the engine", self.engine_beat, self.engine_idle),
        ):
            quiet = now - beat()
            if quiet > self.within and not idle():
                found.append(f"{name} has made no progress for {quiet:.0f} s")
        return found
