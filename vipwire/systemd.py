"""Talk to the service manager (sd_notify(3)) without libsystemd: a datagram to NOTIFY_SOCKET.

Both daemons run under `Type=notify` units (deploy/systemd/): they say `READY=1` once
they serve and, when the unit has `WatchdogSec=`, `WATCHDOG=1` every half interval from
their event loop, so a loop that hangs gets the daemon restarted. Outside systemd
(NOTIFY_SOCKET unset) every call is a no-op. The message format is parsed by
clustercore.sdnotify (what services tell their agent); this is the sending side.

The node agent also keeps descriptors in its manager's fd store (`store_fds`, FDSTORE=1;
the unit needs FileDescriptorStoreMax=; the lab supervisor does the same), and gets them
back when it is started again (`listen_fds`, sd_listen_fds(3)): its netfilter queues'
netlink sockets, so that a queue instance and the packets in it outlive a crash.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import socket

log = logging.getLogger("vipcluster.systemd")


def _address(value: str) -> str | bytes:
    if value.startswith("@"):  # abstract namespace
        return b"\0" + value[1:].encode()
    return value


def notify(*assignments: str, fds: list[int] | tuple[int, ...] = ()) -> bool:
    """Send `NAME=value` lines (and descriptors) to the service manager; False when there
    is none (or the send failed: the manager is gone, which must not stop the daemon)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not assignments:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        s.sendmsg(["\n".join(assignments).encode()], ancillary, 0, _address(target))
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


def store_fds(name: str, fds: list[int]) -> bool:
    """Put copies of `fds` in the manager's fd store under `name` (FDPOLL=0: a socket
    nobody reads must not be taken out of the store for being readable or hung up)."""
    return notify("FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=fds)


def fdstore_max() -> int | None:
    """How many descriptors the manager keeps for us (FileDescriptorStoreMax=, which
    systemd >= 254 exports as $FDSTORE; our unit sets it for older ones); None: not said."""
    try:
        n = int(os.environ.get("FDSTORE", ""))
    except ValueError:
        return None
    return n if n >= 0 else None


def remove_fds(name: str) -> bool:
    """Take every descriptor stored under `name` out of the manager's fd store."""
    return notify("FDSTOREREMOVE=1", f"FDNAME={name}")


LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 65536  # the queues' sockets and the connections a migration took out (nodeshim.hiddenkeep)


def listen_fds() -> list[tuple[str, int]]:
    """The descriptors the manager passed us (sd_listen_fds(3) with unset_environment):
    [(name, fd)] from fd 3 on, close-on-exec from now on; [] when there are none or they
    are not meant for this process (LISTEN_PID). The variables are removed, so that no
    process we start takes them for its own."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()) or not count:
        return []
    try:
        n = int(count)
    except ValueError:
        log.warning("LISTEN_FDS=%r is not a number: no descriptor taken", count)
        return []
    labels = names.split(":") if names else []
    out = []
    for i in range(max(0, min(n, MAX_LISTEN_FDS))):
        fd = LISTEN_FDS_START + i
        try:
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        except OSError:
            continue  # not open: the manager passed fewer than it said
        out.append((labels[i] if i < len(labels) else "unknown", fd))
    return out


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def stopping() -> None:
    notify("STOPPING=1")
