"""`vipctl bench`: throughput, copies, freeze time and memory, measured in the lab.

Every figure is the median of several runs (with min and max), and every ratio is taken
against a baseline measured in the same run of this command. The baseline and the three
modes are measured alternated (every lab up at once, one round measures each once, the
order rotating; `alternate`): a mode's ratio is the median of its per-round ratios.

- baseline: the same namespaces with no vipcluster at all: the gateway routes the VIP to
  node 1 by plain unicast, no nft table, no queue rules; iperf3 on node 1.
- modes: the lab with the gateway and agents, iperf3 registered as an `external` service
  (vipcluster delivers and filters its packets; iperf3 binds the VIP itself):
    queue             broadcast delivery, every VIP packet through the Python queue
                      (the seed design)
    fast              broadcast delivery, steady-state verdicts in the kernel
    fast-selective    selective delivery (one copy), kernel verdicts
- migrations: builtin echo with N established connections under load (numbered messages
  and a UDP stream, exact accounting), migrated once per run; freeze_ms, total_ms, the
  per-step split, lost, duplicated, client retransmissions.
- batched_migrations: the same at 1,000 and 10,000 connections (100 with --quick) with
  `migrate --batched` (vipctl.benchbatch): per-connection freeze p50/p99/max, the clients'
  longest wait, retransmissions, lost/dup; `skipped` with the reason when it cannot run.
- datapath_variants: the fast-selective path with one thing changed (vipctl.benchpath):
  node GRO, gateway GRO, 200 more rules; `dup` to every node + drop is the `fast` mode.
- big_hold: 200,000 datagrams (20,000 with --quick) over 64 flows held during one
  migration and released (vipctl.holdflood): held per queue, released, lost, answered.
- memory: RSS of the gateway and of the destination shim right after the largest migration.
- process_migrations: the `process` strategy (criu) moving real programs under real load:
  nginx holding 100 and 1,000 keep-alive connections (vipctl.realload http-hold), redis
  with 10 MB and 200 MB of data (redis-fill, then SET/GET loops); freeze, total, image
  bytes, lost, duplicated, client retransmissions. Skipped, with the reason in the JSON,
  when this build or a node cannot run the strategy.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from pyroute2 import NetNS

from clustercore.errors import LocalControlError
from clustercore.kinds import EXTERNAL_SPEC, Datapath, Delivery, builtin_spec
from clustercore.process import LAZY_ENV

from . import benchbatch, benchpath, holdflood
from . import lab as labmod
from . import programs
from .client import call
from .render import count, ms

IPERF_PORT = 5201


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": len(values)}


def _machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "kernel": platform.release(), "cpu_model": model,
            "python": platform.python_version()}


def _queue_wait(report: dict) -> float | None:
    """The longer of the source's and the destination's LongestQueueWait in a migration's
    report (None: neither said, e.g. a run that did not get that far)."""
    split = report.get("split_ms") or {}
    found = [part.get("queue_wait") for part in (split.get("freeze") or {}, split.get("release") or {})]
    found = [x for x in found if isinstance(x, (int, float))]
    return max(found) if found else None


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class Iperf:
    """iperf3 server on a node, client in vip-client; figures from iperf3's JSON."""

    def __init__(self, lab: labmod.Lab, node_ns: str, vip: str) -> None:
        self.lab, self.node_ns, self.vip = lab, node_ns, vip
        self.server = labmod.popen_in(node_ns, ["iperf3", "-s", "-B", vip, "-p", str(IPERF_PORT)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def _client(self, args: list[str], seconds: float) -> dict:
        r = labmod.exec_in(self.lab.client_ns, ["iperf3", "-c", self.vip, "-p", str(IPERF_PORT), "-J",
                                                "-t", str(seconds), *args],
                           capture_output=True, timeout=seconds + 30)
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return {"error": r.stderr.decode(errors="replace")[-300:]}

    def udp_pps(self, seconds: float) -> float | None:
        """Small (64-byte) datagrams as fast as iperf3 sends; packets/s that arrived."""
        j = self._client(["-u", "-b", "0", "-l", "64"], seconds)
        try:
            s = j["end"]["sum"]
            return (s["packets"] - s["lost_packets"]) / s["seconds"]
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    def tcp_mbps(self, seconds: float) -> float | None:
        j = self._client([], seconds)
        try:
            return j["end"]["sum_received"]["bits_per_second"] / 1e6
        except (KeyError, TypeError):
            return None

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(5)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


def _measure(iperf: Iperf, runs: int, seconds: float) -> dict:
    pps = [iperf.udp_pps(seconds) for _ in range(runs)]
    mbps = [iperf.tcp_mbps(seconds) for _ in range(runs)]
    return {"pps": _stats(pps), "tcp_mbps": _stats(mbps)}


def open_baseline(prefix: str) -> tuple[labmod.Lab, Iperf]:
    """Plain kernel forwarding: gateway routes the VIP to n1, no vipcluster anywhere; up
    until the caller takes it down (labmod.down)."""
    spec = labmod.Lab(prefix, 3)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.build_links(spec)
        labmod.wire_like_client(spec)
        with NetNS(spec.node_ns(1)) as n1:
            n1.addr("add", index=n1.link_lookup(ifname="lo")[0], address=labmod.VIP, prefixlen=32)
        with NetNS(spec.gw_ns) as gw:
            gw.route("add", dst=f"{labmod.VIP}/32", gateway=spec.node_addr(1))
        labmod.exec_in(spec.gw_ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        return spec, Iperf(spec, spec.node_ns(1), labmod.VIP)
    except BaseException:
        labmod.down(spec, log=lambda *a: None)  # half built: nothing left behind
        raise


def open_mode(prefix: str, delivery: Delivery, datapath: Datapath) -> tuple[labmod.Lab, Iperf]:
    """The lab with the gateway and agents, iperf3 an `external` service on n1."""
    spec = labmod.Lab(prefix, 3, delivery, datapath)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        call("service.add", spec.control_socket, name="iperf", node="n1",
             ports=[f"tcp:{IPERF_PORT}", f"udp:{IPERF_PORT}"], exec=EXTERNAL_SPEC)
        return spec, Iperf(spec, spec.node_ns(1), labmod.VIP)
    except BaseException:
        labmod.down(spec, log=lambda *a: None)
        raise


def alternate(iperfs: dict[str, Iperf], rounds: int, seconds: float, log=lambda *a: None) -> dict:
    """Every row measured once per round (UDP packets/s, then one TCP stream, `seconds`
    each), in an order that rotates by one every round: a slow spell of the shared
    machine is spread over the rows instead of falling on one. {row: {"pps": [...],
    "tcp": [...]}}, one value (or None) per round."""
    rows = list(iperfs)
    out = {r: {"pps": [], "tcp": []} for r in rows}
    for k in range(rounds):
        order = rows[k % len(rows):] + rows[:k % len(rows)]
        for r in order:
            out[r]["pps"].append(iperfs[r].udp_pps(seconds))
        for r in order:
            out[r]["tcp"].append(iperfs[r].tcp_mbps(seconds))
        log(f"round {k + 1}/{rounds} of {', '.join(rows)} done")
    return out


def paired_ratios(row: dict, base: dict) -> dict:
    """Per-round ratios of an alternated row to the baseline of the same round: their
    median (what to compare) and range, and the ratio of the two medians."""
    out = {}
    for key in ("pps", "tcp"):
        per = [x / y for x, y in zip(row[key], base[key]) if x and y]
        st, mr, mb = _stats(per), _stats(row[key])["median"], _stats(base[key])["median"]
        out[key] = {"ratio_median": st["median"], "ratio_range": [st["min"], st["max"]],
                    "median_ratio": round(mr / mb, 3) if mr and mb else None}
    return out


MODES = (("queue", Delivery.BROADCAST, Datapath.QUEUE),
         ("fast", Delivery.BROADCAST, Datapath.FAST),
         ("fast-selective", Delivery.SELECTIVE, Datapath.FAST))


def measure_modes(prefix: str, runs: int, seconds: float, log) -> tuple[dict, dict]:
    """The baseline and the three modes, every lab up at once and measured alternated
    (`runs` rounds). A mode's ratio is the median of its per-round ratios to the same
    round's baseline: measured one after the other (as before 2026-12-03), two rows of the
    same configuration minutes apart differed by 0.1-0.3 on this shared machine."""
    labs: dict[str, tuple[labmod.Lab, Iperf]] = {}
    try:
        log("baseline: plain unicast routing to n1, no vipcluster; modes "
            + ", ".join(f"{n} (delivery={d} datapath={dp})" for n, d, dp in MODES) + ": alternated")
        labs["baseline"] = open_baseline(f"{prefix}b")
        for i, (name, delivery, datapath) in enumerate(MODES):
            labs[name] = open_mode(f"{prefix}m{i}", delivery, datapath)
        copies = {name: call("status", labs[name][0].control_socket)["copies_per_packet"] for name, _, _ in MODES}
        results = alternate({r: iperf for r, (_, iperf) in labs.items()}, runs, seconds, log)
    finally:
        for spec, iperf in labs.values():
            iperf.close()
            labmod.down(spec, log=lambda *a: None)
    b = results["baseline"]
    baseline = {"pps": _stats(b["pps"])["median"], "tcp_mbps": _stats(b["tcp"])["median"],
                "pps_stats": _stats(b["pps"]), "tcp_mbps_stats": _stats(b["tcp"]), "alternated_rounds": runs}
    modes = {}
    for name, delivery, datapath in MODES:
        r, ratios = results[name], paired_ratios(results[name], b)
        modes[name] = {
            "delivery": delivery, "datapath": datapath,
            "pps": _stats(r["pps"])["median"], "tcp_mbps": _stats(r["tcp"])["median"],
            "pps_ratio": ratios["pps"]["ratio_median"], "tcp_ratio": ratios["tcp"]["ratio_median"],
            "pps_ratio_range": ratios["pps"]["ratio_range"], "tcp_ratio_range": ratios["tcp"]["ratio_range"],
            # the ratio of the medians, as this table gave it when rows ran one after another
            "pps_median_ratio": ratios["pps"]["median_ratio"], "tcp_median_ratio": ratios["tcp"]["median_ratio"],
            "pps_stats": _stats(r["pps"]), "tcp_mbps_stats": _stats(r["tcp"]),
            "copies_per_packet": copies[name],
        }
    return baseline, modes


def _next(node: str) -> str:
    return {"n1": "n2", "n2": "n3", "n3": "n1"}[node]


NO_MIGRATION_WINDOW_S = 1.0  # the load's window without a migration (beside the 1 s before and after)


def loaded_migration(spec: labmod.Lab, n: int, tag: str, destination: str | None, batched: bool = False,
                     batch_size: int = 0) -> dict:
    """Migrate echo to `destination` while `n` connections and a UDP stream load it
    (vipctl.loadgen, exact accounting): the gateway's report and the clients' own. A
    refusal of the migration raises (VipError) after the load has stopped. `destination`
    None: the same load and window with no migration (report {}): the clients' own floor,
    what the load generator and the lab make a reply wait with nothing moving."""
    ready, stop = f"{tag}.ready", f"{tag}.stop"
    rate = max(0.2, min(20.0, 1000.0 / n))  # about 1,000 messages/s in all
    load = labmod.popen_in(spec.client_ns, [sys.executable, "-m", "vipctl.loadgen", labmod.VIP,
                                            "--conns", str(n), "--rate", str(rate), "--udp-port", "7",
                                            "--udp-rate", "200", "--duration", "300",
                                            "--ready-file", ready, "--stop-file", stop],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(ready) and load.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    began = time.monotonic()  # the window's start, on loadgen's clock (tcp_slowest)
    try:
        if destination is None:
            time.sleep(NO_MIGRATION_WINDOW_S)
            report = {}
        else:
            report = call("migrate", spec.control_socket, timeout=300.0, name="echo", to=destination,
                          **({"batched": True} if batched else {}),
                          **({"batch_size": batch_size} if batch_size else {}))
    finally:
        time.sleep(1.0)
        open(stop, "w").close()
        stdout, stderr = load.communicate(timeout=300)
    try:
        client = json.loads(stdout)
    except json.JSONDecodeError:
        client = {"error": stderr.decode(errors="replace")[-300:]}
    lost = (client.get("tcp_missing", 0) + client.get("udp_missing", 0) + client.get("tcp_bad", 0)
            if "error" not in client else None)
    return {"report": report, "client": client, "lost": lost, "duplicated": client.get("udp_duplicated"),
            "began": began}


def measure_migrations(prefix: str, sizes: list[int], runs: int, log) -> tuple[list[dict], dict]:
    spec = labmod.Lab(prefix, 3, Delivery.SELECTIVE, Datapath.FAST)
    labmod.down(spec, log=lambda *a: None)
    out = []
    rss = {}
    tmp = tempfile.mkdtemp(prefix="vipctl-bench-")
    os.chmod(tmp, 0o777)
    try:
        labmod.up(spec, log=lambda *a: None)
        sock = spec.control_socket
        call("service.add", sock, name="echo", node="n1", ports=["tcp:7", "udp:7"], exec=builtin_spec("echo"))
        owner = "n1"
        for n in sizes:
            floor = loaded_migration(spec, n, os.path.join(tmp, f"{n}-floor"), None)["client"]
            rows = []
            for run in range(runs):
                destination = _next(owner)
                row = loaded_migration(spec, n, os.path.join(tmp, f"{n}-{run}"), destination)
                report, client, lost = row["report"], row["client"], row["lost"]
                if report.get("outcome") == "committed":
                    owner = destination
                rows.append(row)
                log(f"migration with {n} connections: {report.get('outcome')}, freeze {ms(report.get('freeze_ms'))}, "
                    f"stop {ms(report.get('stop_ms'))}, "
                    f"total {ms(report.get('total_ms'))}, lost {count(lost)}, retrans {count(client.get('retrans_segs'))}")
            waits = _stats([benchbatch.longest_wait(r["client"]) for r in rows])
            queue_waits = _stats([_queue_wait(r["report"]) for r in rows])
            out.append({
                "connections": n,
                "established_moved": _stats([r["report"].get("tcp_established") for r in rows]),
                "freeze_ms": _stats([r["report"].get("freeze_ms") for r in rows])["median"],
                "freeze_ms_stats": _stats([r["report"].get("freeze_ms") for r in rows]),
                # source stopped -> destination serving (never 0 for a quiet service)
                "stop_ms": _stats([r["report"].get("stop_ms") for r in rows])["median"],
                "stop_ms_stats": _stats([r["report"].get("stop_ms") for r in rows]),
                "total_ms": _stats([r["report"].get("total_ms") for r in rows])["median"],
                "total_ms_stats": _stats([r["report"].get("total_ms") for r in rows]),
                "steps_ms": _median_steps([r["report"].get("steps_ms", {}) for r in rows]),
                "outcomes": [r["report"].get("outcome") for r in rows],
                "lost": max((r["lost"] for r in rows if r["lost"] is not None), default=None),
                "duplicated": max((r["duplicated"] for r in rows if r["duplicated"] is not None), default=None),
                "reported_lost": max((r["report"].get("lost") or 0 for r in rows), default=0),
                "client_retransmissions": max((r["client"].get("retrans_segs", 0) for r in rows), default=0),
                # the longest any client (TCP or UDP) waited for one reply from the moment every
                # connection was up (vipctl.loadgen): median of the runs, and their spread
                "max_reply_ms": waits["median"], "max_reply_ms_stats": waits,
                # the same load with nothing moving, in the same lab just before: the floor
                # of that figure (the load generator's own event loop, the lab's cores)
                "max_reply_ms_no_migration": benchbatch.longest_wait(floor),
                # what each client felt: the slowest reply of each connection during the run
                "per_connection_worst_reply_ms": _median_pcts([r["client"].get("conn_worst_reply_ms") for r in rows]),
                # the longest a packet of the service waited for its verdict in a node's
                # queue (source from its arm, destination from its prepare; by the kernel's
                # arrival stamps): held, or read late. Past ~200 ms its client's loss probe fires
                "queue_wait_ms": queue_waits["median"], "queue_wait_ms_stats": queue_waits,
                "split_ms": rows[-1]["report"].get("split_ms", {}),
            })
        pids = labmod.daemon_pids(spec)
        rss = {"gateway": _rss_mb(pids["gateway"]), "shim": _rss_mb(pids[owner]),
               "shim_connections": sizes[-1] if sizes else 0}
    finally:
        labmod.down(spec, log=lambda *a: None)
        shutil.rmtree(tmp, ignore_errors=True)  # the load's ready/stop files: nothing left behind
    return out, rss


# --- the process strategy: real programs moved whole -----------------------------------

PROCESS_ROWS = (("nginx", 100), ("nginx", 1000), ("redis", 10), ("redis", 200), ("redis", 1024))  # (program, connections | MB)
# redis large enough for lazy pages (>= 64 MiB resident), moved again with lazy pages turned
# off on every node (VIPCLUSTER_LAZY_PAGES=off): the same rows, memory copied in the freeze
COPY_ROWS = (("redis", 200), ("redis", 1024))


def _vipctl(spec: labmod.Lab, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """The CLI, as an operator types it (the process strategy is spelled by its options)."""
    return subprocess.run([sys.executable, "-m", "vipctl", "--socket", spec.control_socket, *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _realload(spec: labmod.Lab, *args) -> subprocess.Popen:
    return labmod.popen_in(spec.client_ns, [sys.executable, "-m", "vipctl.realload", *map(str, args)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _client_json(p: subprocess.Popen, timeout: float) -> dict:
    stdout, stderr = p.communicate(timeout=timeout)
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return {"error": stderr.decode(errors="replace")[-300:]}


def measure_process_migrations(prefix: str, runs: int, log, rows=PROCESS_ROWS, lazy: bool = True) -> dict:
    """One row per `rows` entry, or {"skipped": why} when the strategy is unavailable.
    lazy False: the lab's agents run with VIPCLUSTER_LAZY_PAGES=off (every image copied)."""
    ok, why = programs.criu_here()
    if not ok:
        log(f"process strategy rows skipped: {why}")
        return {"skipped": why, "rows": []}
    spec = labmod.Lab(prefix, 3, Delivery.SELECTIVE, Datapath.FAST)
    labmod.down(spec, log=lambda *a: None)
    tmp = tempfile.mkdtemp(prefix="vipctl-bench-proc-")
    os.chmod(tmp, 0o777)
    saved = os.environ.get(LAZY_ENV)
    try:
        if not lazy:
            os.environ[LAZY_ENV] = "off"  # the agents the lab starts inherit it
        labmod.up(spec, log=lambda *a: None)
        why = programs.wait_process_strategy(lambda: call("status", spec.control_socket))
        if why:
            log(f"process strategy rows skipped: {why}")
            return {"skipped": why, "rows": []}
        out = []
        for program, size in rows:
            runs_out = [_process_run(spec, program, size, os.path.join(tmp, f"{program}-{size}-{run}"), log)
                        for run in range(runs)]
            out.append(_process_row(program, size, runs_out))
        return {"skipped": None, "rows": out}
    finally:
        if saved is None:
            os.environ.pop(LAZY_ENV, None)
        else:
            os.environ[LAZY_ENV] = saved
        labmod.down(spec, log=lambda *a: None)
        shutil.rmtree(tmp, ignore_errors=True)  # the images and the programs' files


def _process_run(spec: labmod.Lab, program: str, size: int, workdir: str, log) -> dict:
    """Start `program` with the process strategy on n1, load it, move it to n2, check."""
    os.makedirs(workdir, exist_ok=True)
    ready, stop = os.path.join(workdir, "ready"), os.path.join(workdir, "stop")
    if program == "nginx":
        prog = programs.nginx_program(workdir, connections=max(1024, 2 * size))
    else:
        prog = programs.redis_program(workdir)
    name = f"bench-{program}"
    added = _vipctl(spec, *programs.service_add_args(name, "n1", prog, "process"))
    if added.returncode != 0:
        return {"report": {"outcome": "not started", "reason": added.stderr.strip()[-300:]}, "client": {}}
    try:
        time.sleep(1.0)  # the program binds the VIP itself
        port = int(prog.ports[0].split(":")[1])
        fill = {}
        if program == "nginx":
            paths = ",".join(f"{p}={sz}" for p, (sz, _) in sorted(prog.files.items()) if sz < 1 << 20)
            load = _realload(spec, "http-hold", labmod.VIP, port, "--conns", size, "--paths", paths,
                             "--rate", max(0.5, min(10.0, 1000.0 / size)), "--duration", 300,
                             "--ready-file", ready, "--stop-file", stop)
        else:
            fill = _client_json(_realload(spec, "redis-fill", labmod.VIP, port, "--mb", size), 600)
            load = _realload(spec, "redis-loop", labmod.VIP, port, "--conns", 4, "--rate", 50, "--duration", 300,
                             "--ready-file", ready, "--stop-file", stop)
        deadline = time.time() + 120
        while not os.path.exists(ready) and load.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        try:
            r = _vipctl(spec, "migrate", name, "--to", "n2", "--json")
            report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {
                "outcome": "error", "reason": r.stderr.strip()[-300:]}
        finally:
            time.sleep(1.0)
            open(stop, "w").close()
            client = _client_json(load, 300)
        if program == "redis" and "error" not in client:
            keys = fill.get("keys", 0) + client.get("keys_written", 0)
            got = labmod.exec_in(spec.client_ns, ["redis-cli", "-h", labmod.VIP, "-p", str(port), "DBSIZE"],
                                 capture_output=True, text=True, timeout=60)
            client["keys_missing"] = keys - int(got.stdout.strip() or 0)
        log(f"process strategy, {program} {size}: {report.get('outcome')}, memory {report.get('memory')}, "
            f"freeze {ms(report.get('freeze_ms'))}, pages after {ms(report.get('pages_after_freeze_ms'))}, "
            f"stop {ms(report.get('stop_ms'))}, "
            f"total {ms(report.get('total_ms'))}, image {count(report.get('image_bytes', report.get('bytes_moved')))} bytes"
            + (f" ({report['reason']})" if report.get("reason") else ""))
        return {"report": report, "client": client, "fill": fill}
    finally:
        _vipctl(spec, "service", "remove", name)


def _process_row(program: str, size: int, runs: list[dict]) -> dict:
    def lost(run: dict) -> int | None:
        c = run["client"]
        if not c or "error" in c:
            return None
        return (c.get("failed", 0) + c.get("resets", 0) + c.get("bad", 0) + max(0, c.get("keys_missing", 0))
                + (run["report"].get("lost") or 0))
    reports = [r["report"] for r in runs]
    key = "connections" if program == "nginx" else "data_mb"
    return {
        "program": program, key: size,
        "memory": sorted({str(r.get("memory")) for r in reports if r.get("memory")}),
        # lazy pages: how long the source served pages after its freeze reply (the copy ran meanwhile)
        "pages_after_freeze_ms": _stats([r.get("pages_after_freeze_ms") for r in reports
                                         if isinstance(r.get("pages_after_freeze_ms"), (int, float))])["median"],
        "outcomes": [r.get("outcome") for r in reports],
        "reasons": [r["reason"] for r in reports if r.get("reason")],
        "freeze_ms": _stats([r.get("freeze_ms") for r in reports])["median"],
        "freeze_ms_stats": _stats([r.get("freeze_ms") for r in reports]),
        "stop_ms": _stats([r.get("stop_ms") for r in reports])["median"],
        "stop_ms_stats": _stats([r.get("stop_ms") for r in reports]),
        "total_ms": _stats([r.get("total_ms") for r in reports])["median"],
        # the process playbook reports the image it sent as bytes_moved (image_bytes if named)
        "image_bytes": _stats([r.get("image_bytes", r.get("bytes_moved")) for r in reports
                               if r.get("outcome") == "committed"])["median"],
        "lost": max((x for x in map(lost, runs) if x is not None), default=None),
        "duplicated": max((r.get("duplicated") or 0 for r in reports if r.get("outcome") == "committed"), default=None),
        "client_retransmissions": max((r["client"].get("retrans_segs", 0) for r in runs if r["client"]), default=None),
        "longest_wait_ms": max((r["client"].get("longest_wait_ms", 0) for r in runs if r["client"]), default=None),
    }


def _median_pcts(rows: list) -> dict:
    rows = [r for r in rows if isinstance(r, dict) and r.get("max") is not None]
    return {k: _stats([r[k] for r in rows])["median"] for k in ("p50", "p99", "max")} if rows else {}


def _median_steps(steps: list[dict]) -> dict:
    keys = sorted({k for s in steps for k in s})
    return {k: _stats([s.get(k) for s in steps if k in s])["median"] for k in keys}


def run_bench(quick: bool, log) -> dict:
    if os.geteuid() != 0:
        raise LocalControlError("must be run as root")
    for tool in ("iperf3",):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise LocalControlError(f"{tool} is not installed (run scripts/setup)")
    prefix = f"vb{os.getpid() % 100000}"
    runs = 1 if quick else 3
    seconds = 1.0 if quick else 4.0
    sizes = [1, 100] if quick else [1, 100, 1000, 5000, 10000]  # benchbatch's sizes are among these
    mig_runs = 1 if quick else 3
    t0 = time.monotonic()
    result: dict = {"quick": quick, "machine": _machine()}
    result["baseline"], modes = measure_modes(prefix, runs, seconds, log)
    copies = {name: m["copies_per_packet"] for name, m in modes.items()}
    result["modes"] = modes
    result["datapath_variants"] = benchpath.measure_variants(prefix, runs, seconds, result["baseline"], modes, log)
    result["copies_per_packet"] = {"steady": copies["fast-selective"]["steady"],
                                   "migrating": copies["fast-selective"]["migrating"], "by_mode": copies}
    migrations, rss = measure_migrations(prefix, sizes, mig_runs, log)
    result["migrations"] = migrations
    result["rss_mb"] = rss
    # the batched handoff at the whole rows' counts (1,000 and 10,000; 100 with --quick)
    result["batched_migrations"] = benchbatch.measure_batched(
        prefix, benchbatch.QUICK_SIZES if quick else benchbatch.BATCHED_SIZES, mig_runs, log)
    result["big_hold"] = holdflood.measure(prefix, 20_000 if quick else 200_000, log)
    result["process_migrations"] = measure_process_migrations(prefix, mig_runs, log)
    result["process_migrations_copy"] = measure_process_migrations(prefix, mig_runs, log, COPY_ROWS, lazy=False)
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    return result


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LocalControlError("--plot needs matplotlib (pip install matplotlib)") from None
    benchbatch.plot_migrations(result, path)
