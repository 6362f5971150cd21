"""Human output: every table and report vipctl prints without `--json`.

Each renderer takes the same dict `--json` prints and returns text; the caller echoes it.
Numbers are rounded for reading here only (`--json` keeps the full values), and a value
nobody measured (None) prints as "n/a", never as "None".
"""

from __future__ import annotations

NA = "n/a"


def number(value, digits: int = 2) -> str:
    """A measured value with `digits` decimals; "n/a" when it was not measured."""
    if value is None:
        return NA
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def ms(value) -> str:
    """'193.39 ms' (or 'n/a')."""
    text = number(value)
    return text if text == NA else f"{text} ms"


def count(value) -> str:
    """A count, or 'n/a' when it is unknown (e.g. a node did not report)."""
    return NA if value is None else str(value)


# ---------------------------------------------------------------- cluster


def render_status(st: dict) -> str:
    lines = [f"VIP {' '.join(st.get('vips') or [st['vip']])}",
             f"{'NODE':<8} {'STATE':<6} {'ADDRESS':<15} {'MAC':<18} {'ANCHOR':<7} PROCESS STRATEGY"]
    for n in st["nodes"]:
        state = "fenced" if n.get("fenced") else n["state"]  # dead: out of delivery
        lines.append(f"{n['name']:<8} {state:<6} {n['address']:<15} {n['mac']:<18} "
                     f"{'*' if n['anchor'] else '':<7} {render_process_strategy(n.get('process_strategy'))}")
    lines.append("")
    lines.append(f"{'SERVICE':<12} {'OWNER':<8} {'PORTS':<20} {'HEALTH':<10} {'NODE':<6} {'ACCEPTED':>9} "
                 f"{'DROPPED':>9} {'HELD':>6}")
    for s in st["services"]:
        first = True
        rows = sorted(s["counters"].items()) or [("-", {})]
        for node_name, c in rows:
            lead = (f"{s['name']:<12} {s['owner']:<8} {','.join(s['ports']):<20} {s.get('health', '-'):<10}"
                    if first else " " * 53)
            lines.append(f"{lead} {node_name:<6} {c.get('accepted', 0):>9} {c.get('dropped', 0):>9} {c.get('held', 0):>6}")
            first = False
    for f in st.get("failovers", []):
        lines.append(f"failover: {f['service']} {f['from']} -> {f.get('to') or '-'}: {f['outcome']} "
                     f"({f['reason']}); connections {f['connections']}")
    return "\n".join(lines)


def render_process_strategy(ps: dict | None) -> str:
    """'yes (criu 4.2.1)' / 'no: criu not installed (...)' / '-' (node down)."""
    if not ps:
        return "-"
    return f"yes ({ps.get('reason', '')})" if ps.get("available") else f"no: {ps.get('reason', '')}"


def render_services(rows: list[dict]) -> str:
    lines = [f"{'SERVICE':<12} {'OWNER':<8} {'PORTS':<24} {'MIGRATE':<8} {'SOCKETS':<10} {'HEALTH':<10} EXEC"]
    for s in rows:
        lines.append(f"{s['name']:<12} {s['owner']:<8} {','.join(s['ports']):<24} "
                     f"{s.get('migrate', 'auto'):<8} {s.get('sockets', 'activation'):<10} "
                     f"{s.get('health', '-'):<10} {s['exec']}")
    return "\n".join(lines)


def render_service_added(r: dict) -> str:
    return f"service {r['name']} added on {r['owner']} ({', '.join(r['ports'])})"


def render_service_removed(r: dict) -> str:
    return f"service {r['name']} removed from {r['owner']}"


# ---------------------------------------------------------------- migrations


def render_graceful(r: dict) -> str:
    """A graceful drain's report (gateway.graceful): connections per protocol."""
    if r.get("outcome") == "refused":
        return f"graceful drain of {r['service']}: {r['from']} -> {r['to']}: refused ({r.get('reason', '')})"

    def side(c: dict) -> str:
        return f"{c['at_start']} at start, {c['finished']} finished, {c['cut']} cut at the timeout"
    return "\n".join([
        f"graceful drain of {r['service']}: {r['from']} -> {r['to']}: {r['outcome']}, drain {r['drain']}"
        + (f" ({r['reason']})" if r.get("reason") else ""),
        f"  tcp connections left on {r['from']}: {side(r['tcp'])}",
        f"  udp flows left on {r['from']}: {side(r['udp'])}",
        f"  total {ms(r.get('total_ms'))} (timeout {r.get('timeout_s')} s); new connections went to {r['to']} at the "
        f"epoch flip, new UDP flows {ms(r.get('udp_gap_ms'))} later"])


def _spread(d: dict | None) -> str:
    d = d or {}
    return "/".join(number(d.get(k), 2) for k in ("p50", "p99", "max")) + " ms"


def render_batched(r: dict) -> str:
    """A batched handoff's report (gateway.batched): per-connection freezes, batches."""
    lines = [f"migration of {r['service']}: {r['from']} -> {r['to']} (batched): {r.get('outcome') or NA}"
             + (f" ({r['reason']})" if r.get("reason") else ""),
             f"  connections moved {count(r.get('connections_moved'))}, pinned on {r['from']} "
             f"{count(r.get('connections_pinned'))}" + (" (split: both nodes serve until they close)"
                                                         if r.get("split") else "")
             + f"; {count(r.get('batches'))} batches (the opening included)",
             f"  every connection frozen p50/p99/max {_spread(r.get('conn_frozen_ms'))}; over the "
             f"{count((r.get('conn_freeze_ms') or {}).get('n'))} that had a packet held "
             f"{_spread(r.get('conn_freeze_ms'))}; batch window p50/p99/max {_spread(r.get('batch_window_ms'))}",
             f"  opening {ms(r.get('opening_window_ms'))}, stop window {ms(r.get('stop_ms'))} (listeners handed "
             f"back to the destination serving), whole migration {ms(r.get('total_ms'))}",
             f"  held {count(r.get('held', 0))}, released {count(r.get('released', 0))}, duplicates suppressed "
             f"{count(r.get('duplicates_suppressed', 0))}, lost {count(r.get('lost'))}"]
    if r.get("steps_ms"):
        lines.append("  steps (summed over batches): " + ", ".join(f"{step} {ms(t)}" for step, t in r["steps_ms"].items()))
    return "\n".join(lines)


def render_report(r: dict) -> str:
    if r.get("graceful"):
        return render_graceful(r)
    if r.get("strategy") == "batched" and "connections_moved" in r:
        return render_batched(r)
    lines = [f"migration of {r['service']}: {r['from']} -> {r['to']}: {r.get('outcome') or NA}"
             + (f" ({r['reason']})" if r.get("reason") else ""),
             f"  connections moved: {r.get('tcp_established', 0)} tcp established, "
             f"{r.get('tcp_listening', 0)} tcp listening, {r.get('udp_sockets', 0)} udp sockets; "
             f"{r.get('bytes_moved', 0)} bytes moved (queued data; with the process strategy the whole image)",
             f"  freeze {ms(r.get('freeze_ms'))}, total {ms(r.get('total_ms'))}; held {count(r.get('held', 0))}, "
             f"released {count(r.get('released', 0))}, duplicates suppressed {count(r.get('duplicates_suppressed', 0))}, "
             f"lost {count(r.get('lost'))}"]
    if r.get("stop_ms") is not None:
        lines.append(f"  service stopped {ms(r['stop_ms'])} (source stopped to destination serving; "
                     "freeze is first held to last released packet)")
    if r.get("start_attempts", 0) > 1 or r.get("service_down"):
        lines.append(f"  new instance: {r.get('start_attempts')} start(s)"
                     + (f"; SERVICE DOWN on {r['to']} ({r.get('connections_closed', 0)} moved connections closed)"
                        if r.get("service_down") else "; the moved connections survived the failed start(s)"))
    if r.get("steps_ms"):
        lines.append("  steps: " + ", ".join(f"{step} {ms(t)}" for step, t in r["steps_ms"].items()))
    return "\n".join(lines)


def render_drain(r: dict) -> str:
    if not r["migrations"]:
        return f"node {r['node']} runs no service"
    return "\n".join(render_report(rep) for rep in r["migrations"])


def progress_line(elapsed_ms: float, m: dict) -> str:
    """One progress message of a running migration."""
    return f"  [{elapsed_ms:8.1f} ms] {m.get('step')}: {m.get('detail')}"


def render_client_accounting(r: dict) -> str:
    """What the load generator's clients saw (vipctl.loadgen's JSON)."""
    if "error" in r:
        return r["error"]
    return "\n".join([
        f"  TCP: {r['tcp_sent']} messages on {r['tcp_conns']} connections, {r['tcp_ok']} echoed once "
        f"and in order, {r['tcp_missing']} missing, {r['tcp_bad']} wrong, {r['resets']} resets",
        f"  UDP: {r['udp_sent']} datagrams, {r['udp_answered_once']} answered once, "
        f"{r['udp_missing']} unanswered, {r['udp_duplicated']} answered twice",
        f"  kv: {r['kv_ok']} reads correct, {r['kv_bad']} wrong; "
        f"client TCP retransmissions: {r['retrans_segs']}; slowest reply {ms(r['max_rtt_ms'])}",
    ])


# ---------------------------------------------------------------- the lab


def render_lab_status(s: dict) -> str:
    health = " (healthy)" if s["healthy"] else (" (NOT healthy)" if s["up"] else "")
    lines = [f"lab '{s['prefix']}': {'up' if s['up'] else 'down'}{health}"]
    if s["up"]:
        lines.append(f"namespaces: {', '.join(s['namespaces'])}")
        for name, d in sorted(s["daemons"].items()):
            lines.append(f"  {name:<8} pid {d['pid']:<8} {'alive' if d['alive'] else 'DEAD'}")
        for name, m in sorted((s.get("metrics") or {}).items()):
            lines.append(f"  metrics of {name:<8} {m['url']} (in {m['namespace']})")
        for g in s.get("gateways", []):  # two gateways: who holds the next hops
            lines.append(f"gateway {g['name']}: {g['vrrp']}{'' if g['alive'] else ' (daemon DEAD)'}")
        if "error" in s["cluster"]:
            lines.append(f"cluster: {s['cluster']['error']}")
        else:
            lines.append(render_status(s["cluster"]))
    return "\n".join(lines)


# ---------------------------------------------------------------- bench


def _cell(value, width: int, digits: int) -> str:
    return f"{number(value, digits):>{width}}"


def render_bench(result: dict) -> str:
    b, m = result["baseline"], result["machine"]
    lines = [f"machine: {m['cores']} cores, kernel {m['kernel']}, {m['cpu_model']}",
             f"{'mode':<16} {'UDP pps':>10} {'ratio':>6} {'TCP Mbit/s':>11} {'ratio':>6}  copies/packet",
             f"{'baseline':<16} {_cell(b['pps'], 10, 0)} {'1.00':>6} {_cell(b['tcp_mbps'], 11, 0)} {'1.00':>6}  1"]
    for name, x in result["modes"].items():
        cp = x["copies_per_packet"]
        lines.append(f"{name:<16} {_cell(x['pps'], 10, 0)} {_cell(x['pps_ratio'], 6, 2)} "
                     f"{_cell(x['tcp_mbps'], 11, 0)} {_cell(x['tcp_ratio'], 6, 2)}  "
                     f"{cp['steady']} (migrating {cp['migrating']})")
    variants = result.get("datapath_variants") or {}
    if variants:
        lines.append("")
        lines.append(f"{'data path variant':<16} {'UDP pps':>10} {'ratio':>6} {'TCP Mbit/s':>11} {'ratio':>6}  node rules")
        for name, x in variants.items():
            lines.append(f"{name:<16} {_cell(x['pps'], 10, 0)} {_cell(x['pps_ratio'], 6, 2)} "
                         f"{_cell(x['tcp_mbps'], 11, 0)} {_cell(x['tcp_ratio'], 6, 2)}  {count(x.get('node_rules'))}"
                         + (f"  ({x['problem']})" if x.get("problem") else ""))
    lines.append("")
    lines.append(f"{'connections':>11} {'freeze ms':>10} {'stop ms':>9} {'queue wait':>10} {'total ms':>9} {'lost':>5} "
                 f"{'dup':>4} {'retrans':>7} {'conn p50/p99/max worst reply ms':>32}  steps (ms)")
    for x in result["migrations"]:
        steps = ", ".join(f"{k} {number(v)}" for k, v in x["steps_ms"].items())
        pc = x.get("per_connection_worst_reply_ms") or {}
        pcs = "/".join(number(pc.get(k), 1) for k in ("p50", "p99", "max"))
        lines.append(f"{x['connections']:>11} {_cell(x['freeze_ms'], 10, 2)} {_cell(x.get('stop_ms'), 9, 2)} "
                     f"{_cell(x.get('queue_wait_ms'), 10, 2)} {_cell(x['total_ms'], 9, 2)} "
                     f"{count(x['lost']):>5} {count(x['duplicated']):>4} {x['client_retransmissions']:>7} "
                     f"{pcs:>32}  {steps}")
    from .benchbatch import render_lines as batched_lines
    lines.extend(batched_lines(result))
    for key in ("process_migrations", "process_migrations_copy"):
        lines.extend(_process_lines(result.get(key), key.endswith("_copy")))
    hold = result.get("big_hold")
    if hold:
        lines.append("")
        lines.append(f"large hold: {count(hold.get('held_total'))} of {count(hold['datagrams'])} datagrams held over "
                     f"{count(hold.get('queues_used'))} queues, released {count(hold.get('released'))}, "
                     f"lost {count(hold.get('reported_lost'))}, answered {count(hold.get('answered'))} "
                     f"(missing {count(hold.get('missing'))}, twice {count(hold.get('duplicated'))}, "
                     f"out of order {count(hold.get('out_of_order'))}); freeze {ms(hold.get('freeze_ms'))}, "
                     f"stop {ms(hold.get('stop_ms'))}")
    rss = result["rss_mb"]
    lines.append("")
    lines.append(f"RSS: gateway {number(rss.get('gateway'), 1)} MB, shim after moving "
                 f"{count(rss.get('shim_connections'))} connections {number(rss.get('shim'), 1)} MB; "
                 f"{number(result['elapsed_s'], 1)} s in all")
    return "\n".join(lines)


def _process_lines(proc, copy: bool) -> list[str]:
    """The process strategy's rows (copy: the same programs, lazy pages turned off)."""
    lines: list[str] = []
    if proc:
        lines.append("")
        if proc.get("skipped"):
            lines.append(f"process strategy (real programs): skipped: {proc['skipped']}")
        else:
            lines.append(f"{'process (copy)' if copy else 'process strategy':<24} {'freeze ms':>10} {'stop ms':>9} {'total ms':>9} {'image MB':>9} {'lost':>5} "
                         f"{'dup':>4} {'retrans':>7} {'pages ms':>9}  outcomes")
        for x in proc.get("rows", []):
            what = (f"nginx {x['connections']} conns" if x["program"] == "nginx" else f"redis {x['data_mb']} MB")
            what += f" {'/'.join(x.get('memory') or [])}"
            image = x["image_bytes"] / 1e6 if x.get("image_bytes") is not None else None
            lines.append(f"{what:<24} {_cell(x['freeze_ms'], 10, 2)} {_cell(x.get('stop_ms'), 9, 2)} "
                         f"{_cell(x['total_ms'], 9, 2)} {_cell(image, 9, 1)} "
                         f"{count(x['lost']):>5} {count(x['duplicated']):>4} {count(x['client_retransmissions']):>7} {_cell(x.get('pages_after_freeze_ms'), 9, 0)}  "
                         + ", ".join(map(str, x["outcomes"])) + "".join(f" ({r})" for r in x.get("reasons", [])[:1]))
    return lines


# ---------------------------------------------------------------- replay


def render_replay(result: dict) -> str:
    lines = [f"replay of {result['capture']} ({result['format']}), mode {result['mode']}: "
             f"{'OK' if result.get('ok') else 'FAILED'}",
             f"  {result['packets']} frames: {result['vip_packets']} to the VIP, {result['skipped']} skipped "
             f"({', '.join(f'{k} {v}' for k, v in result['skipped_reasons'].items()) or 'none'})"]
    if result.get("accepted_once") is not None:
        lines.append(f"  accepted once {result['accepted_once']}, lost {result['lost']}, duplicated "
                     f"{result['duplicated']}, silenced {count(result.get('silenced'))}; per node "
                     + ", ".join(f"{n} {c}" for n, c in result.get("per_node", {}).items()))
    if result.get("evidence"):
        lines.append("  evidence: " + ", ".join(f"{k} {v}" for k, v in result["evidence"].items()))
    lines.append(f"  sessions {result['sessions_total']} ({result['tcp_sessions']} tcp, "
                 f"{result['udp_exchanges']} udp, {result['sessions_incomplete']} incomplete)"
                 + (f", matched {result['sessions_matched']}" if result["sessions_matched"] is not None else ""))
    for m in result["migrations"]:
        lines.append(f"  migration of {m.get('service')} -> {m.get('to')} at frame {m.get('at')}: "
                     f"{m.get('outcome') or NA}" + (f" ({m['reason']})" if m.get("reason") else "")
                     + (f"; held {count(m.get('held'))}, released {count(m.get('released'))}, duplicates suppressed "
                        f"{count(m.get('duplicates_suppressed'))}" if m.get("outcome") != "refused" else ""))
    for note in result.get("limitations", []):
        lines.append(f"  note: {note}")
    for c in result.get("expectations", []):
        if not c["ok"]:
            lines.append(f"  sidecar: {c['field']} should be {c['want']}, got {c['got']}")
    for m in result["mismatches"][:5]:
        at = f" at frame {m['packet']}" if m.get("packet") is not None else ""
        lines.append(f"  mismatch{at}: {m.get('reason')}")
    return "\n".join(lines)
