"""Built-in services, run as real processes with socket activation.

    python -m nodeshim.builtins echo   every TCP byte and UDP datagram back to its sender
    python -m nodeshim.builtins kv     TCP lines: `SET key value` -> OK, `GET key` -> value|NONE

Sockets come from LISTEN_FDS/LISTEN_FDNAMES (fds 3..). A fd whose socket is listening is
accepted from; a connected stream socket (a connection handed over by a migration) is
served directly; a datagram socket is echoed.

State hook (for live migration): on SIGUSR1 a builtin stops reading, writes what it still
holds in user space to VIPCLUSTER_STATE_OUT (the kv table; per connection, bytes it owes
the client and a partial request line) and stops itself (SIGSTOP), so its sockets can be
dumped with nothing lost in user space. A new instance loads that file (named over the
gate) and gives each restored connection (matched by its peer address) its pending bytes
back. The gate (VIPCLUSTER_GATE_FD, a SOCK_SEQPACKET socket) is how a new instance
started early, at prepare, learns the rest: it says `ready` once started, then receives
`state PATH` (the old instance's saved state), the migrated connections in `fds NAME,...`
batches with SCM_RIGHTS, and `go` when the migration releases the held packets; only then
it serves.
"""

from __future__ import annotations

import array
import base64
import json
import os
import selectors
import signal
import socket
import sys

from nodeshim.limits import raise_nofile


OUTBUF_LIMIT = 256 * 1024


def listen_fds() -> list[tuple[str, socket.socket]]:
    if os.environ.get("LISTEN_PID") not in (None, str(os.getpid())):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if n else []
    out = []
    for i in range(n):
        fd = 3 + i
        s = socket.socket(fileno=fd)
        s.setblocking(False)
        out.append((names[i] if i < len(names) else f"fd{fd}", s))
    return out


class Server:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sel = selectors.DefaultSelector()
        self.kv: dict[str, str] = {}
        self.inbuf: dict[socket.socket, bytearray] = {}
        self.eof: set[socket.socket] = set()
        self.outbuf: dict[socket.socket, bytearray] = {}
        self.quiesce = False
        self.pending: dict[str, dict] = {}

    def load_state(self, path: str) -> None:
        """What the old instance saved when it quiesced: the kv table, and per connection
        the bytes it owed and a partial request."""
        with open(path) as f:
            state = json.load(f)
        self.kv = dict(state.get("kv", {}))
        self.pending = dict(state.get("conns", {}))

    def add(self, name: str, s: socket.socket) -> None:
        if s.type == socket.SOCK_DGRAM:
            self.sel.register(s, selectors.EVENT_READ, self.on_udp)
        elif s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.sel.register(s, selectors.EVENT_READ, self.on_accept)
        else:
            self._add_conn(s)

    def _add_conn(self, c: socket.socket) -> None:
        c.setblocking(False)
        self.inbuf[c] = bytearray()
        self.outbuf[c] = bytearray()
        self.sel.register(c, selectors.EVENT_READ, self.on_conn)
        saved = self.pending.pop(_peer_key(c), None) if self.pending else None
        if saved:
            self.inbuf[c] += base64.b64decode(saved.get("in", ""))
            self.outbuf[c] += base64.b64decode(saved.get("out", ""))
            self._flush(c)

    def on_accept(self, s: socket.socket, mask: int) -> None:
        for _ in range(64):
            try:
                c, _ = s.accept()
            except (BlockingIOError, InterruptedError):
                return
            self._add_conn(c)

    def on_udp(self, s: socket.socket, mask: int) -> None:
        for _ in range(256):
            try:
                data, addr = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            try:
                s.sendto(data, addr)
            except OSError:
                pass

    def on_conn(self, c: socket.socket, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = c.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return self._close(c)
            if data == b"":
                # the client is done sending: close once we owe it nothing
                self.eof.add(c)
            elif data:
                self.outbuf[c] += data if self.mode == "echo" else self._kv_lines(c, data)
        self._flush(c)
        if c in self.eof and c in self.outbuf and not self.outbuf[c]:
            self._close(c)

    def _kv_lines(self, c: socket.socket, data: bytes) -> bytes:
        buf = self.inbuf[c]
        buf += data
        out = bytearray()
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(buf[:nl]).decode(errors="replace").rstrip("\r")
            del buf[: nl + 1]
            parts = line.split(" ", 2)
            cmd = parts[0].upper() if parts else ""
            if cmd == "SET" and len(parts) == 3:
                self.kv[parts[1]] = parts[2]
                out += b"OK\n"
            elif cmd == "GET" and len(parts) == 2:
                out += (self.kv.get(parts[1], "NONE") + "\n").encode()
            else:
                out += b"ERR usage: SET key value | GET key\n"
        return bytes(out)

    def _flush(self, c: socket.socket) -> None:
        buf = self.outbuf.get(c)
        if buf is None:
            return
        while buf:
            try:
                n = c.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return self._close(c)
            del buf[:n]
        # back-pressure: stop reading while we owe the client too much, so a client that
        # does not read fills our socket queues instead of our memory
        reading = len(buf) < OUTBUF_LIMIT and c not in self.eof
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if buf else 0)
        self.sel.modify(c, events or selectors.EVENT_WRITE, self.on_conn)

    def _close(self, c: socket.socket) -> None:
        self.eof.discard(c)
        self.sel.unregister(c)
        self.inbuf.pop(c, None)
        self.outbuf.pop(c, None)
        c.close()

    def do_quiesce(self) -> None:
        """Save what user space holds, then stop: the sockets hold everything else."""
        conns = {}
        for c in list(self.outbuf):
            try:
                self._flush(c)  # what the kernel takes now need not be carried
            except OSError:
                pass
            if c in self.outbuf and (self.outbuf[c] or self.inbuf[c]):
                conns[_peer_key(c)] = {"out": base64.b64encode(bytes(self.outbuf[c])).decode(),
                                       "in": base64.b64encode(bytes(self.inbuf[c])).decode()}
        out = os.environ.get("VIPCLUSTER_STATE_OUT")
        if out:
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"kv": self.kv, "conns": conns}, f)
            os.replace(tmp, out)
        print("quiesced", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        self.quiesce = False

    def run(self) -> None:
        while True:
            try:
                events = self.sel.select(timeout=1.0)
            except InterruptedError:
                events = []
            for key, mask in events:
                key.data(key.fileobj, mask)
            if self.quiesce:
                self.do_quiesce()


def wait_at_gate(fd: int, server: "Server") -> list[tuple[str, socket.socket]] | None:
    """Receive the saved state and the migrated connections (SCM_RIGHTS batches) until
    `go`; None if the agent closed the gate without letting us serve."""
    gate = socket.socket(fileno=fd)
    gate.send(b"ready")  # started: the agent may freeze the old instance now
    conns: list[tuple[str, socket.socket]] = []
    fd_size = array.array("i").itemsize
    while True:
        data, anc, _flags, _addr = gate.recvmsg(1 << 20, socket.CMSG_SPACE(256 * fd_size))
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fd_size])
        if data.startswith(b"state "):
            server.load_state(data[6:].decode())
        elif data.startswith(b"fds "):
            names = data[4:].decode().split(",")
            for name, f in zip(names, fds):
                s = socket.socket(fileno=f)
                s.setblocking(False)
                conns.append((name, s))
        elif data == b"go":
            gate.close()
            return conns
        else:  # EOF: the agent died or aborted; close what we got without a word
            for f in fds:
                os.close(f)
            for _, s in conns:
                s.close()
            return None


def _peer_key(c: socket.socket) -> str:
    try:
        host, port = c.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _drain_wakeup(s: socket.socket) -> None:
    try:
        while s.recv(512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def main(argv: list[str]) -> int:
    raise_nofile()
    if len(argv) != 1 or argv[0] not in ("echo", "kv"):
        print("usage: python -m nodeshim.builtins echo|kv", file=sys.stderr)
        return 2
    server = Server(argv[0])
    socks = listen_fds()
    if not socks:
        print("no sockets passed (LISTEN_FDS)", file=sys.stderr)
        return 2
    def on_usr1(signum, frame):
        server.quiesce = True

    signal.signal(signal.SIGUSR1, on_usr1)
    # wake select() at once when a signal arrives
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    server.sel.register(wake_r, selectors.EVENT_READ, lambda s, m: _drain_wakeup(s))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    gate = os.environ.get("VIPCLUSTER_GATE_FD")
    if gate:
        conns = wait_at_gate(int(gate), server)
        if conns is None:
            # the agent went away before the release: the migration did not happen here
            return 0
        socks = socks + conns
    for name, s in socks:
        server.add(name, s)
    print(f"{argv[0]} serving {', '.join(n for n, _ in socks)}", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
