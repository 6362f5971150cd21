"""A large hold: a bounded UDP flood held during one migration, then released.

The scene (used by `vipctl bench` and tests/lab/test_big_hold.py): echo (udp:7) on n1
moves to n2. The destination's restore step waits (lab fault `wait`, nodeshim.migrate)
while the source is already frozen, so every datagram sent meanwhile is held on both
nodes. The client floods `count` numbered datagrams over `flows` UDP sockets (distinct
source ports, so the fan-out spreads them over the node's queues), the scene reads the
destination's kernel queues (how many packets wait there, per queue), and only then lets
the restore go on. Every datagram must come back from echo exactly once and, per flow, in
order: the client's own accounting, never a time.

Bounded everywhere: the flood is `count` datagrams, every wait has a deadline, and the
client stops reading once every answer is in or no answer came for IDLE_S.
"""

from __future__ import annotations

import json
import shutil
import os
import socket
import subprocess
import sys
import time

ECHO_PORT = 7
SO_RCVBUFFORCE = 33
CLIENT_RCVBUF = 512 << 20  # the whole release comes back in one burst
FIRST_SPORT = 41000
IDLE_S = 5.0  # the client stops reading after this long without an answer
STEP_WAIT_S = 60.0
FLOOD_WAIT_S = 300.0
BURST = 256  # datagrams per flow turn (then a look for answers)


def client(argv: list[str]) -> int:
    """Inside the client namespace: warm every flow up (one answer each), say ready, wait
    for `go`, flood, say sent, collect answers; print one JSON object."""
    vip, flows, count, ready, go, sent_file = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4], argv[5]
    socks = []
    for i in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CLIENT_RCVBUF)
        s.bind(("0.0.0.0", FIRST_SPORT + i))
        s.settimeout(5.0)
        s.sendto(b"w", (vip, ECHO_PORT))
        if s.recv(64) != b"w":
            raise SystemExit(f"flow {i}: bad warm-up answer")
        s.setblocking(False)
        socks.append(s)
    answers: list[list[int]] = [[] for _ in range(flows)]

    def read_all() -> int:
        got = 0
        for i, s in enumerate(socks):
            while True:
                try:
                    data = s.recv(64)
                except BlockingIOError:
                    break
                answers[i].append(int(data))
                got += 1
        return got

    with open(ready, "w") as f:
        f.write("ready")
    deadline = time.monotonic() + FLOOD_WAIT_S
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("no go")
        time.sleep(0.01)
    per_flow = [count // flows + (1 if i < count % flows else 0) for i in range(flows)]
    next_seq = [0] * flows
    sent = 0
    while sent < count:
        for i, s in enumerate(socks):
            n = min(BURST, per_flow[i] - next_seq[i])
            for _ in range(n):
                try:
                    s.sendto(b"%09d" % next_seq[i], (vip, ECHO_PORT))
                except BlockingIOError:
                    time.sleep(0.001)
                    s.setblocking(True)
                    s.sendto(b"%09d" % next_seq[i], (vip, ECHO_PORT))
                    s.setblocking(False)
                next_seq[i] += 1
            sent += n
        read_all()
    with open(sent_file, "w") as f:
        f.write(str(sent))
    total = sum(len(a) for a in answers)
    last = time.monotonic()
    stop_at = time.monotonic() + FLOOD_WAIT_S
    while total < count and time.monotonic() - last < IDLE_S and time.monotonic() < stop_at:
        got = read_all()
        if got:
            total += got
            last = time.monotonic()
        else:
            time.sleep(0.005)
    missing = duplicated = out_of_order = 0
    for i in range(flows):
        a = answers[i]
        seen = set(a)
        missing += sum(1 for k in range(per_flow[i]) if k not in seen)
        duplicated += len(a) - len(seen)
        out_of_order += sum(1 for x, y in zip(a, a[1:]) if y < x)
    print(json.dumps({"sent": sent, "answered": total, "missing": missing, "duplicated": duplicated,
                      "out_of_order": out_of_order, "flows": flows}))
    return 0


def queue_waiting(lab, k: int) -> dict[int, int]:
    """{queue: packets waiting in it} on node k (held ones included), from the kernel."""
    from vipctl import lab as labmod

    out = labmod.exec_in(lab.node_ns(k), ["cat", "/proc/net/netfilter/nfnetlink_queue"],
                         capture_output=True, text=True, check=True).stdout
    return {int(p[0]): int(p[2]) for p in (line.split() for line in out.splitlines()) if len(p) > 2}


def fault(lab, node: str, op: str, action: str) -> str:
    d = os.path.join(lab.state_dir, node, "faults")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, op)
    with open(path, "w") as f:
        f.write(action)
    return path


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def run(lab, vipctl, workdir: str, count: int = 200_000, flows: int = 64, log=lambda *a: None) -> dict:
    """The scene on a lab with echo on n1 and n2 free (selective delivery, a gateway whose
    `restoring` timeout outlasts the flood). `vipctl(*args)` runs the CLI; returns
    {"report": the migration report, "client": the client's accounting,
     "held_per_queue": n2's queues when the flood was in, "held_total": their sum}."""
    from vipctl import lab as labmod

    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o777)
    ready, go, sent = (os.path.join(workdir, n) for n in ("ready", "go", "sent"))
    for p in (ready, go, sent):
        if os.path.exists(p):
            os.unlink(p)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cp = labmod.popen_in(lab.client_ns, [sys.executable, "-m", "vipctl.holdflood", lab_vip(),
                                         str(flows), str(count), ready, go, sent],
                         cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    mp = None
    go_file = None
    try:
        _wait(lambda: os.path.exists(ready) or cp.poll() is not None, STEP_WAIT_S, "the client is not ready")
        if cp.poll() is not None:
            raise RuntimeError(f"the flood client failed: {cp.stderr.read().decode()}")
        armed = fault(lab, "n2", "migrate.restore", "wait")
        go_file = armed + ".go"
        mp = subprocess.Popen([sys.executable, "-m", "vipctl", "--socket", lab.control_socket, "migrate", "echo",
                               "--to", "n2", "--json"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        # the fault fires when the restore step reaches n2: the source is frozen by then
        _wait(lambda: not os.path.exists(armed) or mp.poll() is not None, STEP_WAIT_S, "the restore never came")
        if mp.poll() is not None:
            raise RuntimeError(f"the migration ended early: {mp.stdout.read().decode()} {mp.stderr.read().decode()}")
        log(f"source frozen, destination waiting: flooding {count} datagrams over {flows} flows")
        with open(go, "w") as f:
            f.write("go")
        _wait(lambda: os.path.exists(sent) or cp.poll() is not None, FLOOD_WAIT_S, "the flood did not end")
        # everything sent is on its way into n2's queues: wait until it is all there
        # (or stops growing: then what is missing was lost and the accounting says so)
        held: dict[int, int] = {}
        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + STEP_WAIT_S
        while time.monotonic() < deadline:
            held = queue_waiting(lab, 2)
            total = sum(held.values())
            if total >= count:
                break
            if total != last:
                last, stable_since = total, time.monotonic()
            elif time.monotonic() - stable_since > IDLE_S:
                break
            time.sleep(0.1)
        log(f"held on n2: {sum(held.values())} packets in queues {held}")
        with open(go_file, "w") as f:
            f.write("go")
        out, err = mp.communicate(timeout=FLOOD_WAIT_S)
        report = json.loads(out) if out.strip().startswith("{") else {"error": err}
        cout, cerr = cp.communicate(timeout=FLOOD_WAIT_S)
        if cp.returncode != 0:
            raise RuntimeError(f"the flood client failed: {cerr.decode()}")
        return {"report": report, "client": json.loads(cout), "held_per_queue": held,
                "held_total": sum(held.values())}
    finally:
        if go_file is not None and not os.path.exists(go_file):
            with open(go_file, "w") as f:  # never leave a step waiting
                f.write("go")
        for p in (cp, mp):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def lab_vip() -> str:
    from vipctl.lab import VIP

    return VIP


if __name__ == "__main__":
    sys.exit(client(sys.argv[1:]))


def measure(prefix: str, count: int, log, flows: int = 64) -> dict:
    """The bench row: one large hold in a lab of its own (selective delivery, a restoring
    timeout long enough for the flood), as counts plus the report's freeze and stop."""
    import tempfile

    from clustercore.kinds import Datapath, Delivery, builtin_spec
    from vipctl import lab as labmod
    from vipctl.client import call

    spec = labmod.Lab(prefix, 3, Delivery.SELECTIVE, Datapath.FAST, migration_timeouts=(("restoring", 300.0), ("releasing", 60.0)))
    labmod.down(spec, log=lambda *a: None)
    work = tempfile.mkdtemp(prefix="vipctl-bench-hold-")
    try:
        labmod.up(spec, log=lambda *a: None)
        call("service.add", spec.control_socket, name="echo", node="n1", ports=["tcp:7", "udp:7"],
             exec=builtin_spec("echo"))
        r = run(spec, None, work, count=count, flows=flows, log=log)
    finally:
        labmod.down(spec, log=lambda *a: None)
        shutil.rmtree(work, ignore_errors=True)
    rep, c = r["report"], r["client"]
    row = {"datagrams": count, "flows": flows, "outcome": rep.get("outcome"),
           "held_total": r["held_total"], "held_per_queue": r["held_per_queue"],
           "queues_used": sum(1 for v in r["held_per_queue"].values() if v),
           "released": rep.get("released"), "reported_lost": rep.get("lost"),
           "answered": c.get("answered"), "missing": c.get("missing"), "duplicated": c.get("duplicated"),
           "out_of_order": c.get("out_of_order"), "freeze_ms": rep.get("freeze_ms"), "stop_ms": rep.get("stop_ms"),
           "release_ms": (rep.get("split_ms") or {}).get("release", {}).get("release")}
    log(f"large hold: {row['held_total']} held over {row['queues_used']} queues, released {row['released']}, "
        f"lost {row['reported_lost']}, answered {row['answered']}/{count}")
    return row
