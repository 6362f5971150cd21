"""Small namespace helpers for the lab and tests (enter a netns, find its processes)."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def enter(name: str) -> None:
    """Move the calling thread (use in a child before exec) into network namespace `name`."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def pids_in(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is `name`."""
    try:
        target = os.stat(netns_path(name))
    except FileNotFoundError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino) or st.st_ino == target.st_ino:
            out.append(int(entry))
    return out
