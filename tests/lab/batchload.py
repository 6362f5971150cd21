"""Lab client (run in the client namespace): N echo connections that keep talking while
their service moves; prints one JSON object.

    batchload.py HOST PORT N READY_FILE STOP_FILE MAX_S [PHASE_FILE]

Each connection sends a numbered line ("c<i> <seq>"), waits for its echo, pauses
PAUSE_S, sends the next: so every connection has a request in flight or about to be, all
through the migration. Every reply is checked against what was sent, in order: a missing,
duplicated or reordered byte shows as `bad`. READY_FILE is written once all N answered
their first line; the load stops at STOP_FILE (or after MAX_S, a bound), then every
connection's last request must be answered (drained for up to DRAIN_S). Per connection
the longest wait for one reply is kept (client side: what a user of it saw), per phase
when PHASE_FILE is given (its content, re-read every 0.1 s, names the phase a request
was sent in: the test says which migration runs).
"""

import json
import os
import resource
import selectors
import socket
import sys
import time

PAUSE_S = 0.05
DRAIN_S = 20.0


def main(argv):
    host, port, n, ready, stop, max_s = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4], float(argv[5])
    phase_file = argv[6] if len(argv) > 6 else None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 256)), hard))
    phase, phase_read = "load", 0.0
    worst_by_phase: dict[str, dict[int, float]] = {}
    sel = selectors.DefaultSelector()
    conns = []
    for i in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.setblocking(False)
        c = {"i": i, "s": s, "seq": 0, "expect": b"", "buf": b"", "sent_at": None, "next_at": 0.0,
             "worst": 0.0, "ok": 0, "bad": 0, "closed": False}
        conns.append(c)
        sel.register(s, selectors.EVENT_READ, c)
    t0 = time.monotonic()
    deadline = t0 + max_s
    stopping_at = None
    ready_written = False
    while True:
        now = time.monotonic()
        if phase_file and now - phase_read > 0.1:
            phase_read = now
            try:
                with open(phase_file) as f:
                    phase = f.read().strip() or phase
            except OSError:
                pass
        if stopping_at is None and (os.path.exists(stop) or now > deadline):
            stopping_at = now
        for c in conns:  # send what is due; after the stop, one last request each
            if c["expect"] or c["closed"] or c.get("last_sent") or now < c["next_at"]:
                continue
            line = b"c%d %d\n" % (c["i"], c["seq"])
            try:
                c["s"].sendall(line)
            except OSError:
                c["closed"] = True
                continue
            c["expect"], c["sent_at"], c["phase"] = line, now, phase
            c["seq"] += 1
            if stopping_at is not None:
                c["last_sent"] = True
        for key, _ in sel.select(0.01):
            c = key.data
            try:
                data = c["s"].recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                c["closed"] = True
                sel.unregister(c["s"])
                continue
            c["buf"] += data
            while c["expect"] and len(c["buf"]) >= len(c["expect"]):
                got, c["buf"] = c["buf"][:len(c["expect"])], c["buf"][len(c["expect"]):]
                t = time.monotonic()
                if got == c["expect"]:
                    c["ok"] += 1
                else:
                    c["bad"] += 1
                wait = t - c["sent_at"]
                c["worst"] = max(c["worst"], wait)
                per = worst_by_phase.setdefault(c["phase"], {})
                per[c["i"]] = max(per.get(c["i"], 0.0), wait)
                c["expect"], c["next_at"] = b"", t + PAUSE_S
            if c["buf"] and not c["expect"]:
                c["bad"] += 1  # bytes nobody asked for: a duplicate
                c["buf"] = b""
        if not ready_written and all(c["ok"] >= 1 for c in conns):
            with open(ready, "w") as f:
                f.write(str(time.monotonic() - t0))
            ready_written = True
        if stopping_at is not None:
            finished = all(c["closed"] or (c.get("last_sent") and not c["expect"]) for c in conns)
            if finished or time.monotonic() > stopping_at + DRAIN_S:
                break
    def spread(values):
        v = sorted(x * 1000 for x in values)
        return {"p50": round(v[len(v) // 2], 1), "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 1),
                "max": round(v[-1], 1)}

    worst = sorted(c["worst"] * 1000 for c in conns)
    out = {
        "connections": n, "requests": sum(c["seq"] for c in conns), "ok": sum(c["ok"] for c in conns),
        "bad": sum(c["bad"] for c in conns), "unanswered": sum(1 for c in conns if c["expect"]),
        "closed": sum(1 for c in conns if c["closed"]),
        "worst_wait_ms": {"p50": round(worst[len(worst) // 2], 1), "p99": round(worst[min(len(worst) - 1, int(len(worst) * 0.99))], 1),
                          "max": round(worst[-1], 1)},
        "worst_wait_by_phase_ms": {p: spread(w.values()) for p, w in sorted(worst_by_phase.items())},
    }
    for c in conns:
        c["s"].close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
