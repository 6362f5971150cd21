"""Talk to the service manager (sd_notify(3)) without libsystemd: a datagram to NOTIFY_SOCKET.

Both daemons run under `Type=notify` units (deploy/systemd/): they say `READY=1` once
they serve and, when the unit has `WatchdogSec=`, `WATCHDOG=1` every half interval from
their event loop, so a loop that hangs gets the daemon restarted. Outside systemd
(NOTIFY_SOCKET unset) every call is a no-op. The message format is parsed by
clustercore.sdnotify (what services tell their agent); this is the sending side.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("vipcluster.systemd")


def _address(value: str) -> str | bytes:
    if value.startswith("@"):  # abstract namespace
        return b"\0" + value[1:].encode()
    return value


def notify(*assignments: str) -> bool:
    """Send `NAME=value` lines to the service manager; False when there is none (or the
    send failed: the manager is gone, which must not stop the daemon)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not assignments:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.sendto("\n".join(assignments).encode(), _address(target))
        return True
    except OSError as e:
        log.warning("sd_notify to %s: %s", target, e)
        return False
    finally:
        s.close()


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None: no watchdog.
    WATCHDOG_PID, when set, must be ours (sd_watchdog_enabled(3))."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec) if usec else 0
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


async def ping_watchdog() -> None:
    """Ping the watchdog from the event loop for as long as it runs (a stuck loop stops
    the pings, and systemd restarts the daemon)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def stopping() -> None:
    notify("STOPPING=1")
