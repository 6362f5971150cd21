"""Load for examples/handoff_counter.py, with an exact oracle (runs inside the client namespace).

    python -m tests.lab.counterload HOST PORT --conns N --ready-file F --stop-file F [--duration S]

TCP: each connection sends `INCR <tag>c<i>` then `INCR <tag>all`, again and again (a bounded rate),
and reads both answers. The first must be exactly one more than its previous answer (a
request lost or counted twice by the service, or state lost in a move, shows as a wrong
number); the second must grow. UDP: numbered datagrams, each must come back exactly once.
At the end one more connection reads every counter: `c<i>` must equal what connection i
sent, `all` the sum. Prints one JSON object; every loop is bounded by --duration.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time

RATE_PER_CONN = 20.0  # request pairs per second per connection
UDP_RATE = 200.0
IO_TIMEOUT_S = 10.0


class Conn(threading.Thread):
    def __init__(self, host: str, port: int, key: str, tag: str, stop: threading.Event, deadline: float) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.key, self.tag, self.stop, self.deadline = host, port, key, tag, stop, deadline
        self.sent = self.ok = self.bad = self.errors = self.resets = 0
        self.last_all = 0
        self.first_error = ""

    def run(self) -> None:
        try:
            s = socket.create_connection((self.host, self.port), timeout=IO_TIMEOUT_S)
        except OSError as e:
            self.errors += 1
            self.first_error = f"connect: {e}"
            return
        f = s.makefile("rb")
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                s.sendall(f"INCR {self.key}\nINCR {self.tag}all\n".encode())
                self.sent += 1
                mine, total = f.readline(), f.readline()
                if not mine.endswith(b"\n") or not total.endswith(b"\n"):
                    raise ConnectionError("connection closed by the service")
                if int(mine) == self.sent and int(total) > self.last_all:
                    self.ok += 1
                else:
                    self.bad += 1
                    self.first_error = self.first_error or f"{self.key}: got {mine!r} {total!r} after {self.sent}"
                self.last_all = int(total)
                time.sleep(1.0 / RATE_PER_CONN)
        except ConnectionResetError as e:
            self.resets += 1
            self.first_error = self.first_error or f"{self.key}: {e}"
        except (OSError, ValueError, ConnectionError) as e:
            self.errors += 1
            self.first_error = self.first_error or f"{self.key}: {e}"
        finally:
            s.close()


def udp_stream(host: str, port: int, stop: threading.Event, deadline: float, out: dict) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.002)
    answers: dict[int, int] = {}
    sent = 0
    next_send = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_send:
            s.sendto(b"u%d" % sent, (host, port))
            sent += 1
            next_send += 1.0 / UDP_RATE
        try:
            data, _ = s.recvfrom(100)
            n = int(data[1:])
            answers[n] = answers.get(n, 0) + 1
        except (socket.timeout, ValueError):
            pass
    end = time.monotonic() + 2.0  # stragglers of the last datagrams
    s.settimeout(0.1)
    while time.monotonic() < end and len(answers) < sent:
        try:
            data, _ = s.recvfrom(100)
            n = int(data[1:])
            answers[n] = answers.get(n, 0) + 1
        except (socket.timeout, ValueError):
            pass
    s.close()
    out.update(udp_sent=sent, udp_answered_once=sum(1 for c in answers.values() if c == 1),
               udp_duplicated=sum(1 for c in answers.values() if c > 1), udp_missing=sent - len(answers))


def read_counters(host: str, port: int, names: list[str]) -> dict[str, int]:
    with socket.create_connection((host, port), timeout=IO_TIMEOUT_S) as s:
        f = s.makefile("rb")
        out = {}
        for name in names:
            s.sendall(b"GET %s\n" % name.encode())
            out[name] = int(f.readline())
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=int, default=20)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--ready-file", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--tag", default="", help="prefix of the counters (a fresh set per run)")
    a = p.parse_args()
    stop = threading.Event()
    deadline = time.monotonic() + a.duration
    conns = [Conn(a.host, a.port, f"{a.tag}c{i}", a.tag, stop, deadline) for i in range(a.conns)]
    for c in conns:
        c.start()
    udp: dict = {}
    u = threading.Thread(target=udp_stream, args=(a.host, a.port, stop, deadline, udp), daemon=True)
    u.start()
    time.sleep(0.5)
    with open(a.ready_file, "w") as f:
        f.write("ready")
    while not os.path.exists(a.stop_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for c in conns:
        c.join(IO_TIMEOUT_S * 2)
    u.join(IO_TIMEOUT_S)
    names = [c.key for c in conns] + [f"{a.tag}all"]
    final = read_counters(a.host, a.port, names)
    result = {
        "conns": len(conns), "tcp_sent": sum(c.sent for c in conns), "tcp_ok": sum(c.ok for c in conns),
        "tcp_bad": sum(c.bad for c in conns), "tcp_errors": sum(c.errors for c in conns),
        "resets": sum(c.resets for c in conns),
        "first_error": next((c.first_error for c in conns if c.first_error), ""),
        # the state that moved: every counter is what its connection sent, `all` the sum
        "counters_exact": all(final[c.key] == c.sent for c in conns),
        "all": final[f"{a.tag}all"], **udp,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
