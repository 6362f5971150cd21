#!/usr/bin/env python3
"""A third-party service that vipcluster can move live with the `handoff` strategy.

Standard library only. It speaks two systemd protocols and nothing of vipcluster's:

- socket activation (sd_listen_fds(3)): its sockets arrive as descriptors 3.. with
  LISTEN_FDS / LISTEN_FDNAMES; names `tcp-PORT` and `udp-PORT` are listeners and UDP
  sockets, `conn-PORT` established connections, `state` a memfd with saved state;
- the file-descriptor store (sd_notify(3), NOTIFY_SOCKET): once serving it says
  `READY=1` and `FDSTORE=1` with no descriptor attached: "I hand over through the fd
  store" (under systemd this stores nothing; vipcluster's agent then moves it with the
  `handoff` strategy when it was added with `--migrate auto`). On SIGUSR1 (the handoff
  signal) it stops serving, flushes what the kernel will take, writes its state (the
  counters; per connection what it still owes and a partial line) into a memfd, stores the
  memfd and all its sockets with `FDSTORE=1` + `FDNAME=`, says `STOPPING=1` and touches
  nothing more until SIGCONT (the agent stops it meanwhile). If the move is rolled back
  it gets SIGCONT and carries on; if it succeeds it is killed and its successor receives
  everything back as LISTEN_FDS.

The service: TCP lines `INCR name` -> the new value, `GET name` -> the value; UDP
datagrams echoed back. Run it as vipcluster does:

    vipctl service add counter --node n1 --port tcp:7000 --port udp:7000 \
        --exec "python3 examples/handoff_counter.py" --migrate auto

(`--migrate handoff` says the same explicitly: the move is then refused, not done with
criu, if the program has not announced the fd store.)
"""

from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import sys

LISTEN_FDS_START = 3
HANDOFF_SIGNAL = signal.SIGUSR1
FDS_PER_MESSAGE = 250  # below the kernel's SCM_MAX_FD (253)


def listen_fds() -> list[tuple[str, int]]:
    """(name, fd) of the descriptors passed to us, if they are meant for this process."""
    if os.environ.get("LISTEN_PID") not in (None, str(os.getpid())):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if n else []
    names += ["unknown"] * (n - len(names))
    return [(names[i], LISTEN_FDS_START + i) for i in range(n)]


def notify(text: str, fds: list[int] = ()) -> None:
    """One sd_notify(3) message, with descriptors attached. A failure is logged, never
    fatal (as with sd_notify(3)): the manager may be restarting and will adopt us."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            s.sendmsg([text.encode()], anc, 0, path)
    except OSError as e:
        print(f"sd_notify {text.splitlines()[0]!r}: {e.strerror}", file=sys.stderr, flush=True)


def peer_key(s: socket.socket) -> str:
    host, port = s.getpeername()[:2]
    return f"{host}:{port}"


class Counter:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.counts: dict[str, int] = {}
        self.sockets: list[tuple[str, socket.socket]] = []  # listeners and UDP, by name
        self.conns: dict[socket.socket, dict] = {}  # connection -> {"in": bytes, "out": bytes}
        self.saved: dict[str, dict] = {}  # per peer, from the state memfd
        self.handoff = False

    # --- start-up ---------------------------------------------------------------------
    def adopt(self, fds: list[tuple[str, int]]) -> None:
        for name, fd in fds:
            if name == "state":
                with os.fdopen(fd, "rb") as f:
                    state = json.loads(f.read() or b"{}")
                self.counts = {k: int(v) for k, v in state.get("counts", {}).items()}
                self.saved = state.get("conns", {})
        for name, fd in fds:
            if name == "state":
                continue
            s = socket.socket(fileno=fd)
            s.setblocking(False)
            if name.startswith("conn-"):
                self.add_conn(s)
            elif s.type == socket.SOCK_DGRAM:
                self.sockets.append((name, s))
                self.sel.register(s, selectors.EVENT_READ, self.on_datagram)
            else:
                self.sockets.append((name, s))
                self.sel.register(s, selectors.EVENT_READ, self.on_accept)

    def add_conn(self, c: socket.socket) -> None:
        c.setblocking(False)
        buf = self.saved.pop(peer_key(c), None) or {}
        self.conns[c] = {"in": buf.get("in", "").encode("latin-1"), "out": buf.get("out", "").encode("latin-1")}
        self.sel.register(c, selectors.EVENT_READ, self.on_conn)
        self.serve_lines(c)

    # --- serving ----------------------------------------------------------------------
    def on_accept(self, s: socket.socket) -> None:
        while True:
            try:
                c, _ = s.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.add_conn(c)

    def on_datagram(self, s: socket.socket) -> None:
        while True:
            try:
                data, addr = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            s.sendto(data, addr)

    def on_conn(self, c: socket.socket) -> None:
        try:
            data = c.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(c)
            return
        self.conns[c]["in"] += data
        self.serve_lines(c)

    def serve_lines(self, c: socket.socket) -> None:
        st = self.conns[c]
        while b"\n" in st["in"]:
            line, st["in"] = st["in"].split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if len(words) == 2 and words[0].upper() == "INCR":
                self.counts[words[1]] = self.counts.get(words[1], 0) + 1
                st["out"] += b"%d\n" % self.counts[words[1]]
            elif len(words) == 2 and words[0].upper() == "GET":
                st["out"] += b"%d\n" % self.counts.get(words[1], 0)
            else:
                st["out"] += b"ERR\n"
        self.flush(c)

    def flush(self, c: socket.socket) -> None:
        st = self.conns[c]
        try:
            sent = c.send(st["out"]) if st["out"] else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return self.close(c)
        st["out"] = st["out"][sent:]

    def close(self, c: socket.socket) -> None:
        self.sel.unregister(c)
        self.conns.pop(c, None)
        c.close()

    # --- the handoff --------------------------------------------------------------------
    def hand_over(self) -> None:
        """Store the state and every socket in the agent's fd store, then stop."""
        for c in list(self.conns):
            self.flush(c)
        state = {"counts": self.counts,
                 "conns": {peer_key(c): {"in": st["in"].decode("latin-1"), "out": st["out"].decode("latin-1")}
                           for c, st in self.conns.items()}}
        memfd = os.memfd_create("state", os.MFD_CLOEXEC)
        os.write(memfd, json.dumps(state).encode())
        os.lseek(memfd, 0, os.SEEK_SET)
        notify("FDSTORE=1\nFDNAME=state", [memfd])
        os.close(memfd)
        for name, s in self.sockets:
            notify(f"FDSTORE=1\nFDNAME={name}", [s.fileno()])
        conns = list(self.conns)
        for i in range(0, len(conns), FDS_PER_MESSAGE):
            chunk = conns[i:i + FDS_PER_MESSAGE]
            port = chunk[0].getsockname()[1]
            notify(f"FDSTORE=1\nFDNAME=conn-{port}", [c.fileno() for c in chunk])
        # from STOPPING=1 on, touch nothing until SIGCONT: the agent stops us (SIGSTOP; we
        # may be a PID namespace's init, which cannot stop itself), a rollback continues
        # us, a successful move kills us. SIGCONT is blocked first so that none is missed.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCONT})
        try:
            notify("STOPPING=1")
            signal.sigwait({signal.SIGCONT})
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCONT})

    def run(self) -> None:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(HANDOFF_SIGNAL, lambda *_: setattr(self, "handoff", True))
        self.sel.register(rfd, selectors.EVENT_READ, lambda _: os.read(rfd, 512))
        notify("READY=1\nFDSTORE=1\nSTATUS=serving")  # FDSTORE=1 alone: "I hand over"
        while True:
            for key, _ in self.sel.select():
                key.data(key.fileobj)
                if self.handoff:
                    break
            if self.handoff:
                self.handoff = False
                self.hand_over()


def main() -> int:
    server = Counter()
    server.adopt(listen_fds())
    if not server.sockets and not server.conns:
        print("handoff_counter: no sockets (run me with socket activation)", file=sys.stderr)
        return 1
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
