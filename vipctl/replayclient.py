"""The client side of the lab replays; runs inside the lab's client namespace.

    python -m vipctl.replayclient < plan.json

It reads one JSON plan on stdin (vipctl.replaylab writes it) and prints JSON lines: a
`{"event": "migrate", "k": K}` line when the replay reaches migration K (the parent runs
it while the replay goes on), and a last `{"event": "done", ...}` line with the results.

packets mode: each packet is sent as is with a raw socket (IPv4: IP_HDRINCL; IPv6: IPPROTO_RAW), paced by
the capture's own gaps (capped by the plan), and the send time (CLOCK_MONOTONIC, shared
by every namespace) of each is reported so the parent knows which packets were in flight
while a migration ran.

sessions mode: one real TCP socket per captured session and one UDP socket per captured
exchange; turns are sent in capture order and a session's next turn waits until the
answer bytes recorded before it have come back (a deterministic service answers the same
bytes; waiting keeps the dialogue causal). Every socket is read all along (a bulk transfer
would otherwise deadlock on the echo). Answers are compared here, byte for byte, with the
recorded ones; only verdicts travel back.
"""

from __future__ import annotations

import base64
import json
import selectors
import socket
import sys
import time
from collections import Counter

CONNECT_TIMEOUT = 3.0
PROBE_TIMEOUT = 1.0


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pace(t0: float, at: float) -> None:
    delay = t0 + at - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_packets(plan: dict) -> dict:
    raws = {}  # per IP version: IPv4 with IP_HDRINCL; IPv6's IPPROTO_RAW implies it
    for version in sorted({bytes.fromhex(h[:2])[0] >> 4 for _, h, _ in plan["packets"]} & {4, 6}):
        raws[version] = socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6,
                                      socket.SOCK_RAW, socket.IPPROTO_RAW)
        if version == 4:
            raws[version].setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    migrations = sorted(plan.get("migrations", []), key=lambda m: m[1])  # [k, frame index]
    times, errors = [], []
    t0 = time.monotonic()
    for pid, hexdata, at in plan["packets"]:
        while migrations and migrations[0][1] <= pid:
            emit({"event": "migrate", "k": migrations.pop(0)[0], "t": time.monotonic()})
        pace(t0, at)
        data = bytes.fromhex(hexdata)
        if data[0] >> 4 == 6:
            raw, dst = raws[6], socket.inet_ntop(socket.AF_INET6, data[24:40])
        else:
            raw, dst = raws[4], socket.inet_ntoa(data[16:20])
        try:
            raw.sendto(data, (dst, 0))
            times.append([pid, time.monotonic()])
        except OSError as e:
            errors.append(f"frame {pid}: {e.strerror}")
    for k, _ in migrations:  # migration points past the last packet
        emit({"event": "migrate", "k": k, "t": time.monotonic()})
    for raw in raws.values():
        raw.close()
    return {"sent": len(times), "times": times, "errors": errors[:10]}


class _Tcp:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.expect = base64.b64decode(spec["expect"])
        self.cum = spec["cum"]  # answer bytes recorded up to the end of each turn
        self.sock: socket.socket | None = None
        self.recv = bytearray()
        self.eof = self.reset = False
        self.error: str | None = None
        self.turns_sent = 0


class _Udp:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.expect = [base64.b64decode(a) for a in spec["answers"]]
        self.sock: socket.socket | None = None
        self.got: list[bytes] = []
        self.error: str | None = None


class Sessions:
    def __init__(self, plan: dict) -> None:
        self.vip = plan["vip"]
        self.max_wait = float(plan.get("max_wait", 5.0))
        self.sel = selectors.DefaultSelector()
        self.tcp = {s["id"]: _Tcp(s) for s in plan["tcp"]}
        self.udp = {x["id"]: _Udp(x) for x in plan["udp"]}

    # -- reading everything, all along
    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            obj = key.data
            try:
                if isinstance(obj, _Tcp):
                    data = obj.sock.recv(1 << 16)
                    if data:
                        obj.recv += data
                    else:
                        obj.eof = True
                        self.sel.unregister(obj.sock)
                else:
                    obj.got.append(obj.sock.recv(1 << 16))
            except (BlockingIOError, InterruptedError):
                pass
            except ConnectionResetError:
                obj.reset = True
                obj.error = obj.error or "connection reset by the VIP"
                self.sel.unregister(obj.sock)
            except ConnectionRefusedError:  # an ICMP unreachable for a UDP socket
                obj.error = obj.error or "ICMP port unreachable from the VIP"
            except OSError as e:
                obj.error = obj.error or f"{e.strerror}"
                self.sel.unregister(obj.sock)

    def wait(self, done, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.sel.get_map():
                self.pump(min(0.05, left))
            else:
                time.sleep(min(0.05, left))
        return True

    # -- actions
    def open(self, t: _Tcp) -> None:
        probe = t.spec.get("probe", False)
        try:
            s = socket.create_connection((self.vip, t.spec["port"]), timeout=PROBE_TIMEOUT if probe else CONNECT_TIMEOUT)
        except socket.timeout:
            if not probe:
                t.error = "connect timed out"
            return
        except ConnectionRefusedError:
            t.error = "connect refused (an RST from the VIP)"
            return
        except OSError as e:
            t.error = f"connect: {e.strerror}"
            return
        if probe:
            t.error = "connected, but the capture shows no answer to this SYN"
        s.setblocking(False)
        t.sock = s
        self.sel.register(s, selectors.EVENT_READ, t)

    def send(self, t: _Tcp, data: bytes) -> None:
        if t.sock is None or t.reset:
            return
        need = t.cum[t.turns_sent - 1] if t.turns_sent else 0
        self.wait(lambda: len(t.recv) >= need or t.eof or t.reset, self.max_wait)
        view = memoryview(data)
        deadline = time.monotonic() + self.max_wait * 4
        while view and time.monotonic() < deadline and not t.reset:
            try:
                n = t.sock.send(view)
                view = view[n:]
            except (BlockingIOError, InterruptedError):
                self.pump(0.01)
            except OSError as e:
                t.error = t.error or f"send: {e.strerror}"
                return
        if view:
            t.error = t.error or f"send: {len(view)} bytes could not be sent"
        t.turns_sent += 1

    def close(self, t: _Tcp) -> None:
        if t.sock is None:
            return
        try:
            if t.spec.get("reset"):
                self.wait(lambda: len(t.recv) >= len(t.expect) or t.eof or t.reset, self.max_wait)
                t.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                if not t.eof and not t.reset:
                    self.sel.unregister(t.sock)
                t.sock.close()
                t.eof = True
            else:
                t.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            t.error = t.error or f"close: {e.strerror}"

    def datagram(self, x: _Udp, data: bytes) -> None:
        if x.sock is None:
            x.sock = socket.socket(socket.AF_INET6 if ":" in self.vip else socket.AF_INET, socket.SOCK_DGRAM)
            x.sock.connect((self.vip, x.spec["port"]))
            x.sock.setblocking(False)
            self.sel.register(x.sock, selectors.EVENT_READ, x)
        try:
            x.sock.send(data)
        except OSError as e:
            x.error = x.error or f"send: {e.strerror}"

    def finish(self) -> dict:
        def all_in():
            return all(len(t.recv) >= len(t.expect) or t.eof or t.reset or t.sock is None
                       for t in self.tcp.values()) and all(len(x.got) >= len(x.expect) for x in self.udp.values())
        self.wait(all_in, self.max_wait)
        self.wait(lambda: False, 0.3)  # late extras: duplicated answers
        tcp = []
        for sid, t in self.tcp.items():
            got = bytes(t.recv)
            diff = next((i for i, (a, b) in enumerate(zip(got, t.expect)) if a != b), None)
            if diff is None and len(got) != len(t.expect):
                diff = min(len(got), len(t.expect))
            tcp.append({"id": sid, "got": len(got), "want": len(t.expect), "first_diff": diff,
                        "near": got[diff:diff + 24].decode("latin-1") if diff is not None else "",
                        "wanted": t.expect[diff:diff + 24].decode("latin-1") if diff is not None else "",
                        "match": got == t.expect and t.error is None, "error": t.error})
            if t.sock is not None:
                t.sock.close()
        udp = []
        for xid, x in self.udp.items():
            want, got = Counter(x.expect), Counter(x.got)
            missing, extra = sum((want - got).values()), sum((got - want).values())
            udp.append({"id": xid, "got": len(x.got), "want": len(x.expect), "missing": missing,
                        "extra": extra, "match": not missing and not extra and x.error is None,
                        "error": x.error})
            if x.sock is not None:
                x.sock.close()
        return {"tcp": tcp, "udp": udp}


def run_sessions(plan: dict) -> dict:
    s = Sessions(plan)
    t0 = time.monotonic()
    for action in plan["actions"]:
        kind, ident, at = action[0], action[1], action[-1]
        if kind != "migrate":
            pace(t0, at)
        s.pump(0)
        if kind == "migrate":
            emit({"event": "migrate", "k": ident, "t": time.monotonic()})
        elif kind == "open":
            s.open(s.tcp[ident])
        elif kind == "send":
            s.send(s.tcp[ident], base64.b64decode(action[2]))
        elif kind == "close":
            s.close(s.tcp[ident])
        elif kind == "udp":
            s.datagram(s.udp[ident], base64.b64decode(action[2]))
    return s.finish()


def main() -> None:
    plan = json.load(sys.stdin)
    result = run_packets(plan) if plan["mode"] == "packets" else run_sessions(plan)
    emit({"event": "done", **result})


if __name__ == "__main__":
    main()
