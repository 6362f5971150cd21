"""The lab replays: `vipctl replay --mode packets|sessions` against a running lab.

Both run a child (vipctl.replayclient) in the lab's client namespace and start each
migration (`migrate` on the control socket) when the child reaches its frame index, while
the child goes on: migrations happen under the replayed traffic, as in the capture.

packets: the pure model (clustercore.sim, the lab's own table and owners, migrations at
their indices) predicts which node accepts each packet. The nodes' verdict logs
(nodeshim.verdictlog, gathered by the gateway's `verdicts` op) say what the shims did.
`fold_logs` matches the two by packet digest and order. Outside each migration's window
(from its index to the first packet sent after it finished) the lab must accept each
packet on the node the model names; inside, on exactly one of source and destination.
While the replay runs the client namespace drops what the VIP sends back (an nft table of
its own), or the client's kernel would answer the services with RSTs of its own.
Limitation: with the kernel fast path (a node's datapath "fast"), packets of services
that are not migrating are decided by iptables rules and never reach the log: they are
then checked by per-service counter deltas (status), not one by one, and ICMP echo and
packets of no service are not checked at all; the result says so. Use a lab built with
`vipctl lab up --datapath queue` for full per-packet evidence.

sessions: see vipctl.replayclient; the oracle is "answers identical to the capture".
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque

from clustercore.capture import MigrateAt, packet_digest
from clustercore.errors import LocalControlError, VipError
from clustercore.kinds import Datapath, Delivery, member
from clustercore.oracle import check_packets
from clustercore.ownership import Service
from clustercore.packet import UDP, format_port
from clustercore.sim import Cluster, MigrationSpec, describe_services

from . import lab as labmod
from .client import call
from .replay import MAX_MISMATCHES, Loaded, base_result

SETTLE_S = 0.4  # the logs must stay still this long before they are read
WINDOW_TAIL_S = 0.05  # a packet sent this soon after a migration ended may still be in flight
BLOCK_TABLE = "vipreplay"


def _lab_table(status: dict) -> tuple[list[str], list[Service], str | None]:
    nodes = [n["name"] for n in status["nodes"]]
    anchor = next((n["name"] for n in status["nodes"] if n.get("anchor")), None)
    services = [Service.from_dict(s) for s in status["services"]]
    return nodes, services, anchor


def _counters(status: dict) -> dict[str, dict[str, int]]:
    return {s["name"]: {n: c.get("accepted", 0) for n, c in s.get("counters", {}).items()}
            for s in status["services"]}


def _pace(times: list[float], max_gap: float) -> list[float]:
    out, at = [], 0.0
    for i, t in enumerate(times):
        if i:
            at += min(max(0.0, t - times[i - 1]), max_gap)
        out.append(round(at, 6))
    return out


class _Migrations:
    """Runs each migration in a thread when the child reaches its index."""

    def __init__(self, socket_path: str, migrations: list[MigrateAt]) -> None:
        self.socket_path, self.specs = socket_path, migrations
        self.reports: list[dict | None] = [None] * len(migrations)
        self.started: list[float | None] = [None] * len(migrations)
        self.ended: list[float | None] = [None] * len(migrations)
        self.threads: list[threading.Thread] = []

    def start(self, k: int) -> None:
        def run():
            m = self.specs[k]
            self.started[k] = time.monotonic()
            try:
                r = call("migrate", self.socket_path, timeout=120.0, name=m.service, to=m.dest)
            except VipError as e:
                r = {"service": m.service, "to": m.dest, "outcome": "refused", "reason": str(e)}
            self.ended[k] = time.monotonic()
            self.reports[k] = {**r, "at": m.index}
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for k, m in enumerate(self.specs):
            if self.reports[k] is None:
                self.reports[k] = {"service": m.service, "to": m.dest, "at": m.index, "outcome": None,
                                   "reason": "not started or did not finish"}


def _run_child(lab: labmod.Lab, plan: dict, migrations: _Migrations, timeout: float) -> dict:
    proc = labmod.popen_in(lab.client_ns, [sys.executable, "-m", "vipctl.replayclient"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done, buf = None, b""
    try:
        proc.stdin.write(json.dumps(plan).encode())
        proc.stdin.close()
        deadline = time.monotonic() + timeout
        while done is None and time.monotonic() < deadline:  # bounded: never wait on a silent child
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 20)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg["event"] == "migrate":
                    migrations.start(msg["k"])
                elif msg["event"] == "done":
                    done = msg
        if done is not None:
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    if done is None:
        raise LocalControlError(f"the replay client failed or timed out in {lab.client_ns}: "
                                f"{proc.stderr.read().decode(errors='replace').strip()[-500:]}")
    return done


def _check_vip(loaded: Loaded, status: dict) -> None:
    """The capture's VIP must be one of the lab's (a dual-stack lab has two)."""
    vips = [ipaddress.ip_address(v) for v in status.get("vips") or [status["vip"]]]
    if ipaddress.ip_address(loaded.capture.vip) not in vips:
        raise LocalControlError(f"the capture's VIP is {loaded.capture.vip} but the lab's is "
                                f"{' and '.join(map(str, vips))}"
                                + (" (an IPv6 capture needs a lab built with --ipv6)" if ":" in loaded.capture.vip else ""))


def _block_replies(lab: labmod.Lab, vip: str, on: bool) -> None:
    """In the client namespace only: drop what the VIP sends while raw packets replay."""
    script = (f"table inet {BLOCK_TABLE}\ndelete table inet {BLOCK_TABLE}\n" + (
        f"table inet {BLOCK_TABLE} {{\n  chain input {{\n    type filter hook input priority -300; policy accept;\n"
        f"    {'ip6' if ':' in vip else 'ip'} saddr {vip} drop\n  }}\n}}\n" if on else ""))
    r = labmod.exec_in(lab.client_ns, ["nft", "-f", "-"], input=script.encode(), capture_output=True)
    if r.returncode != 0 and on:
        raise LocalControlError(f"cannot set the reply filter in {lab.client_ns}: {r.stderr.decode().strip()}")


# ---------------------------------------------------------------- packets mode


def fold_logs(logs: dict[str, list[list]]) -> dict[str, dict[str, deque]]:
    """Per node, per digest: the final outcome of each decision, in decision order:
    "accept", "drop", "handover" (bytes given to the destination) or "held" (unresolved)."""
    out: dict[str, dict[str, deque]] = {}
    for node, entries in logs.items():
        finals: dict[int, list] = {}
        order: list[tuple[int, str]] = []
        for seq, digest, _service, verdict, of in entries:
            if of is None:
                finals[seq] = [verdict]
                order.append((seq, digest))
            elif of in finals:
                finals[of].append(verdict)
        per: dict[str, deque] = defaultdict(deque)
        for seq, digest in order:
            v = finals[seq]
            if v[0] != "hold":
                outcome = v[0]
            elif "accept" in v[1:]:
                outcome = "accept"
            elif "handover" in v[1:]:
                outcome = "handover"
            elif "drop" in v[1:]:
                outcome = "drop"
            else:
                outcome = "held"
            per[digest].append(outcome)
        out[node] = per
    return out


def _read_logs(socket_path: str, since: dict[str, int]) -> tuple[dict[str, list], list[str]]:
    logs: dict[str, list] = {n: [] for n in since}
    problems: list[str] = []
    cursor = dict(since)
    for _ in range(1000):  # bounded: 1000 pages of 5000 entries
        r = call("verdicts", socket_path, timeout=30.0, action="read", since=cursor)["nodes"]
        more = False
        for node, page in r.items():
            if "error" in page:
                problems.append(f"{node}: {page['error']}")
                continue
            if page.get("overflowed"):
                problems.append(f"{node}: its verdict log overflowed; some verdicts are missing")
            logs.setdefault(node, []).extend(page["entries"])
            if page["entries"]:
                cursor[node] = page["entries"][-1][0]
            more = more or page["more"]
        if not more:
            break
    return logs, problems


def _settle(socket_path: str, since: dict[str, int], timeout: float = 5.0) -> None:
    """Wait until no node logs anything new for SETTLE_S (bounded)."""
    deadline, last, still = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        r = call("verdicts", socket_path, timeout=10.0, action="read", since=since, limit=1)["nodes"]
        now = {n: p.get("seq") for n, p in r.items()}
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still >= SETTLE_S:
            return
        time.sleep(0.05)


def run_packets(loaded: Loaded, lab: labmod.Lab, socket_path: str, migrations: list[MigrateAt],
                max_gap: float) -> dict:
    status = call("status", socket_path)
    _check_vip(loaded, status)
    names, services, anchor = _lab_table(status)
    datapath = {n["name"]: member(Datapath, n.get("datapath")) for n in status["nodes"]}
    fast = Datapath.FAST in datapath.values()
    sendable = [p for p in loaded.capture.to_vip if p.data[0] >> 4 in (4, 6) and not p.truncated]
    not_sent = len(loaded.capture.to_vip) - len(sendable)
    # what the pure model says, for the lab's own table
    delivery = member(Delivery, status.get("delivery", Delivery.BROADCAST))
    if delivery is None:
        raise LocalControlError(f"the gateway reports an unknown delivery mode {status.get('delivery')!r}")
    model = Cluster(names, services, anchor=anchor, delivery=delivery)
    sim = model.run(((p.index, p.data, p.ts) for p in sendable),
                    [MigrationSpec(m.service, m.dest, m.index) for m in migrations])
    plan = {"mode": "packets", "packets": [[p.index, p.data.hex(), at] for p, at in
                                           zip(sendable, _pace([p.ts for p in sendable], max_gap))],
            "migrations": [[k, m.index] for k, m in enumerate(migrations)]}
    before = _counters(status)
    start = call("verdicts", socket_path, action="start", ttl=300)["nodes"]
    since = {n: r["seq"] for n, r in start.items() if "seq" in r}
    runner = _Migrations(socket_path, migrations)
    try:
        _block_replies(lab, loaded.capture.vip, True)
        done = _run_child(lab, plan, runner, timeout=60.0 + (plan["packets"][-1][2] if sendable else 0))
        runner.join()
        _settle(socket_path, since)
        logs, problems = _read_logs(socket_path, since)
        # read before the replies are let in again: a node retransmits its SYN-ACK to a
        # replayed SYN (1 s, 3 s, ...), and once the client's kernel sees one it answers
        # with an RST to the VIP, which the owner's counter would count as replayed
        after = _counters(call("status", socket_path))
    finally:
        _block_replies(lab, loaded.capture.vip, False)
        try:
            call("verdicts", socket_path, action="stop")
        except VipError:
            pass
    sent_at = {pid: t for pid, t in done["times"]}
    return _judge_packets(loaded, sendable, sim, fold_logs(logs), runner, sent_at, datapath, fast,
                          before, after, not_sent, names, services, problems + done["errors"])


def _judge_packets(loaded, sendable, sim, folded, runner, sent_at, datapath, fast, before, after,
                   not_sent, names, services, problems) -> dict:
    by_pid = {p.index: p for p in sendable}
    port_owner = {k: s.name for s in services for k in s.ports}
    svc_of = {pid: port_owner.get(p.packet.service_key) if p.packet else None for pid, p in by_pid.items()}
    moves = {}  # service -> (from, to) of its migration(s) in this replay
    for r in runner.reports:
        if r and r.get("outcome") in ("committed", "rolled_back"):
            moves.setdefault(r["service"], set()).update({r["from"], r["to"]})
    # a packet is in a migration's window if it belongs to the migrating service and was
    # sent between the migration's index and its end (plus a packet's flight time)
    in_window: set[int] = set()
    for k, m in enumerate(runner.specs):
        end = (runner.ended[k] or time.monotonic()) + WINDOW_TAIL_S
        in_window |= {pid for pid in by_pid if svc_of[pid] == m.service and pid >= m.index
                      and sent_at.get(pid, 0.0) <= end}
    # what the shims did, packet by packet
    accepted_by: dict[int, list[str]] = {}
    logged_by: dict[int, set[str]] = defaultdict(set)
    held: list[int] = []
    destination_of = {r["service"]: r.get("to") for r in runner.reports if r and r.get("service")}
    for pid in sorted(by_pid):
        digest = packet_digest(by_pid[pid].data)
        for node, per in folded.items():
            if not per.get(digest):
                continue
            outcome = per[digest].popleft()
            logged_by[pid].add(node)
            if outcome == "accept":
                accepted_by.setdefault(pid, []).append(node)
            elif outcome == "handover" and destination_of.get(svc_of[pid]):
                accepted_by.setdefault(pid, []).append(destination_of[svc_of[pid]])  # re-injected there
            elif outcome == "held":
                held.append(pid)
    seen = set(logged_by)
    model_owner = {pid: nodes[0] for pid, nodes in sim.accepted_by.items() if len(nodes) == 1}
    silenced = {pid for pid in by_pid if pid not in sim.accepted_by}
    # with the fast path, a node that did not log a packet decided it in the kernel, by the
    # rule of the owner it knew: accept there, drop elsewhere. During a migration that is
    # the source (its rules leave the kernel when it arms, before the flip); a kernel
    # accept that should not have been would show up as a duplicate of the destination's.
    inferred = 0
    if fast:
        source_of = {r["service"]: r.get("from") for r in runner.reports if r and r.get("from")}
        for pid, nodes in logged_by.items():
            owner = source_of.get(svc_of[pid]) if pid in in_window else model_owner.get(pid)
            if owner and owner not in nodes and datapath.get(owner) is Datapath.FAST:
                accepted_by.setdefault(pid, []).append(owner)
                inferred += 1
    per_packet = [pid for pid in sorted(by_pid) if pid not in silenced and (pid in seen or not fast)]
    expected = {pid: model_owner[pid] for pid in per_packet if pid not in in_window and pid in model_owner}
    report = check_packets(per_packet, accepted_by, expected)
    for pid in sorted(silenced):
        if accepted_by.get(pid):
            report.mismatches.append({"packet": pid, "reason": "the model drops it everywhere (no service), "
                                                               f"the lab accepted it on {accepted_by[pid]}"})
    for pid in held:
        report.mismatches.append({"packet": pid, "reason": "still held when the replay ended"})
    for pid in sorted(in_window & set(per_packet)):
        nodes, allowed = accepted_by.get(pid, []), moves.get(svc_of[pid], set())
        if len(nodes) == 1 and allowed and nodes[0] not in allowed:
            report.mismatches.append({"packet": pid, "reason": f"accepted by {nodes[0]} while {svc_of[pid]} "
                                                               f"moved between {sorted(allowed)}"})
    # the fast path: what no shim logged was decided by the kernel; check it by counters
    counted = unverified = 0
    if fast:
        want: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for pid in sorted(by_pid):
            if pid in seen or pid in silenced:
                continue
            svc = svc_of[pid]
            if svc is None or svc in moves:  # a migrated service's counters mix both paths
                unverified += 1
                continue
            counted += 1
            want[svc][model_owner.get(pid, "?")] += 1
        for svc, per_node in want.items():
            logged = defaultdict(int)  # accepts the shims logged (counted by status too)
            for pid in seen:
                if svc_of[pid] == svc:
                    for n in accepted_by.get(pid, []):
                        logged[n] += 1
            kernel = {n: after.get(svc, {}).get(n, 0) - before.get(svc, {}).get(n, 0) - logged[n] for n in names}
            for n in names:
                if kernel[n] != per_node.get(n, 0):
                    report.mismatches.append({"packet": None, "reason": f"{svc} on {n}: the kernel accepted "
                                                                        f"{kernel[n]} packets, the model says {per_node.get(n, 0)}"})
                report.per_node[n] = report.per_node.get(n, 0) + max(0, kernel[n])
            total, wanted = sum(max(0, v) for v in kernel.values()), sum(per_node.values())
            report.packets += wanted
            report.accepted_once += min(total, wanted)
            report.lost += max(0, wanted - total)
            report.duplicated += max(0, total - wanted)
    result = base_result(loaded, "packets")
    result.update({
        "nodes": names, "services": describe_services(services), "datapath": datapath,
        "not_sent": not_sent, "sent": len(sent_at), "silenced": len(silenced), "judged": report.packets,
        "accepted_once": report.accepted_once, "lost": report.lost, "duplicated": report.duplicated,
        "per_node": {n: report.per_node.get(n, 0) for n in names},
        "evidence": {"per_packet": len(per_packet), "kernel_verdicts_inferred": inferred,
                     "by_counters": counted, "unverified": unverified},
        "model": {"accepted_once": sim.report.accepted_once, "lost": sim.report.lost,
                  "duplicated": sim.report.duplicated, "per_node": dict(sim.report.per_node)},
        "migrations": runner.reports, "in_migration_windows": len(in_window),
        "mismatches": (report.mismatches + [{"packet": None, "reason": p} for p in problems])[:MAX_MISMATCHES],
    })
    result["ok"] = (report.ok and not problems and len(sent_at) == len(sendable)
                    and all(r and r.get("outcome") == "committed" for r in runner.reports))
    notes = []
    if fast:
        notes.append("nodes run the kernel fast path: packets of services not in migration were decided by "
                     "iptables rules and checked by per-service counters, not one by one; ICMP echo and "
                     "packets of no service were not checked (lab up --datapath queue gives per-packet evidence)")
    if not_sent:
        notes.append(f"{not_sent} packets to the VIP were not sent (cut by the capture's snaplen)")
    if notes:
        result["limitations"] = notes
    return result


# ---------------------------------------------------------------- sessions mode


def session_plan(loaded: Loaded, migrations: list[MigrateAt], max_gap: float) -> tuple[dict, list[str]]:
    """The child's plan: one ordered list of actions, each with its replay time."""
    events: list[tuple[int, float, list]] = []
    tcp, udp, skipped = [], [], []
    for sid, s in enumerate(loaded.tcp):
        if not s.complete:
            skipped.append(f"{s.name}: its start is not in the capture (or the snaplen cut its bytes)")
            continue
        cum, total = [], 0
        for t in s.turns:
            total += len(t.expect)
            cum.append(total)
        tcp.append({"id": sid, "port": s.port, "expect": base64.b64encode(b"".join(bytes(t.expect) for t in s.turns)).decode(),
                    "cum": cum, "probe": not s.answered, "reset": s.client_reset, "name": s.name,
                    "index": s.index})
        events.append((s.index, s.ts, ["open", sid]))
        if s.answered:
            for k, t in enumerate(s.turns):
                if t.send:
                    events.append((t.index, t.ts, ["send", sid, base64.b64encode(bytes(t.send)).decode()]))
            if s.closed:
                events.append((s.close_index, s.close_ts, ["close", sid]))
    for xid, x in enumerate(loaded.udp):
        if not x.complete:
            skipped.append(f"{x.name}: the snaplen cut a datagram")
            continue
        udp.append({"id": xid, "port": x.port, "answers": [base64.b64encode(a).decode() for a in x.answers],
                    "name": x.name, "index": x.index})
        for index, ts, payload in x.sends:
            events.append((index, ts, ["udp", xid, base64.b64encode(payload).decode()]))
    for k, m in enumerate(migrations):
        events.append((m.index, -1.0, ["migrate", k]))
    events.sort(key=lambda e: (e[0], e[2][0] != "migrate"))
    times = [e[1] for e in events if e[1] >= 0]
    paced = iter(_pace(times, max_gap))
    actions, last = [], 0.0
    for index, ts, action in events:
        if ts >= 0:
            last = next(paced)
        actions.append(action + [last])
    return {"mode": "sessions", "vip": loaded.capture.vip, "actions": actions, "tcp": tcp, "udp": udp,
            "max_wait": 5.0}, skipped


def run_sessions(loaded: Loaded, lab: labmod.Lab, socket_path: str, migrations: list[MigrateAt],
                 max_gap: float) -> dict:
    status = call("status", socket_path)
    _check_vip(loaded, status)
    names, services, _anchor = _lab_table(status)
    served = {k for s in services for k in s.ports}
    for s in loaded.tcp:
        if s.answered and (6, s.port) not in served:
            raise LocalControlError(f"the lab has no service on tcp:{s.port}, which answers in the capture "
                                    f"({s.name}); add it first (vipctl service add ...)")
    for x in loaded.udp:
        if x.answers and (UDP, x.port) not in served:
            raise LocalControlError(f"the lab has no service on {format_port((UDP, x.port))}, which answers "
                                    f"in the capture ({x.name}); add it first (vipctl service add ...)")
    plan, skipped = session_plan(loaded, migrations, max_gap)
    before = _counters(status)
    runner = _Migrations(socket_path, migrations)
    timeout = 120.0 + (plan["actions"][-1][-1] if plan["actions"] else 0.0)
    done = _run_child(lab, plan, runner, timeout=timeout)
    runner.join()
    after = _counters(call("status", socket_path))
    per_node = {n: sum(after.get(s, {}).get(n, 0) - before.get(s, {}).get(n, 0) for s in after) for n in names}
    info = {t["id"]: t for t in plan["tcp"]} | {("u", x["id"]): x for x in plan["udp"]}
    mismatches, lost, duplicated, matched = [], 0, 0, 0
    for r in done["tcp"]:
        spec = info[r["id"]]
        matched += r["match"]
        if r["got"] < r["want"]:
            lost += 1
        elif r["got"] > r["want"]:
            duplicated += 1
        if not r["match"]:
            why = r["error"] or (f"answer differs at byte {r['first_diff']} of {r['want']} "
                                 f"(got {r['got']} bytes): expected {r['wanted']!r}, got {r['near']!r}")
            mismatches.append({"packet": spec["index"], "session": spec["name"], "reason": why})
    for r in done["udp"]:
        spec = info[("u", r["id"])]
        matched += r["match"]
        lost += r["missing"]
        duplicated += r["extra"]
        if not r["match"]:
            why = r["error"] or f"{r['missing']} of {r['want']} answers missing, {r['extra']} unexpected or extra"
            mismatches.append({"packet": spec["index"], "session": spec["name"], "reason": why})
    result = base_result(loaded, "sessions")
    replayed = len(done["tcp"]) + len(done["udp"])
    result.update({
        "nodes": names, "services": describe_services(services),
        "sessions_replayed": replayed, "sessions_matched": matched,
        "accepted_once": matched, "lost": lost, "duplicated": duplicated, "per_node": per_node,
        "migrations": runner.reports,
        "mismatches": (mismatches + [{"packet": None, "reason": f"not replayed: {s}"} for s in skipped])[:MAX_MISMATCHES],
        "ok": matched == replayed and not lost and not duplicated
        and all(r and r.get("outcome") == "committed" for r in runner.reports),
    })
    if skipped:
        result["limitations"] = [f"{len(skipped)} sessions could not be replayed (see mismatches)"]
    return result
