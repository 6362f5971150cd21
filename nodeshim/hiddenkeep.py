"""Connections taken out of a stopped program outlive the agent.

While a `process` migration runs, nodeshim.fdmove takes the stopped program's
connections out of it so that criu never sees them (criutcp.Taken.hide). From then until
the migration ends, the agent's duplicates are those sockets' only descriptors: an agent
killed then would take them with it (the kernel closes a socket with its last
descriptor; in repair mode silently, and each client later gets a reset). So before the
program closes its own, the agent puts copies in its service manager's fd store (FDNAME
`hidden-SERVICE`; systemd's FileDescriptorStoreMax=, the lab supervisor's store:
vipwire.systemd.store_fds) and writes where each one goes back (`hidden/SERVICE.json` in
its state directory: each process's pid and start time, each socket's number, inode and
close-on-exec flag, its epoll entries). The migration's end takes them out of the store
again: the copy has them (commit) or the program has them back (rollback).

A successor finds the copies among the descriptors the manager passes it
(queuekeep.take_fd_store) and the record beside them (`inherit`). A service it adopted
frozen that the registry says stays here gets each socket back at its number and the
epoll entries it misses (the predecessor may have died between deleting those and
closing the numbers), then the usual resume (orphans._end_frozen); for one that moved
away the copies are closed with the program (silent: repair mode). Anything else, such as
copies without a record or a record of a process that is gone, is closed and forgotten.

Without a manager, or with one whose store has no room for them all (systemd >= 254
says how many it keeps in $FDSTORE; our unit and the lab supervisor set it), nothing is
taken out: the connections stay in the program for criu, and for a successor.
"""

from __future__ import annotations

import array
import json
import logging
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

from clustercore.errors import KernelError
from vipwire import systemd

from . import adoption, fdmove, pidfd

log = logging.getLogger("vipcluster.node")

FDNAME_PREFIX = "hidden-"
FDS_PER_MESSAGE = 253  # SCM_MAX_FD: descriptors per SCM_RIGHTS message
RECORD_VERSION = 1


def fdname(service: str) -> str:
    return FDNAME_PREFIX + service


def service_of_fdname(name: str) -> str | None:
    if not name.startswith(FDNAME_PREFIX):
        return None
    return name[len(FDNAME_PREFIX):] or None


def _hex(code: str, numbers) -> str:
    return array.array(code, numbers).tobytes().hex()


def _unhex(code: str, text, what: str) -> list[int]:
    """A record's packed list back (ValueError if it is not one)."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: not a string")
    raw = bytes.fromhex(text)
    a = array.array(code)
    if len(raw) % a.itemsize:
        raise ValueError(f"{what}: {len(raw)} bytes")
    a.frombytes(raw)
    return a.tolist()


def _record_path(state_dir: str, service: str) -> str:
    return os.path.join(state_dir, "hidden", service + ".json")


def _drop(state_dir: str, service: str) -> None:
    """A service's copies out of the store (the manager closes them) and its record removed."""
    systemd.remove_fds(fdname(service))
    try:
        os.unlink(_record_path(state_dir, service))
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove the record of %s's connections: %s", service, e)


class PidPlan(NamedTuple):
    """One process's connections to take out (criutcp.Taken.hide makes these as plain
    tuples): {its fd: our duplicate}, their inodes ({its fd: inode}), their epoll
    entries, the numbers that are close-on-exec."""
    pid: int
    ours: dict[int, int]
    inodes: dict[int, int]
    regs: list[fdmove.Registration]
    cloexec: set[int]


class HiddenKeeper:
    """The source's side: `keep` before the connections leave the program, `forget` when
    the migration has ended (the copy or the program has them)."""

    def __init__(self, state_dir: str, reserved: int) -> None:
        self.state_dir = state_dir
        self.reserved = reserved  # the store's places taken by other descriptors (the queues)
        self.kept: dict[str, int] = {}  # service: descriptors in the store

    def room(self) -> tuple[int, str]:
        """How many more the store takes (0 with the reason when none)."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return 0, "no service manager keeps descriptors for us"
        cap = systemd.fdstore_max()
        if cap is None:
            return 0, "the service manager does not say how many descriptors it keeps ($FDSTORE)"
        left = cap - self.reserved - sum(self.kept.values())
        return max(0, left), f"its fd store keeps {cap}, {max(0, left)} free"

    def keep(self, service: str, root: int, plans: list[tuple]) -> bool:
        """Copies of every duplicate in the store and the record written (root: the
        service's process, whose tree the plans' processes are); False (nothing kept,
        nothing left) when they cannot all be kept."""
        plans = [PidPlan(*p) for p in plans]
        n = sum(len(p.ours) for p in plans)
        room, why = self.room()
        if n > room:
            log.info("%s: %d connections stay in the program for criu: %s", service, n, why)
            return False
        path = _record_path(self.state_dir, service)
        # inside the freeze: the per-connection lists as hex of packed arrays (1,000
        # connections: 0.2 ms; as JSON lists of numbers 2 ms)
        record = {"version": RECORD_VERSION, "service": service, "root": root, "processes": [
            {"pid": p.pid, "started": adoption.start_ticks(p.pid),
             "fds": _hex("q", p.ours), "inodes": _hex("Q", map(p.inodes.__getitem__, p.ours)),
             "cloexec": _hex("q", p.cloexec), "regs": _hex("Q", chain.from_iterable(p.regs))} for p in plans]}
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(record, f, separators=(",", ":"))
            os.replace(path + ".tmp", path)
        except OSError as e:
            log.warning("%s: cannot record its connections (%s): they stay in the program", service, e)
            return False
        name = fdname(service)
        systemd.remove_fds(name)  # a stale entry of an earlier move
        fds = [fd for p in plans for fd in p.ours.values()]
        for i in range(0, len(fds), FDS_PER_MESSAGE):
            if not systemd.store_fds(name, fds[i:i + FDS_PER_MESSAGE]):
                log.warning("%s: the fd store refused its connections: they stay in the program", service)
                _drop(self.state_dir, service)
                return False
        self.kept[service] = n
        return True

    def forget(self, service: str) -> None:
        """The migration has ended: the store's copies closed, the record removed."""
        self.kept.pop(service, None)
        _drop(self.state_dir, service)



@dataclass
class _Process:
    pid: int
    started: int | None
    ours: dict[int, int]  # its fd: the store's copy (ours now)
    regs: list[fdmove.Registration]
    cloexec: set[int]


@dataclass
class Inherited:
    """One service's connections a dead agent had taken out of its program: the copies
    the store passed us, matched to the record by inode."""
    service: str
    state_dir: str
    root: int | None = None  # the service's process (nginx's master holds no connection)
    processes: list[_Process] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)  # every copy we hold (closed by close())

    def __len__(self) -> int:
        return sum(len(p.ours) for p in self.processes)

    def put_back(self) -> int:
        """Each socket into its stopped process at its number, where it is missing, and
        the recorded epoll entries that are missing. KernelError on a failure; a process
        that is not the recorded one, or not stopped, raises too (nothing put there)."""
        n = 0
        for p in self.processes:
            if adoption.start_ticks(p.pid) != p.started or p.started is None:
                raise KernelError("put back connections", None, f"pid {p.pid} is not the recorded process")
            if pidfd.process_state(p.pid) not in pidfd.STOPPED_STATES:
                raise KernelError("put back connections", None, f"pid {p.pid} is not stopped")
            have = {(r.epfd, r.tfd) for r in fdmove.registrations(p.pid, skip=set(p.ours))}
            missing = [r for r in p.regs if (r.epfd, r.tfd) not in have]
            try:
                present = {int(x) for x in os.listdir(f"/proc/{p.pid}/fd")}
            except OSError as e:
                raise KernelError("list fds", e.errno, f"pid {p.pid}") from None
            n += sum(1 for t in p.ours if t not in present)
            fdmove.put_back(p.pid, p.ours, missing, p.cloexec, all_regs=True)
        return n

    def close(self) -> None:
        """Our copies closed, the store's too, the record removed."""
        fds, self.fds, self.processes = self.fds, [], []
        for fd in fds:
            os.close(fd)
        _drop(self.state_dir, self.service)


def _read_record(path: str) -> dict:
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION \
            or not isinstance(record.get("processes"), list) or not isinstance(record.get("root"), int):
        raise ValueError("not a record of this version")
    return record


def _processes(record: dict, by_inode: dict[int, int]) -> list[_Process]:
    """The record's processes with the copies matched by inode (ValueError on a bad record)."""
    out = []
    for entry in record["processes"]:
        pid, started = entry["pid"], entry["started"]
        if not (isinstance(pid, int) and pid > 0 and (started is None or isinstance(started, int))):
            raise ValueError(f"a bad process entry for pid {pid!r}")
        fds, inodes = _unhex("q", entry["fds"], "fds"), _unhex("Q", entry["inodes"], "inodes")
        cloexec, flat = _unhex("q", entry["cloexec"], "cloexec"), _unhex("Q", entry["regs"], "regs")
        if len(fds) != len(inodes) or len(flat) % 5 or min(fds, default=0) < 0:
            raise ValueError(f"pid {pid}: {len(fds)} descriptors, {len(inodes)} inodes, {len(flat)} numbers of epoll entries")
        ours = {}
        for target, ino in zip(fds, inodes):
            if ino in by_inode:
                ours[target] = by_inode.pop(ino)
        regs = [fdmove.Registration(*flat[i:i + 5]) for i in range(0, len(flat), 5)]
        if any(r.epfd > 0x7fffffff or r.tfd > 0x7fffffff or r.events > 0xffffffff for r in regs):
            raise ValueError(f"pid {pid}: an epoll entry out of range")
        out.append(_Process(pid, started, ours, [r for r in regs if r.tfd in ours], set(cloexec)))
    return out


def inherit(state_dir: str, stored: dict[str, list[int]]) -> dict[str, Inherited]:
    """What a dead agent had hidden: {service: Inherited} for the services with copies in
    the store and a readable record; copies without a record (or that no record names) are
    closed, records without copies removed."""
    out: dict[str, Inherited] = {}
    rec_dir = os.path.join(state_dir, "hidden")
    try:
        recorded = {f[:-5] for f in os.listdir(rec_dir) if f.endswith(".json")}
    except FileNotFoundError:
        recorded = set()
    for service in sorted(recorded | set(stored)):
        fds = stored.get(service, [])
        inh = Inherited(service, state_dir, fds=list(fds))
        if not fds:
            inh.close()  # nothing was kept (it died before storing): the program has them
            continue
        try:
            by_inode = {os.fstat(fd).st_ino: fd for fd in fds}
            record = _read_record(_record_path(state_dir, service))
            inh.processes = _processes(record, by_inode)
            inh.root = record["root"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%d connections of %s kept for us cannot be put back (%s): closed", len(fds), service, e)
            inh.close()
            continue
        if by_inode:
            log.warning("%d descriptors kept for %s are not in its record: closed", len(by_inode), service)
            for fd in by_inode.values():
                os.close(fd)
                inh.fds.remove(fd)
        log.info("%s: %d connections a dead agent had taken out of the processes of pid %d, kept for us",
                 service, len(inh), inh.root)
        out[service] = inh
    return out
