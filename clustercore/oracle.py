"""The one oracle every test layer shares: each packet for the VIP was accepted by
exactly one node; none lost; none twice.

Two forms of evidence, one verdict:
- per packet (pure model, pcap replay): which nodes accepted packet i;
- per service counts (lab, where the kernel does not tell us packet identities):
  how many packets the clients sent vs how many each node's shim accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass
class OracleReport:
    packets: int = 0
    accepted_once: int = 0
    lost: int = 0
    duplicated: int = 0
    per_node: dict[str, int] = field(default_factory=dict)
    mismatches: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and not self.mismatches

    def to_dict(self) -> dict:
        return {"packets": self.packets, "accepted_once": self.accepted_once, "lost": self.lost,
                "duplicated": self.duplicated, "per_node": dict(sorted(self.per_node.items())),
                "mismatches": self.mismatches[:10], "ok": self.ok}

    def explain(self) -> str:
        return (f"{self.packets} packets: {self.accepted_once} accepted once, {self.lost} lost, "
                f"{self.duplicated} duplicated; first mismatches: {self.mismatches[:5]}")


def check_packets(packet_ids: Iterable[object], accepted_by: Mapping[object, list[str]],
                  expected_owner: Mapping[object, str] | None = None, max_mismatches: int = 50) -> OracleReport:
    """Per-packet evidence: `accepted_by[i]` lists the nodes that accepted packet i.

    `expected_owner[i]`, when given, also checks *which* node accepted it.
    """
    r = OracleReport()
    for pid in packet_ids:
        r.packets += 1
        nodes = accepted_by.get(pid, [])
        for n in nodes:
            r.per_node[n] = r.per_node.get(n, 0) + 1
        if len(nodes) == 1:
            r.accepted_once += 1
            if expected_owner is not None and pid in expected_owner and expected_owner[pid] != nodes[0]:
                if len(r.mismatches) < max_mismatches:
                    r.mismatches.append({"packet": pid, "reason": f"accepted by {nodes[0]}, expected {expected_owner[pid]}"})
        elif not nodes:
            r.lost += 1
            if len(r.mismatches) < max_mismatches:
                r.mismatches.append({"packet": pid, "reason": "accepted by no node (lost)"})
        else:
            r.duplicated += 1
            if len(r.mismatches) < max_mismatches:
                r.mismatches.append({"packet": pid, "reason": f"accepted by {len(nodes)} nodes: {sorted(nodes)}"})
    return r


def check_counts(sent: int, accepted_per_node: Mapping[str, int], owner: str | None = None) -> OracleReport:
    """Count evidence from the lab: `sent` packets, `accepted_per_node` from the shims.

    Without identities, the sum tells lost (sum < sent) or duplicated (sum > sent);
    with `owner`, any acceptance by another node is a mismatch.
    """
    r = OracleReport(packets=sent, per_node=dict(accepted_per_node))
    total = sum(accepted_per_node.values())
    r.lost = max(0, sent - total)
    r.duplicated = max(0, total - sent)
    r.accepted_once = min(sent, total)
    if owner is not None:
        for node, n in accepted_per_node.items():
            if node != owner and n:
                r.mismatches.append({"node": node, "reason": f"non-owner accepted {n} packets"})
    return r


def check_order(deliveries: Iterable[tuple[object, str]], flow_of: Mapping[object, object],
                position: Mapping[object, int], max_reports: int = 50) -> list[dict]:
    """Per-flow order (pure model only, where one clock orders every node's deliveries).

    `deliveries` lists (packet id, node) in the order the cluster handed packets to
    sockets; `position[id]` is the packet's place in the gateway's send order. A packet
    delivered after a later packet of its own flow is reported. Reordering is not loss:
    TCP repairs it and UDP allows it, so callers report it next to the oracle's verdict.
    """
    last: dict[object, tuple[int, object]] = {}
    out: list[dict] = []
    for pid, node in deliveries:
        flow = flow_of.get(pid)
        if flow is None:
            continue
        pos = position[pid]
        prev = last.get(flow)
        if prev is not None and pos < prev[0]:
            if len(out) < max_reports:
                out.append({"packet": pid, "reason": f"delivered by {node} after packet {prev[1]} "
                                                     "of the same flow (reordered)"})
            continue
        last[flow] = (pos, pid)
    return out
