"""`vipctl bench`: the batched handoff's rows, beside the whole-service handoff's.

The same load as the whole-service rows (vipctl.bench.loaded_migration: builtin echo with N
established connections sending numbered messages, a UDP stream, exact accounting), the
same lab (selective delivery, fast datapath), the same connection counts (1,000 and 10,000;
100 with --quick), but `vipctl migrate --batched`: the connections move in batches, each
frozen only while it moves. Per row: the per-connection freeze p50/p99/max (the gateway's
report, measured on the destination: how long each connection's first held packet
waited, over the few flows that had one), every moved connection's frozen time
p50/p99/max (conn_frozen_ms: its batch's, the source's hold to the destination's
release), the clients' longest wait for one reply, client retransmissions, lost and
duplicated (the clients' own accounting), batches, the whole migration's duration.

A row that cannot run says why in the JSON (`skipped`): the agents of this build must
announce the batch channel for echo (the node side of the batched handoff); without it the
gateway refuses the migration in one line, and that line is the reason. Never a number
that was not measured.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from clustercore.errors import VipError
from clustercore.kinds import Datapath, Delivery, builtin_spec

from . import lab as labmod
from .client import call
from .render import count, ms, number

BATCHED_SIZES = (1000, 10000)
QUICK_SIZES = (100,)


def longest_wait(client: dict) -> float | None:
    """The longest one client, TCP or UDP, waited for one reply in the load's measured window
    (from every connection up to the end: vipctl.loadgen's max_wait_ms)."""
    return client.get("max_wait_ms", client.get("max_rtt_ms"))


def _stats(values):
    from .bench import _stats as stats  # one definition of the medians
    return stats(values)


def _median_of(reports: list[dict], key: str, inner: str | None = None):
    vals = []
    for r in reports:
        v = r.get(key)
        if inner is not None:
            v = (v or {}).get(inner)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals.append(v)
    return _stats(vals)["median"]


def batched_row(n: int, runs: list[dict]) -> dict:
    """One connection count's row from its runs (loaded_migration results)."""
    reports = [r["report"] for r in runs]
    clients = [r["client"] for r in runs if r["client"] and "error" not in r["client"]]
    waits = _stats([longest_wait(c) for c in clients])
    return {
        "connections": n,
        "skipped": None,
        "outcomes": [r.get("outcome") for r in reports],
        "reasons": [r["reason"] for r in reports if r.get("reason")],
        "conn_freeze_ms": {k: _median_of(reports, "conn_freeze_ms", k) for k in ("p50", "p99", "max")},
        # what those percentiles are over, run by run: the flows that had a packet held in
        # their batch's freeze (a few at 0.2-1 message/s a connection), and each run's p99;
        # batch_window_ms (freeze sent -> released, every batch) bounds every connection's
        "conn_freeze_flows": [(r.get("conn_freeze_ms") or {}).get("n") for r in reports],
        "conn_freeze_p99_runs": [(r.get("conn_freeze_ms") or {}).get("p99") for r in reports],
        # every moved connection's frozen time (its batch's: the source's hold to the
        # destination's release; clustercore.batchmigration), median of the runs' p50/p99/max
        "conn_frozen_ms": {k: _median_of(reports, "conn_frozen_ms", k) for k in ("p50", "p99", "max")},
        "conn_frozen_p99_runs": [(r.get("conn_frozen_ms") or {}).get("p99") for r in reports],
        "batch_window_ms": {k: _median_of(reports, "batch_window_ms", k) for k in ("p50", "p99", "max")},
        "opening_window_ms": _median_of(reports, "opening_window_ms"),
        "stop_ms": _median_of(reports, "stop_ms"),
        "total_ms": _median_of(reports, "total_ms"),
        "total_ms_stats": _stats([r.get("total_ms") for r in reports]),
        "batches": _median_of(reports, "batches"),
        "connections_moved": _median_of(reports, "connections_moved"),
        "connections_pinned": max((r.get("connections_pinned") or 0 for r in reports), default=0),
        "lost": max((r["lost"] for r in runs if r["lost"] is not None), default=None),
        "duplicated": max((r["duplicated"] for r in runs if r["duplicated"] is not None), default=None),
        "reported_lost": max((r.get("lost") or 0 for r in reports), default=0),
        "client_retransmissions": max((c.get("retrans_segs", 0) for c in clients), default=None),
        # the longest any client (TCP or UDP) waited for one reply once every connection was
        # up (vipctl.loadgen): median of the runs, and their spread
        "max_reply_ms": waits["median"], "max_reply_ms_stats": waits,
        "per_connection_worst_reply_ms": {k: _stats([(c.get("conn_worst_reply_ms") or {}).get(k) for c in clients])["median"]
                                          for k in ("p50", "p99", "max")} if clients else {},
        "steps_ms": reports[-1].get("steps_ms", {}) if reports else {},
        "split_ms": reports[-1].get("split_ms", {}) if reports else {},  # the nodes' own timing (last run)
    }


def measure_batched(prefix: str, sizes, runs: int, log, keep_logs: str | None = None) -> list[dict]:
    """The batched rows; each size's row is measured, or says why it was not. `keep_logs`:
    a directory the daemons' logs are copied to before the lab goes (for profiling)."""
    from .bench import _next, loaded_migration
    spec = labmod.Lab(prefix, 3, Delivery.SELECTIVE, Datapath.FAST)
    labmod.down(spec, log=lambda *a: None)
    out: list[dict] = []
    tmp = tempfile.mkdtemp(prefix="vipctl-bench-batch-")
    os.chmod(tmp, 0o777)
    refused: str | None = None
    try:
        labmod.up(spec, log=lambda *a: None)
        call("service.add", spec.control_socket, name="echo", node="n1", ports=["tcp:7", "udp:7"],
             exec=builtin_spec("echo"))
        owner = "n1"
        for n in sizes:
            if refused is not None:
                out.append({"connections": n, "skipped": refused})
                continue
            floor = loaded_migration(spec, n, os.path.join(tmp, f"b{n}-floor"), None)["client"]
            rows = []
            for run in range(runs):
                destination = _next(owner)
                try:
                    row = loaded_migration(spec, n, os.path.join(tmp, f"b{n}-{run}"), destination, batched=True)
                except VipError as e:  # refused: the node side does not speak the batch channel
                    refused = f"the gateway refused the batched migration: {e}"
                    log(f"batched rows skipped: {refused}")
                    break
                report, client = row["report"], row["client"]
                if report.get("outcome") == "committed":
                    owner = destination
                rows.append(row)
                pc, fz = report.get("conn_freeze_ms") or {}, report.get("conn_frozen_ms") or {}
                log(f"batched migration with {n} connections: {report.get('outcome')}, per-connection freeze "
                    f"p50/p99/max {number(pc.get('p50'))}/{number(pc.get('p99'))}/{number(pc.get('max'))} ms "
                    f"({count(pc.get('n'))} flows held a packet), every connection's frozen time "
                    f"{number(fz.get('p50'))}/{number(fz.get('p99'))}/{number(fz.get('max'))} ms, "
                    f"{count(report.get('batches'))} batches, total {ms(report.get('total_ms'))}, lost "
                    f"{count(row['lost'])}, longest wait {ms(longest_wait(client))}, retrans "
                    f"{count(client.get('retrans_segs'))}")
            if rows:
                out.append({**batched_row(n, rows), "max_reply_ms_no_migration": longest_wait(floor)})
            elif refused is not None:
                out.append({"connections": n, "skipped": refused})
    finally:
        if keep_logs:
            shutil.copytree(os.path.join(spec.state_dir, "logs"), keep_logs, dirs_exist_ok=True)
        labmod.down(spec, log=lambda *a: None)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- rendering


def _trio(d: dict | None, digits: int = 2) -> str:
    d = d or {}
    return "/".join(number(d.get(k), digits) for k in ("p50", "p99", "max"))


def render_lines(result: dict) -> list[str]:
    """The batched rows for `vipctl bench` (text), beside the whole-service rows."""
    rows = result.get("batched_migrations")
    if not rows:
        return []
    header = (f"{'batched: connections':>20} {'frozen p50/p99/max ms':>22} {'held flows p50/p99/max ms':>26} "
              f"{'longest reply ms':>17} "
              f"{'(unmoved)':>9} {'retrans':>7} {'lost':>5} {'dup':>4} {'batches':>7} {'total ms':>9}  pinned")
    lines = ["", header]
    for x in rows:
        if x.get("skipped"):
            lines.append(f"{x['connections']:>20} skipped: {x['skipped']}")
            continue
        lines.append(f"{x['connections']:>20} {_trio(x.get('conn_frozen_ms')):>22} {_trio(x['conn_freeze_ms']):>26} "
                     f"{number(x.get('max_reply_ms')):>17} "
                     f"{number(x.get('max_reply_ms_no_migration')):>9} {count(x.get('client_retransmissions')):>7} {count(x.get('lost')):>5} "
                     f"{count(x.get('duplicated')):>4} {number(x.get('batches'), 0):>7} {number(x.get('total_ms')):>9}  "
                     f"{count(x.get('connections_pinned'))}")
    return lines


def report_table(r: dict) -> list[str]:
    """The Markdown table of docs/performance.md (scripts/bench-report): whole vs batched
    at the same connection counts."""
    rows = r.get("batched_migrations")
    if not rows:
        return []
    whole = {x["connections"]: x for x in r.get("migrations", [])}
    header = ("| connections | strategy | freeze ms (whole: first held -> last released; batched: every connection's "
              "frozen time p50 / p99 / max [the same over the flows that had a packet held]) | clients' longest wait for one reply ms (TCP or UDP, median of runs) "
              "| the same, same load, nothing moving ms | client retransmissions | lost | dup | batches | total ms |")
    out = ["", header, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        n = x["connections"]
        w = whole.get(n)
        if w is not None:
            out.append(f"| {n} | whole | {number(w.get('freeze_ms'), 1)} | {number(w.get('max_reply_ms'), 1)} | "
                       f"{number(w.get('max_reply_ms_no_migration'), 1)} | {w.get('client_retransmissions')} | {w.get('lost')} | {w.get('duplicated')} | 1 | "
                       f"{number(w.get('total_ms'), 1)} |")
        if x.get("skipped"):
            out.append(f"| {n} | batched | not run: {x['skipped']} | - | - | - | - | - | - | - |")
            continue
        frozen = _trio(x.get("conn_frozen_ms"), 1).replace("/", " / ")
        held = _trio(x["conn_freeze_ms"], 1).replace("/", " / ")
        out.append(f"| {n} | batched | {frozen} [{held}] | "
                   f"{number(x.get('max_reply_ms'), 1)} | {number(x.get('max_reply_ms_no_migration'), 1)} | "
                   f"{x.get('client_retransmissions')} | {x.get('lost')} | "
                   f"{x.get('duplicated')} | {number(x.get('batches'), 0)} | {number(x.get('total_ms'), 1)} |")
    return out


def plot_migrations(result: dict, path: str) -> None:
    """Freeze and the clients' longest wait against connections, whole vs batched; and,
    when the process strategy's rows are there, freeze against image size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    procs = [x for key in ("process_migrations", "process_migrations_copy")
             for x in ((result.get(key) or {}).get("rows") or [])
             if x.get("image_bytes") is not None and x.get("freeze_ms") is not None]
    fig, axes = plt.subplots(1, 2 if procs else 1, figsize=(13 if procs else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    whole = [m for m in result.get("migrations", []) if m.get("freeze_ms") is not None]
    if whole:
        xs = [m["connections"] for m in whole]
        st = [m.get("freeze_ms_stats") or {} for m in whole]
        lo = [max(0.0, m["freeze_ms"] - (s.get("min") or m["freeze_ms"])) for m, s in zip(whole, st)]
        hi = [max(0.0, (s.get("max") or m["freeze_ms"]) - m["freeze_ms"]) for m, s in zip(whole, st)]
        ax.errorbar(xs, [m["freeze_ms"] for m in whole], yerr=[lo, hi], marker="o", capsize=4,
                    label="whole: freeze (first held -> last released; min-max)")
        ax.plot(xs, [m.get("max_reply_ms") or 0 for m in whole], marker="o", linestyle="--",
                label="whole: clients' longest wait for one reply")
    batched = [b for b in result.get("batched_migrations") or [] if not b.get("skipped")]
    if batched:
        xs = [b["connections"] for b in batched]
        # every connection's frozen time; a JSON from before it was measured: the flows
        # that had a packet held
        every = all(b.get("conn_frozen_ms") for b in batched)
        key, what = ("conn_frozen_ms", "every connection's frozen time") if every else \
            ("conn_freeze_ms", "per-connection freeze (flows with a packet held)")
        ax.plot(xs, [(b[key] or {}).get("p99") or 0 for b in batched], marker="s", label=f"batched: {what} p99")
        ax.plot(xs, [(b[key] or {}).get("max") or 0 for b in batched], marker="^", label=f"batched: {what} max")
        ax.plot(xs, [b.get("max_reply_ms") or 0 for b in batched], marker="s", linestyle="--",
                label="batched: clients' longest wait for one reply")
    skipped = [b for b in result.get("batched_migrations") or [] if b.get("skipped")]
    if skipped and not batched:
        ax.text(0.02, 0.02, "batched rows not run (see the JSON's reason)", transform=ax.transAxes, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("established TCP connections moved (under load)")
    ax.set_ylabel("ms")
    m = result["machine"]
    ax.set_title(f"handoff: whole vs batched ({m['cores']} cores, kernel {m['kernel']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if procs:
        ax2 = axes[0][1]
        for lazy in (True, False):
            rows = sorted((x for x in procs if ("lazy" in (x.get("memory") or [])) == lazy),
                          key=lambda x: x["image_bytes"])
            how = "lazy pages" if lazy else "memory copied"
            if rows:
                ax2.plot([x["image_bytes"] / 1e6 for x in rows], [x["freeze_ms"] for x in rows], marker="o",
                         label=f"process, {how}: freeze")
            waits = [x for x in rows if x.get("longest_wait_ms") is not None]
            if waits:
                ax2.plot([x["image_bytes"] / 1e6 for x in waits], [x["longest_wait_ms"] for x in waits],
                         marker="s", linestyle="--", label=f"process, {how}: clients' longest wait")
        ax2.set_xscale("log")
        ax2.set_xlabel("image size MB")
        ax2.set_ylabel("ms")
        ax2.set_title("process strategy: freeze against image size")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
