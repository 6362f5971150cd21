"""The one adapter for nftables on the node: the steady-state verdicts in one lookup.

The node's iptables chain (nodeshim.iptables) is a first-match list: a packet to a service
port walks every rule ahead of its own, so the per-packet cost grew with the number of
services (100 more services ahead of the measured one: 0.46x of plain routing in UDP
packets/s, docs/performance.md). This table answers the ports whose verdict is plain
(clustercore.fastpath.verdict_map: ACCEPT the ports of services this node owns, DROP those
owned elsewhere) with one verdict-map lookup keyed by `meta l4proto . th dport`, before
the list:

    table inet vipcluster_node
      map ports      (proto . port) -> jump a_SERVICE | jump d_SERVICE
      chain pre      prerouting, priority -250 (after raw's notrack, before conntrack and
                     mangle): ip[6] daddr VIP iif != lo  meta l4proto . th dport vmap @ports
      chain a_NAME   counter a_NAME, set fastpath.FAST_MARK in the mark, accept
      chain d_NAME   counter d_NAME, drop

A drop here is final. An accept is not: iptables' mangle chain (another base chain on the
same hook) still sees the packet, so the mark tells its jump rule to let it by
(nodeshim.iptables: `-m mark ! --mark FAST_MARK/FAST_MARK`). Everything the map does not
hold (a service in migration, a drain's conditional rules, ICMP, ports of no service,
non-first fragments: `th dport` does not match them) goes on to the list, which still
holds every rule, so the map only ever repeats a verdict the list would give
(fastpath.evaluate_split; the agent installs the entries the old and new maps agree on,
then the list, then the new map: fastpath.stable_map).

Counters: named counter objects, one per (service, verdict), kept across every update
(an update flushes rules and map elements, never counters), so `read_counters` is
cumulative since the table was made; the agent adds it to the list's counters.

Why priority -250: a drop there costs no conntrack entry on a node that keeps conntrack
on (`conntrack = true`); an accepted packet goes on to conntrack as before.
"""

from __future__ import annotations

import json
import subprocess
from typing import Iterable, Mapping

from clustercore.errors import KernelError
from clustercore.fastpath import FAST_MARK
from clustercore.ownership import Verdict
from clustercore.packet import PROTO_NAMES

TABLE = "vipcluster_node"
PRIORITY = -250


def _counter(verdict: Verdict, service: str) -> str:
    # nft names: a letter first, then letters, digits, _ . - / (service names fit)
    return ("a_" if verdict == Verdict.ACCEPT else "d_") + service


def render(vips: Iterable[str], vmap: Mapping[tuple[int, int], tuple[Verdict, str]]) -> str:
    """The nft script that makes the table hold `vmap` (fastpath.verdict_map) for these
    VIPs, in one transaction. Pure."""
    t = f"inet {TABLE}"
    targets = sorted({_counter(v, s) for v, s in vmap.values()})
    lines = [f"add table {t}", f"flush table {t}",
             f"add map {t} ports {{ type inet_proto . inet_service : verdict; }}", f"flush map {t} ports",
             f"add chain {t} pre {{ type filter hook prerouting priority {PRIORITY}; policy accept; }}"]
    for name in targets:
        tail = f"meta mark set meta mark | {FAST_MARK:#x} accept" if name.startswith("a_") else "drop"
        lines += [f"add counter {t} {name}", f"add chain {t} {name}",
                  f"add rule {t} {name} counter name {name} {tail}"]
    if vmap:
        elements = ", ".join(f"{PROTO_NAMES[proto]} . {port} : jump {_counter(*vmap[(proto, port)])}"
                             for proto, port in sorted(vmap))
        lines.append(f"add element {t} ports {{ {elements} }}")
    for vip in sorted(vips):
        family = "ip6" if ":" in vip else "ip"
        lines.append(f'add rule {t} pre {family} daddr {vip} iif != "lo" meta l4proto . th dport vmap @ports')
    return "\n".join(lines) + "\n"


def install(vips: Iterable[str], vmap: Mapping[tuple[int, int], tuple[Verdict, str]]) -> None:
    """Make the table hold `vmap` (created if missing; counters kept)."""
    script = render(vips, vmap)
    proc = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True)
    if proc.returncode != 0:
        raise KernelError("nft -f (node verdict map)", None, proc.stderr.decode(errors="replace").strip())


def remove() -> None:
    """Delete the table (idempotent)."""
    subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True)


def exists() -> bool:
    return subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True).returncode == 0


def read_counters() -> dict[str, dict[str, int]]:
    """{service: {"accepted": n, "dropped": n}}, packets since the table was made ({} when
    there is none)."""
    proc = subprocess.run(["nft", "-j", "list", "counters", "table", "inet", TABLE], capture_output=True)
    if proc.returncode != 0:
        return {}
    return parse_counters(proc.stdout.decode(errors="replace"))


def parse_counters(text: str) -> dict[str, dict[str, int]]:
    """`nft -j list counters` output -> {service: {"accepted", "dropped"}}; total (anything
    unexpected is skipped)."""
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        return {}
    out: dict[str, dict[str, int]] = {}
    for item in items if isinstance(items, list) else []:
        c = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(c, dict) or c.get("table") != TABLE:
            continue
        name, packets = c.get("name"), c.get("packets")
        if not isinstance(name, str) or not isinstance(packets, int) or name[:2] not in ("a_", "d_"):
            continue
        row = out.setdefault(name[2:], {"accepted": 0, "dropped": 0})
        row["accepted" if name[:2] == "a_" else "dropped"] += packets
    return out
