"""The agent's NOTIFY_SOCKET: the systemd file-descriptor store, per service.

One datagram socket per agent (a path under the agent's state directory). Every service
the agent starts gets it as NOTIFY_SOCKET. Datagrams carry sd_notify(3) assignments
(parsed by clustercore.sdnotify) and, for FDSTORE=1, descriptors (SCM_RIGHTS). The kernel
attaches the sender's credentials (SO_PASSCRED), so a message is taken as from the service
whose process group the sender is in, never from what the message claims; a message from
any other process is dropped and logged.

The handoff migration reads a stopped program's store: its connections by name, and the
memfd named `state` with its user-space state (clustercore.sdnotify.STATE_FDNAME).

How the agent knows a program speaks the handoff: it says so, once it serves, with an
`FDSTORE=1` that carries no descriptor (`READY=1\nFDSTORE=1`): "I keep my state in the fd
store". Under systemd that message stores nothing and is harmless. A service asked to
migrate with `--migrate auto` then moves by handoff (clustercore.kinds.migration_strategy);
one that never said it moves its whole process (criu).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable

from clustercore.sdnotify import MAX_DATAGRAM, NotifyError, Notification, parse

log = logging.getLogger("vipcluster.fdstore")

MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD
SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)
UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass
class Store:
    """What one service has told us: readiness, status, and its stored descriptors."""
    ready: bool = False
    stopping: bool = False
    handoff: bool = False  # it announced the fd-store handoff (FDSTORE=1, no descriptor)
    batch: bool = False  # ...and the batched one on its vip-batch channel (X_VIP_BATCH=1)
    status: str = ""
    fds: list[tuple[str, int]] = field(default_factory=list)  # (name, fd we own), in order

    def take(self) -> list[tuple[str, int]]:
        """Hand the stored descriptors over (the caller owns them now)."""
        out, self.fds = self.fds, []
        return out

    def close(self) -> None:
        for _, fd in self.take():
            os.close(fd)

    def begin_handover(self) -> None:
        """Before the handoff signal: nothing stale counts (a rolled-back handoff left
        STOPPING=1 behind); what it announced stays."""
        self.close()
        self.stopping = False


class NotifySocket:
    def __init__(self, path: str, service_of_pid: Callable[[int], str | None]) -> None:
        """`service_of_pid(pid)` names the service a sender belongs to, or None."""
        self.path = path
        self.service_of_pid = service_of_pid
        self.stores: dict[str, Store] = {}
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        os.chmod(path, 0o600)  # services run as root here; nobody else may write
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def store(self, service: str) -> Store:
        return self.stores.setdefault(service, Store())

    def forget(self, service: str) -> None:
        store = self.stores.pop(service, None)
        if store is not None:
            store.close()

    def drain(self) -> int:
        """Read every waiting notification; returns how many were taken."""
        n = 0
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    MAX_DATAGRAM + 1, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(UCRED.size))
            except (BlockingIOError, InterruptedError):
                return n
            fds, pid = _ancillary(ancdata)
            if self._take(data, fds, pid, truncated=bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))):
                n += 1

    def _take(self, data: bytes, fds: list[int], pid: int | None, truncated: bool) -> bool:
        service = self.service_of_pid(pid) if pid is not None else None
        try:
            if service is None:
                raise NotifyError(f"notification from pid {pid}, which runs no service of ours")
            if truncated:
                raise NotifyError("notification truncated (too long or too many descriptors)")
            note = parse(data)
        except NotifyError as e:
            log.warning("dropped a notification: %s", e)
            for fd in fds:
                os.close(fd)
            return False
        self._apply(self.store(service), note, fds)
        return True

    @staticmethod
    def _apply(store: Store, note: Notification, fds: list[int]) -> None:
        store.ready = store.ready or note.ready
        store.stopping = store.stopping or note.stopping
        if note.status is not None:
            store.status = note.status
        if note.fields.get("X_VIP_BATCH") == "1":
            store.batch = True
        if note.fdstore and not fds:
            store.handoff = True
        elif note.fdstore:
            store.fds += [(note.fdname, fd) for fd in fds]
        else:
            for fd in fds:  # descriptors without FDSTORE=1 are not kept (as systemd does)
                os.close(fd)

    def close(self) -> None:
        for name in list(self.stores):
            self.forget(name)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _ancillary(ancdata) -> tuple[list[int], int | None]:
    fds: list[int] = []
    pid = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds += list(arr)
        elif level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS and len(payload) >= UCRED.size:
            pid = UCRED.unpack(payload[: UCRED.size])[0]
    return fds, pid


def as_objects(stored: list[tuple[str, int]]) -> list[tuple[str, object]]:
    """Stored descriptors as objects the migration's commands use (they all have
    fileno() and close()): sockets as sockets, anything else (the state memfd) as a file."""
    out: list[tuple[str, object]] = []
    for name, fd in stored:
        try:
            out.append((name, socket.socket(fileno=fd)))
        except OSError:  # not a socket
            out.append((name, os.fdopen(fd, "rb", buffering=0)))
    return out


def read_state(f, limit: int) -> bytes:
    """The content of a stored state memfd, from its start, at most `limit` bytes."""
    os.lseek(f.fileno(), 0, os.SEEK_SET)
    data = b""
    while len(data) <= limit:
        chunk = os.read(f.fileno(), 1 << 20)
        if not chunk:
            return data
        data += chunk
    raise NotifyError(f"the stored state is larger than {limit} bytes")


def process_group_of(pid: int) -> int | None:
    """The process group of `pid` (services are started as group leaders), or None."""
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
