"""A plain TCP + UDP echo server that knows nothing of vipcluster (stdlib only).

It is what the `process` strategy moves: any program. Two ways to get its sockets:
- socket activation (`--sockets activation`, the default): fds 3.. from LISTEN_FDS,
  named by LISTEN_FDNAMES (`tcp-7`, `udp-7`);
- its own (`--sockets self`): `procecho.py --bind VIP --port 7` binds VIP:7 for TCP and UDP.

    vipctl service add pecho --node n1 --port tcp:7 --port udp:7 --migrate process \\
        --exec "python3 /path/to/examples/procecho.py"
    vipctl service add pecho --node n1 --port tcp:7 --port udp:7 --sockets self \\
        --exec "python3 /path/to/examples/procecho.py --bind 192.0.2.100 --port 7"

Single-threaded (selectors): echoes every TCP byte back on its connection and every
datagram back to its sender; prints a line per new connection (to show that its output
reaches the node's log before and after a move).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys


def activated() -> list[socket.socket]:
    n = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=3 + i) for i in range(n)]


def bound(address: str, port: int) -> list[socket.socket]:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, port))
    tcp.listen(1024)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp.bind((address, port))
    return [tcp, udp]


def serve(socks: list[socket.socket]) -> None:
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "listen" if s.type == socket.SOCK_STREAM else "udp")
    pending: dict[socket.socket, bytearray] = {}
    accepted = 0
    while True:
        for key, mask in sel.select():
            s, kind = key.fileobj, key.data
            if kind == "listen":
                try:
                    conn, peer = s.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "conn")
                accepted += 1
                if accepted <= 3 or accepted % 100 == 0:
                    print(f"procecho {os.getpid()}: connection {accepted} from {peer[0]}", flush=True)
            elif kind == "udp":
                for _ in range(64):
                    try:
                        data, peer = s.recvfrom(65535)
                    except BlockingIOError:
                        break
                    s.sendto(data, peer)
            else:
                if mask & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        data = b""
                    if data == b"":
                        sel.unregister(s)
                        pending.pop(s, None)
                        s.close()
                        continue
                    if data:
                        pending.setdefault(s, bytearray()).extend(data)
                buf = pending.get(s)
                if buf:
                    try:
                        sent = s.send(buf)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        sel.unregister(s)
                        pending.pop(s, None)
                        s.close()
                        continue
                    del buf[:sent]
                sel.modify(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending.get(s) else 0), "conn")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bind", help="bind this address itself (else: socket activation)")
    p.add_argument("--port", type=int, default=7)
    a = p.parse_args()
    socks = bound(a.bind, a.port) if a.bind else activated()
    if not socks:
        sys.exit("procecho: no sockets (give --bind ADDRESS, or start it with LISTEN_FDS)")
    print(f"procecho {os.getpid()}: serving {len(socks)} sockets", flush=True)
    serve(socks)


if __name__ == "__main__":
    main()
