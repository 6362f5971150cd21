"""Built-in services, run as real processes with socket activation.

    python -m nodeshim.builtins echo   every TCP byte and UDP datagram back to its sender
    python -m nodeshim.builtins kv     TCP lines: `SET key value` -> OK, `GET key` -> value|NONE

Sockets come from LISTEN_FDS/LISTEN_FDNAMES (fds 3..). A fd whose socket is listening is
accepted from; a connected stream socket (a connection handed over by a migration) is
served directly; a datagram socket is echoed.

Live migration (the `handoff` strategy): the builtins are the reference implementation of
the systemd fd-store handoff any program can speak (see examples/handoff_counter.py for
a third party's, clustercore.sdnotify for the protocol):
- once serving they tell NOTIFY_SOCKET `READY=1` and `FDSTORE=1` with no descriptor: "I
  hand over through the fd store" (the agent then moves them by handoff);
- on SIGUSR1 (the handoff signal) they stop reading, flush what the kernel will take,
  write what user space still holds (the kv table; per connection the bytes owed to the
  client and a partial request line) into a memfd, store it (`FDNAME=state`), then every
  listener and UDP socket under its activation name and every connection as `conn-PORT`
  (FDSTORE=1, SCM_RIGHTS), say STOPPING=1 and then touch nothing until SIGCONT (the agent
  stops them meanwhile: SIGSTOP). A rollback sends SIGCONT: they carry on. A commit kills
  them;
- the new instance gets it all back as LISTEN_FDS: `state` is loaded first, and each
  connection (matched by its peer address) gets its pending bytes back.
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
import time
from collections import defaultdict

from clustercore import batchchannel as bc
from clustercore.kinds import BATCH_BUILTINS
from nodeshim import batchchannel
from nodeshim.limits import raise_nofile


OUTBUF_LIMIT = 256 * 1024
STATE_FDNAME = "state"
FDS_PER_MESSAGE = 250  # below the kernel's SCM_MAX_FD (253)


def listen_fds() -> list[tuple[str, int]]:
    """(name, fd) of the descriptors passed to us (sd_listen_fds(3))."""
    if os.environ.get("LISTEN_PID") not in (None, str(os.getpid())):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if n else []
    return [(names[i] if i < len(names) else f"fd{3 + i}", 3 + i) for i in range(n)]


def notify(text: str, fds: list[int] = ()) -> bool:
    """One sd_notify(3) message to NOTIFY_SOCKET, descriptors attached (False: no socket,
    or nobody listening on it). As with sd_notify(3), a failure is the caller's to weigh,
    never fatal: an agent that died a moment ago (its restart adopts this process) must
    not take the service with it when the service says READY=1 into the void."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            s.sendmsg([text.encode()], anc, 0, path)
    except OSError as e:
        print(f"sd_notify {text.splitlines()[0]!r}: {e.strerror}", file=sys.stderr, flush=True)
        return False
    return True


class Server:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sel = selectors.DefaultSelector()
        self.kv: dict[str, str] = {}
        self.inbuf: dict[socket.socket, bytearray] = {}
        self.eof: set[socket.socket] = set()
        self.outbuf: dict[socket.socket, bytearray] = {}
        self.handoff = False
        self.pending: dict[str, dict] = {}
        self.named: list[tuple[str, socket.socket]] = []  # listeners and UDP sockets
        self.channel: socket.socket | None = None  # the incremental handoff (vip-batch)
        self.by_peer: dict[str, socket.socket] = {}  # a batch's lookup costs its size only
        self.peer_of: dict[socket.socket, str] = {}  # (getpeername fails once reset)
        self.local_of: dict[socket.socket, str] = {}
        self.active: dict[socket.socket, float] = {}  # last event, monotonic

    def load_state(self, data: bytes) -> None:
        """What the old instance stored when it handed over: the kv table, and per
        connection the bytes it owed and a partial request."""
        state = json.loads(data or b"{}")
        self.kv = dict(state.get("kv", {}))
        self.pending = dict(state.get("conns", {}))

    def load_state_fd(self, fd: int) -> None:
        """load_state from the `state` memfd (closed after)."""
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(fd, "rb") as f:
            self.load_state(f.read())

    def adopt(self, fds: list[tuple[str, int]]) -> None:
        """Everything LISTEN_FDS passed: the state first, then the sockets."""
        for name, fd in fds:
            if name == STATE_FDNAME:
                self.load_state_fd(fd)
        for name, fd in fds:
            if name == bc.CHANNEL_FDNAME:
                self.channel = socket.socket(fileno=fd)
                self.sel.register(self.channel, selectors.EVENT_READ, self.on_channel)
            elif name != STATE_FDNAME:
                s = socket.socket(fileno=fd)
                s.setblocking(False)
                self.add(name, s)

    def add(self, name: str, s: socket.socket) -> None:
        if s.type == socket.SOCK_DGRAM:
            self.named.append((name, s))
            self.sel.register(s, selectors.EVENT_READ, self.on_udp)
        elif s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.named.append((name, s))
            self.sel.register(s, selectors.EVENT_READ, self.on_accept)
        else:
            self._add_conn(s)

    def _add_conn(self, c: socket.socket) -> None:
        c.setblocking(False)
        self.inbuf[c] = bytearray()
        self.outbuf[c] = bytearray()
        self.sel.register(c, selectors.EVENT_READ, self.on_conn)
        peer = _peer_key(c)
        self.by_peer[peer] = c
        self.peer_of[c] = peer
        self.local_of[c] = _local_key(c)  # for the batched opening's list (hand_back)
        self.active[c] = time.monotonic()
        saved = self.pending.pop(peer, None) if self.pending else None
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
        self.active[c] = time.monotonic()  # how idle it is: the batches move idle ones first
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
        self._forget(c)
        c.close()

    def _forget(self, c: socket.socket) -> None:
        """No longer ours to serve (closed, or handed back)."""
        peer = self.peer_of.pop(c, None)
        self.local_of.pop(c, None)
        self.active.pop(c, None)
        if peer is not None and self.by_peer.get(peer) is c:
            del self.by_peer[peer]
        self.eof.discard(c)
        self.sel.unregister(c)
        self.inbuf.pop(c, None)
        self.outbuf.pop(c, None)

    # -- the incremental handoff (clustercore.batchchannel): a batch at a time, serving on

    def on_channel(self, ch: socket.socket, mask: int) -> None:
        try:
            msg, fds = batchchannel.receive(ch, None)
        except batchchannel.ChannelClosed:
            self.sel.unregister(ch)
            self.channel = None
            if not self.named and not self.outbuf:
                # started with its channel only (a standby, a batched move's destination)
                # and its agent is gone before it got anything: nobody will give it work
                print("handoff channel closed before any socket came: exiting", flush=True)
                sys.exit(0)
            return
        except Exception as e:  # noqa: BLE001 - a bad request must not stop the service
            print(f"handoff channel: {e}", flush=True)
            return
        if isinstance(msg, bc.HandBack):
            try:
                self.hand_back(ch, msg)
            except Exception as e:  # noqa: BLE001 - a failed hand back must not end every
                # connection we serve (the agent's step fails and gives back what it had)
                print(f"handoff channel: hand back failed: {e}", flush=True)
                try:
                    batchchannel.send(ch, bc.Refusal(f"hand back failed: {e}"))
                except Exception:  # noqa: BLE001
                    pass
        elif isinstance(msg, bc.Adopt):
            for peer, entry in msg.state.items():
                self.pending[peer] = entry
            for name, fd in zip(msg.names, fds):
                if name == STATE_FDNAME:  # a whole handoff's standby: what LISTEN_FDS would
                    self.load_state_fd(fd)  # have passed, the state first
                    continue
                s = socket.socket(fileno=fd)
                s.setblocking(False)
                self.add(name, s)
            batchchannel.send(ch, bc.Adopted(len(fds)))
        else:
            for fd in fds:
                os.close(fd)
            batchchannel.send(ch, bc.Refusal(f"unexpected {type(msg).__name__}"))

    def hand_back(self, ch: socket.socket, msg: bc.HandBack) -> None:
        """Stop serving the asked sockets and hand them back, with what we owe on them."""
        named: list[tuple[str, socket.socket]] = []
        state: dict = {}
        if msg.listeners or msg.udp:
            named = [(n, s) for n, s in self.named if (msg.udp if n.startswith("udp-") else msg.listeners)]
            self.named = [x for x in self.named if x not in named]
            for _, s in named:
                self.sel.unregister(s)
        else:
            for peer in dict.fromkeys(msg.peers):
                c = self.by_peer.get(peer)
                if c is None:
                    continue  # closed meanwhile: the agent sees it missing
                try:
                    self._flush(c)
                except OSError:
                    pass
                if c not in self.outbuf:
                    continue  # closed while flushing
                if self.outbuf[c] or self.inbuf[c]:
                    state[peer] = {"out": base64.b64encode(bytes(self.outbuf[c])).decode(),
                                   "in": base64.b64encode(bytes(self.inbuf[c])).decode()}
                try:
                    name = f"conn-{c.getsockname()[1]}"
                except OSError:
                    continue
                self._forget(c)
                named.append((name, c))
        self._send_handed(ch, named, state, list(self.peer_of.items()) if msg.listeners else None)

    def _send_handed(self, ch: socket.socket, named: list[tuple[str, socket.socket]], state: dict,
                     serving: list | None) -> None:
        """HANDED: the descriptors FDS_PER_MESSAGE a message (`state` with the first). For
        HANDBACK listeners (`serving`: our connections then) also the ones we keep serving
        (peer, local, idle ms; not those a client is done with: they close here),
        HELD_PER_MESSAGE a message. We accept no more, so that list is final; between its
        messages we serve what is ready (UDP, the connections): at 10,000 connections it is
        ~12 ms of string work that a UDP client would otherwise wait out. A connection that
        closes meanwhile is one the agent finds gone when it asks for it."""
        now = time.monotonic()
        step = bc.HELD_PER_MESSAGE
        fd_parts = [named[i:i + bc.FDS_PER_MESSAGE] for i in range(0, len(named), bc.FDS_PER_MESSAGE)]
        count = max(1, len(fd_parts), -(-len(serving) // step) if serving is not None else 0)
        for i in range(count):
            part = fd_parts[i] if i < len(fd_parts) else []
            held = None if serving is None else tuple(
                (p, local, round(max(0.0, now - self.active.get(c, now)) * 1000.0, 1))
                for c, p in serving[i * step:(i + 1) * step]
                if c not in self.eof and p != "?" and (local := self.local_of.get(c, "?")) != "?")
            batchchannel.send(ch, bc.Handed(tuple(n for n, _ in part), state if i == 0 else {},
                                            more=i + 1 < count, held=held), [s.fileno() for _, s in part])
            if serving is not None and i + 1 < count:
                self._dispatch(self.sel.select(0), skip=ch)  # not the channel we answer on
        for _, s in named:
            s.close()  # the agent holds them now

    def hand_over(self) -> None:
        """Store the state and every socket in the agent's fd store, then stop."""
        t0 = time.monotonic()
        conns = {}
        for c in list(self.outbuf):
            try:
                self._flush(c)  # what the kernel takes now need not be carried
            except OSError:
                pass
            if c in self.outbuf and (self.outbuf[c] or self.inbuf[c]):
                conns[_peer_key(c)] = {"out": base64.b64encode(bytes(self.outbuf[c])).decode(),
                                       "in": base64.b64encode(bytes(self.inbuf[c])).decode()}
        memfd = os.memfd_create(STATE_FDNAME, os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(memfd), "wb") as f:
                f.write(json.dumps({"kv": self.kv, "conns": conns}).encode())
            os.lseek(memfd, 0, os.SEEK_SET)  # one open file: its reader starts where we stop
            stored = notify(f"FDSTORE=1\nFDNAME={STATE_FDNAME}", [memfd])
        finally:
            os.close(memfd)
        if not stored:
            print("no NOTIFY_SOCKET: nothing to hand over to", flush=True)
            return
        for name, s in self.named:
            notify(f"FDSTORE=1\nFDNAME={name}", [s.fileno()])
        by_port: dict[int, list[int]] = defaultdict(list)
        for c in self.outbuf:
            local = self.local_of.get(c, "?")  # "ip:port", read once when it came
            port = local.rpartition(":")[2]
            try:
                by_port[int(port) if port.isdigit() else c.getsockname()[1]].append(c.fileno())
            except OSError:
                pass
        for port, fds in by_port.items():
            for i in range(0, len(fds), FDS_PER_MESSAGE):
                notify(f"FDSTORE=1\nFDNAME=conn-{port}", fds[i:i + FDS_PER_MESSAGE])
        print(f"handed over {len(self.outbuf)} connections in {(time.monotonic() - t0) * 1000:.1f} ms", flush=True)
        wait_for_continue(lambda: notify("STOPPING=1"))

    def poll(self, timeout: float) -> None:
        try:
            events = self.sel.select(timeout=timeout)
        except InterruptedError:
            events = []
        self._dispatch(events)

    def _dispatch(self, events, skip: socket.socket | None = None) -> None:
        registered = self.sel.get_map()
        for key, mask in events:
            now = registered.get(key.fd)
            # not if an earlier event's handler closed it or handed it back (a hand back
            # serves what is ready), nor a new socket that got its descriptor's number
            if now is not None and now.fileobj is key.fileobj and now.fileobj is not skip:
                now.data(now.fileobj, mask)

    def run(self) -> None:
        while True:
            self.poll(1.0)
            if self.handoff:
                self.handoff = False
                self.hand_over()


def wait_for_continue(say_stopping) -> None:
    """After STOPPING=1: touch nothing until SIGCONT. The agent stops us (SIGSTOP from
    outside: a PID-namespace init cannot stop itself) and a rollback continues us; a
    commit kills us. SIGCONT is blocked first, so one sent early is not missed."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCONT})
    try:
        say_stopping()
        signal.sigwait({signal.SIGCONT})
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCONT})


def _key(address) -> str:
    """"ip:port" of a socket's address getter (getsockname / getpeername), "?" if closed."""
    try:
        host, port = address()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _local_key(c: socket.socket) -> str:
    return _key(c.getsockname)


def _peer_key(c: socket.socket) -> str:
    return _key(c.getpeername)


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
    fds = listen_fds()
    if not fds:
        print("no sockets passed (LISTEN_FDS)", file=sys.stderr)
        return 2

    def on_usr1(signum, frame):
        server.handoff = True

    signal.signal(signal.SIGUSR1, on_usr1)
    # wake select() at once when a signal arrives
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    server.sel.register(wake_r, selectors.EVENT_READ, lambda s, m: _drain_wakeup(s))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.adopt(fds)
    names = sorted({n for n, _ in fds})
    print(f"{argv[0]} serving {', '.join(names)} ({len(server.outbuf)} connections handed over)", flush=True)
    # FDSTORE=1 alone: I hand over. X_VIP_BATCH=1 (echo only, with the channel): also a
    # batch at a time while serving; kv's connections share its table, so it cannot
    batch = f"\n{bc.ANNOUNCE}" if server.channel is not None and argv[0] in BATCH_BUILTINS else ""
    notify(f"READY=1\nFDSTORE=1{batch}\nSTATUS=serving {', '.join(names)}")
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
