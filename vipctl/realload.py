"""Load against real programs behind the VIP (nginx, redis-server, dnsmasq), with exact
accounting. Run inside the client namespace; each command prints one JSON object.

    python -m vipctl.realload http-hold HOST PORT --conns 100 --paths /a.txt,/b.txt
               [--rate 2] [--duration 10] [--ready-file F] [--stop-file F]
    python -m vipctl.realload redis-loop HOST PORT --conns 8 [--rate 50] [--duration 10] ...
    python -m vipctl.realload redis-fill HOST PORT --mb 10 [--value-size 4096] [--prefix fill:]
    python -m vipctl.realload dns-udp HOST PORT --expect www.lab.test=203.0.113.20,...
               [--rate 100] [--duration 10] ...

http-hold keeps N keep-alive HTTP/1.1 connections open and sends GETs on each at --rate
per second per connection: every response must be 200 with the whole body; a closed or
reset connection is a failure (keep-alive must hold), and the longest wait for a
response is what a client felt of a freeze. redis-loop SETs then GETs its own keys
(`rl:<conn>:<seq>`) on N persistent connections and checks every reply; it reports how
many keys each connection wrote, so a test can check every one afterwards. redis-fill
writes --mb of data with pipelined SETs (for freeze-vs-image-size measurements).
dns-udp sends numbered queries (the DNS id) and counts the answers per id: each must be
answered exactly once, with the expected address.

The run ends after --duration or when --stop-file appears; clients then wait for their
last answers. Ready-file appears once every connection is established.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import time

from nodeshim.limits import raise_nofile
from vipctl.loadgen import retrans_segs


def _stopper(duration: float, stop_file: str | None):
    end = time.monotonic() + duration

    def stopped() -> bool:
        return time.monotonic() >= end or bool(stop_file and os.path.exists(stop_file))
    return stopped


def _ready(path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write("ready")


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    v = sorted(values)
    return {"p50": round(v[len(v) // 2], 1), "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 1),
            "max": round(v[-1], 1)}


# --- HTTP keep-alive holder -----------------------------------------------------------


class HttpStats:
    def __init__(self) -> None:
        self.connected = self.requests = self.ok = self.failed = 0
        self.resets = self.closed_by_server = self.connect_errors = 0
        self.worst_ms: list[float] = []
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(msg)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    body = await reader.readexactly(length)
    return status, body


async def _http_conn(host: str, port: int, idx: int, paths: list[str], sizes: dict[str, int],
                     rate: float, stopped, slots: asyncio.Semaphore, st: HttpStats, all_up: asyncio.Event,
                     expected_conns: int) -> None:
    try:
        async with slots:
            reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        st.connect_errors += 1
        st.error(f"conn {idx}: connect: {e}")
        return
    st.connected += 1
    if st.connected + st.connect_errors >= expected_conns:
        all_up.set()
    await all_up.wait()
    worst = 0.0
    seq = 0
    interval = 1.0 / rate
    next_at = time.monotonic() + (idx % 100) * interval / 100  # spread the connections
    try:
        while not stopped():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            path = paths[(idx + seq) % len(paths)]
            seq += 1
            st.requests += 1
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode())
            t0 = time.monotonic()
            try:
                status, body = await asyncio.wait_for(_read_response(reader), 30.0)
            except (ConnectionResetError, BrokenPipeError) as e:
                st.failed += 1
                st.resets += 1
                st.error(f"conn {idx}: {path}: {e!r}")
                return
            except asyncio.IncompleteReadError:
                st.failed += 1
                st.closed_by_server += 1
                st.error(f"conn {idx}: {path}: closed by the server")
                return
            except (TimeoutError, OSError, ValueError, IndexError) as e:
                st.failed += 1
                st.error(f"conn {idx}: {path}: {e!r}")
                return
            worst = max(worst, (time.monotonic() - t0) * 1000)
            want = sizes.get(path)
            if status == 200 and (want is None or len(body) == want):
                st.ok += 1
            else:
                st.failed += 1
                st.error(f"conn {idx}: {path}: status {status}, {len(body)} bytes (want {want})")
    finally:
        st.worst_ms.append(worst)
        writer.close()


async def http_hold(host: str, port: int, conns: int, paths: list[str], sizes: dict[str, int], rate: float,
                    duration: float, ready_file: str | None, stop_file: str | None) -> dict:
    st = HttpStats()
    retrans0 = retrans_segs()
    stopped = _stopper(duration, stop_file)
    all_up = asyncio.Event()
    slots = asyncio.Semaphore(64)
    tasks = [asyncio.ensure_future(_http_conn(host, port, i, paths, sizes, rate, stopped, slots, st, all_up, conns))
             for i in range(conns)]
    await all_up.wait()
    _ready(ready_file)
    t0 = time.monotonic()
    await asyncio.gather(*tasks)
    return {"conns": conns, "connected": st.connected, "connect_errors": st.connect_errors,
            "requests": st.requests, "ok": st.ok, "failed": st.failed, "resets": st.resets,
            "closed_by_server": st.closed_by_server, "seconds": round(time.monotonic() - t0, 2),
            "longest_wait_ms": round(max(st.worst_ms, default=0.0), 1),
            "conn_worst_wait_ms": _pcts(st.worst_ms), "retrans_segs": retrans_segs() - retrans0,
            "errors": st.errors}


# --- redis (RESP) ---------------------------------------------------------------------


def resp_command(*args: bytes | str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


async def _resp_reply(reader: asyncio.StreamReader):
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = await reader.readexactly(n + 2)
        return data[:-2]
    raise ValueError(f"unexpected reply {line!r}")


def redis_key(conn: int, seq: int) -> str:
    return f"rl:{conn}:{seq}"


def redis_value(conn: int, seq: int) -> bytes:
    return b"v%d:%d:" % (conn, seq) + b"x" * (seq % 64)


async def _redis_conn(host, port, idx, rate, stopped, st: dict, written: dict, all_up, expected):
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        st["connect_errors"] += 1
        st["errors"].append(f"conn {idx}: connect: {e}")
        return
    st["connected"] += 1
    if st["connected"] + st["connect_errors"] >= expected:
        all_up.set()
    await all_up.wait()
    seq = 0
    interval = 1.0 / rate
    next_at = time.monotonic()
    worst = 0.0
    try:
        while not stopped():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            key, value = redis_key(idx, seq), redis_value(idx, seq)
            t0 = time.monotonic()
            try:
                writer.write(resp_command("SET", key, value) + resp_command("GET", key))
                set_reply = await asyncio.wait_for(_resp_reply(reader), 30.0)
                written[idx] = seq + 1  # sent; the reply says whether it took
                get_reply = await asyncio.wait_for(_resp_reply(reader), 30.0)
            except (ConnectionResetError, BrokenPipeError) as e:
                st["resets"] += 1
                st["errors"].append(f"conn {idx}: {e!r}")
                return
            except (asyncio.IncompleteReadError, TimeoutError, OSError, ValueError) as e:
                st["failed"] += 1
                st["errors"].append(f"conn {idx}: {e!r}")
                return
            worst = max(worst, (time.monotonic() - t0) * 1000)
            st["set_ok"] += set_reply == "OK"
            st["get_ok"] += get_reply == value
            if set_reply != "OK" or get_reply != value:
                st["bad"] += 1
                if len(st["errors"]) < 20:
                    st["errors"].append(f"conn {idx} seq {seq}: SET -> {set_reply!r}, GET -> {get_reply!r:.60}")
            seq += 1
    finally:
        st["worst"].append(worst)
        writer.close()


async def redis_loop(host, port, conns, rate, duration, ready_file, stop_file) -> dict:
    st = {"connected": 0, "connect_errors": 0, "set_ok": 0, "get_ok": 0, "bad": 0, "failed": 0, "resets": 0,
          "errors": [], "worst": []}
    written: dict[int, int] = {}
    retrans0 = retrans_segs()
    stopped = _stopper(duration, stop_file)
    all_up = asyncio.Event()
    tasks = [asyncio.ensure_future(_redis_conn(host, port, i, rate, stopped, st, written, all_up, conns))
             for i in range(conns)]
    await all_up.wait()
    _ready(ready_file)
    await asyncio.gather(*tasks)
    worst = st.pop("worst")
    st["errors"] = st["errors"][:20]
    return {**st, "conns": conns, "written": {str(k): v for k, v in sorted(written.items())},
            "keys_written": sum(written.values()), "longest_wait_ms": round(max(worst, default=0.0), 1),
            "retrans_segs": retrans_segs() - retrans0}


def redis_fill(host: str, port: int, mb: float, value_size: int = 4096, prefix: str = "fill:",
               batch: int = 256) -> dict:
    """Pipelined SETs until `mb` megabytes of values are stored; every reply checked."""
    total = int(mb * 1024 * 1024)
    keys = (total + value_size - 1) // value_size
    s = socket.create_connection((host, port), timeout=60)
    f = s.makefile("rb")
    ok = errors = 0
    t0 = time.monotonic()
    for start in range(0, keys, batch):
        end = min(keys, start + batch)
        s.sendall(b"".join(resp_command("SET", f"{prefix}{i}", (b"%08d" % i) * (value_size // 8))
                           for i in range(start, end)))
        for _ in range(start, end):
            line = f.readline()
            if line == b"+OK\r\n":
                ok += 1
            else:
                errors += 1
    s.close()
    return {"keys": keys, "ok": ok, "errors": errors, "bytes": keys * (value_size // 8) * 8,
            "seconds": round(time.monotonic() - t0, 2)}


# --- DNS over UDP, answers counted per query id ---------------------------------------


def dns_query(qid: int, name: str) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def dns_answer_a(msg: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A addresses) of a response; compression pointers are followed."""
    qid, flags, qd, an = struct.unpack("!HHHH", msg[:8])
    pos = 12

    def skip_name(p: int) -> int:
        while True:
            n = msg[p]
            if n == 0:
                return p + 1
            if n & 0xC0 == 0xC0:
                return p + 2
            p += 1 + n
    for _ in range(qd):
        pos = skip_name(pos) + 4
    addrs = []
    for _ in range(an):
        pos = skip_name(pos)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", msg[pos:pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(msg[pos:pos + 4]))
        pos += rdlen
    return qid, flags & 0xF, addrs


def dns_udp(host: str, port: int, expect: dict[str, str], rate: float, duration: float,
            ready_file: str | None, stop_file: str | None, max_queries: int = 60000) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.setblocking(False)
    names = sorted(expect)
    asked: dict[int, str] = {}
    answers: dict[int, int] = {}
    wrong: list[str] = []
    stopped = _stopper(duration, stop_file)
    _ready(ready_file)
    interval = 1.0 / rate
    next_at = time.monotonic()
    qid = 0

    def drain() -> None:
        while True:
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                wrong.append("ICMP unreachable")
                continue
            rid, rcode, addrs = dns_answer_a(data)
            answers[rid] = answers.get(rid, 0) + 1
            want = expect.get(asked.get(rid, ""))
            if rcode != 0 or addrs != [want]:
                wrong.append(f"id {rid}: rcode {rcode}, {addrs} (want {want})")
    while not stopped() and qid < max_queries:
        now = time.monotonic()
        if now >= next_at:
            name = names[qid % len(names)]
            asked[qid] = name
            s.send(dns_query(qid, name))
            qid += 1
            next_at += interval
        drain()
        time.sleep(min(0.002, max(0.0, next_at - time.monotonic())))
    until = time.monotonic() + 2.0  # late and duplicated answers
    while time.monotonic() < until:
        drain()
        if len(answers) == qid and time.monotonic() > until - 1.0:
            break
        time.sleep(0.01)
    s.close()
    return {"sent": qid, "answered_once": sum(1 for i in range(qid) if answers.get(i) == 1),
            "duplicated": sum(1 for v in answers.values() if v > 1),
            "unanswered": sum(1 for i in range(qid) if i not in answers), "wrong": wrong[:20],
            "wrong_count": len(wrong)}


# --- command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vipctl.realload")
    p.add_argument("cmd", choices=["http-hold", "redis-loop", "redis-fill", "dns-udp"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--rate", type=float, default=10.0, help="per connection, per second")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--paths", default="/", help="comma-separated; PATH=SIZE checks the body length")
    p.add_argument("--mb", type=float, default=10.0)
    p.add_argument("--value-size", type=int, default=4096)
    p.add_argument("--prefix", default="fill:")
    p.add_argument("--expect", default="", help="NAME=ADDR,...")
    p.add_argument("--ready-file")
    p.add_argument("--stop-file")
    a = p.parse_args(argv)
    raise_nofile()
    if a.cmd == "http-hold":
        paths, sizes = [], {}
        for item in a.paths.split(","):
            path, _, size = item.partition("=")
            paths.append(path)
            if size:
                sizes[path] = int(size)
        out = asyncio.run(http_hold(a.host, a.port, a.conns, paths, sizes, a.rate, a.duration,
                                    a.ready_file, a.stop_file))
    elif a.cmd == "redis-loop":
        out = asyncio.run(redis_loop(a.host, a.port, a.conns, a.rate, a.duration, a.ready_file, a.stop_file))
    elif a.cmd == "redis-fill":
        out = redis_fill(a.host, a.port, a.mb, a.value_size, a.prefix)
    else:
        expect = dict(item.split("=", 1) for item in a.expect.split(",") if item)
        out = dns_udp(a.host, a.port, expect, a.rate, a.duration, a.ready_file, a.stop_file)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
