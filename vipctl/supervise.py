"""The lab's supervisor: systemd's Restart=always for the lab's daemons.

`vipctl lab up` writes a plan (supervise.json: each daemon's name, namespace and vipctl
arguments) and starts `python -m vipctl.supervise STATE_DIR` in its own session. It
starts every daemon in its namespace, and a daemon that exits, however it exits, is
started again within RESTART_DELAY_S + POLL_S (well under a second). It keeps
`pids.json` ({"supervisor": pid, "gateway": pid, "n1": pid, ...}, replaced atomically at
every restart) and `supervisor.json`. A daemon with a file `held/NAME` is not restarted
(`vipctl.lab.hold_daemon`: stopped on purpose) until the file goes; then (restart counts and last exit status). On SIGTERM
it stops the agents, then the gateway (SIGTERM, then SIGKILL), and exits: an agent that
exits leaves its services running, so `lab down` ends what remains in the namespaces.

It is also systemd's file-descriptor store (FileDescriptorStoreMax=): every vipctl daemon
gets its own NOTIFY_SOCKET (`fdstore/NAME`), only that daemon's PID is heard on it
(systemd's NotifyAccess=main, by the kernel's SO_PASSCRED), `FDSTORE=1` + `FDNAME=`
keeps the descriptors sent with it, `FDSTOREREMOVE=1` + `FDNAME=` closes them, and a
restarted daemon gets them as LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID from fd 3 on. The
node agent keeps its netfilter queues' sockets there: a queue instance, and the packets
in it, survive the agent's death (nodeshim.queue).
"""

from __future__ import annotations

import array
import fcntl
import json
import logging
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time

from clustercore.sdnotify import MAX_DATAGRAM, NotifyError, parse

from . import nsutil

log = logging.getLogger("vipcluster.supervise")

POLL_S = 0.05
RESTART_DELAY_S = 0.1  # systemd's RestartSec: a crash loop must not spin the CPU
STOP_TIMEOUT_S = 8.0
# per daemon (FileDescriptorStoreMax=, told to it in $FDSTORE as systemd >= 254 does); more
# are closed, as systemd does. A node agent keeps its queues here and, while a `process`
# migration runs, the connections it took out of the program (nodeshim.hiddenkeep).
FDSTORE_MAX = 4096
MAX_FDS_PER_MESSAGE = 253
UCRED = struct.Struct("3i")
# the restarted daemon's side of LISTEN_FDS: the stored descriptors arrive above 3 + n
# (argv[2:2+n]) and are moved to 3.. before the daemon is executed with LISTEN_PID = its pid
_EXEC_WITH_FDS = (
    "import os, sys\n"
    "n = int(sys.argv[1])\n"
    "for i, fd in enumerate(int(a) for a in sys.argv[2:2 + n]):\n"
    "    os.dup2(fd, 3 + i)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[2 + n], sys.argv[2 + n:])\n"
)


class FdStore:
    """One daemon's NOTIFY_SOCKET and the descriptors it stored."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fds: list[tuple[str, int]] = []
        self.pid: int | None = None  # the only sender heard (the daemon's current PID)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)

    def drain(self) -> None:
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(  # close-on-exec as they arrive
                    MAX_DATAGRAM + 1, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(UCRED.size),
                    socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            fds, pid = [], None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                    fds += list(a)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= UCRED.size:
                    pid = UCRED.unpack(payload[: UCRED.size])[0]
            self._take(data, fds, pid, bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)))

    def _take(self, data: bytes, fds: list[int], pid: int | None, truncated: bool) -> None:
        try:
            if pid is None or pid != self.pid:
                raise NotifyError(f"from pid {pid}, not the daemon's ({self.pid})")
            if truncated:
                raise NotifyError("truncated")
            note = parse(data)
        except NotifyError as e:
            log.warning("%s: notification dropped: %s", self.path, e)
            for fd in fds:
                os.close(fd)
            return
        name = note.fields.get("FDNAME")
        if note.fields.get("FDSTOREREMOVE") == "1" and name:
            self.remove(name)
        if note.fdstore and fds:
            for fd in fds:
                if len(self.fds) >= FDSTORE_MAX:
                    log.warning("%s: fd store full, descriptor %s not kept", self.path, note.fdname)
                    os.close(fd)
                else:
                    self.fds.append((note.fdname, fd))
        else:
            for fd in fds:  # descriptors without FDSTORE=1 are not kept
                os.close(fd)

    def remove(self, name: str) -> None:
        for n, fd in [e for e in self.fds if e[0] == name]:
            os.close(fd)
        self.fds = [e for e in self.fds if e[0] != name]

    def passed(self, argv: list[str], env: dict) -> tuple[list[str], list[int]]:
        """The argv that starts the daemon with the stored descriptors, and the copies
        (above 3 + n, so that moving them to 3.. overwrites none) to pass and close."""
        if not self.fds:
            return argv, []
        n = len(self.fds)
        copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + n) for _, fd in self.fds]
        env["LISTEN_FDS"] = str(n)
        env["LISTEN_FDNAMES"] = ":".join(name for name, _ in self.fds)
        return [sys.executable, "-c", _EXEC_WITH_FDS, str(n), *map(str, copies), *argv], copies

    def close(self) -> None:
        for _, fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class Supervisor:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        with open(os.path.join(state_dir, "supervise.json")) as f:
            self.plan = json.load(f)["daemons"]
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {d["name"]: 0 for d in self.plan}
        self.last_exit: dict[str, int | None] = {d["name"]: None for d in self.plan}
        self.stopping = False
        self.stores: dict[str, FdStore] = {}
        store_dir = os.path.join(state_dir, "fdstore")
        os.makedirs(store_dir, mode=0o700, exist_ok=True)
        self.wakeup = select.poll()
        for d in self.plan:
            if not d.get("argv"):  # vipctl daemons speak sd_notify; other programs not here
                self.stores[d["name"]] = FdStore(os.path.join(store_dir, d["name"]))
                self.wakeup.register(self.stores[d["name"]].sock, select.POLLIN)

    def spawn(self, d: dict) -> None:
        log_dir = os.path.join(self.state_dir, "logs")
        os.makedirs(log_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(log_dir, f"{d['name']}.log"), "ab") as logf:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            for k in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "FDSTORE"):
                env.pop(k, None)
            ns = d["ns"]
            # a vipctl daemon (args), or another program (argv: keepalived, etcd)
            argv = d.get("argv") or [sys.executable, "-m", "vipctl", *d["args"]]
            store = self.stores.get(d["name"])
            copies: list[int] = []
            if store is not None:
                store.drain()  # what the dead instance stored up to its end is passed on
                env["NOTIFY_SOCKET"] = store.path
                env["FDSTORE"] = str(FDSTORE_MAX)
                argv, copies = store.passed(argv, env)
            try:
                self.procs[d["name"]] = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL,
                    stdout=logf, stderr=logf, preexec_fn=lambda: nsutil.enter(ns),
                    start_new_session=True, env=env, pass_fds=copies)
            finally:
                for fd in copies:
                    os.close(fd)
            if store is not None:
                store.pid = self.procs[d["name"]].pid

    def record(self) -> None:
        pids = {"supervisor": os.getpid(), **{n: p.pid for n, p in self.procs.items()}}
        _write(os.path.join(self.state_dir, "pids.json"), pids)
        _write(os.path.join(self.state_dir, "supervisor.json"),
               {n: {"pid": p.pid, "restarts": self.restarts[n], "last_exit": self.last_exit[n]}
                for n, p in self.procs.items()})

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        for d in self.plan:
            self.spawn(d)
        self.record()
        while not self.stopping:
            # woken by a notification at once: a sender blocks once 10 (net.unix.max_dgram_qlen)
            # wait unread, and an agent storing a frozen program's connections is in its freeze
            self.wakeup.poll(POLL_S * 1000)
            for store in self.stores.values():
                store.drain()
            changed = False
            for d in self.plan:
                p = self.procs[d["name"]]
                code = p.poll()
                if code is None or self.stopping:
                    continue
                if os.path.exists(os.path.join(self.state_dir, "held", d["name"])):
                    continue  # the operator (a test) stopped it on purpose: not restarted

                self.last_exit[d["name"]] = code
                self.restarts[d["name"]] += 1
                print(f"{time.strftime('%H:%M:%S')} {d['name']} (pid {p.pid}) exited with {code}; "
                      f"restarting", flush=True)
                time.sleep(RESTART_DELAY_S)
                self.spawn(d)
                changed = True
            if changed:
                self.record()
        self.stop_all()

    def _on_term(self, signum, frame) -> None:
        self.stopping = True

    def stop_all(self) -> None:
        # agents first (they leave their services for `lab down`), the gateway last
        order = sorted(self.procs, key=lambda n: n == "gateway" or not n[1:].isdigit())
        for name in order:
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for store in self.stores.values():
            store.close()


def main() -> None:
    # the stores hold up to FDSTORE_MAX descriptors per daemon (and a copy of one daemon's
    # while it is started again): the soft limit up to the hard one (no privilege needed)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("descriptor limit left at %d: %s", soft, e)
    Supervisor(sys.argv[1]).run()


if __name__ == "__main__":
    main()
