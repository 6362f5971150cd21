"""Graceful drain, the gateway's side (clustercore.drain says how the nodes decide).

One service, from its owner (source) to `dest`, without moving any state:

1. prepare   dest: start an instance, forget stale conntrack entries of the ports
             (selective delivery: both nodes get the service's packets until the end)
2. source    source: accept only flows its conntrack knows (new ones are dropped here
             from now on); it answers how many TCP connections and which UDP flows it keeps
3. dest      dest: accept new TCP connections (SYN), its own flows, and every UDP flow but
             the source's
4. switch    the registry owner becomes dest; push the table
5. wait      ask the source every DRAIN_POLL_S how many of its flows are still live, until
             none is or the timeout passes
6. end       remove both roles; the source stops its old instance (whatever is left is cut)

A SYN or a new UDP flow's datagram that arrives between steps 2 and 3 (two requests, two
rule changes and a conntrack dump: `switch_gap_ms` in the report) is dropped on both
nodes: the client retransmits the SYN (1 s later); the datagram is lost. A failure before
step 4 undoes steps 1-3.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from clustercore import drain as d
from clustercore import messages as msgs
from clustercore.errors import LocalControlError, VipError
from clustercore.kinds import Delivery, ServiceKind, service_kind

log = logging.getLogger("vipcluster.graceful")

DRAIN_POLL_S = 0.5
STEP_TIMEOUT_S = 15.0


async def _ask(gw, node: str, message: msgs.Message):
    session = gw.agents.get(node)
    if session is None:
        raise LocalControlError(f"node {node} is down")
    return await session.rpc.request(message, timeout=STEP_TIMEOUT_S)


async def migrate(gw, name: str, dest: str, timeout: float | None, progress=None) -> dict:
    say = progress or (lambda step, detail: None)
    limit = d.check_timeout(timeout)
    service = gw.table.get(name)
    if service is None:
        raise LocalControlError(f"unknown service '{name}'")
    if gw.config.node(dest) is None:
        raise LocalControlError(f"unknown node '{dest}'")
    if service_kind(service.exec_spec) is ServiceKind.EXTERNAL:
        raise LocalControlError(f"service '{name}' is external (its process is not ours): it cannot be drained")
    source = service.owner
    nodes_up = {n.name: n.name in gw.agents for n in gw.config.nodes}
    gw.controller.book.begin(service=name, owner=source, dest=dest, nodes=nodes_up)
    try:
        gw.failover.check_destination(dest)
        return await _drain(gw, service, dest, limit, say)
    finally:
        gw.controller.book.finish(name)
        gw.delivery_override.pop(name, None)


async def _undo(gw, name: str, source: str, dest: str, say, error: Exception) -> None:
    """Before the owner switch: both roles go, the destination's instance stops, the source
    is the owner as before; the request fails with the reason."""
    say("undo", f"{error}: {name} stays on {source}")
    for node, message in ((source, msgs.DrainEnd(service=name)), (dest, msgs.DrainEnd(service=name)),
                          (dest, msgs.ServiceStop(name=name))):
        try:
            await _ask(gw, node, message)
        except VipError as e:
            log.warning("graceful drain of %s: undoing on %s: %s", name, node, e)
    gw.delivery_override.pop(name, None)
    gw.apply_delivery()
    raise LocalControlError(f"graceful drain of '{name}' to {dest} refused: {error}")


async def _drain(gw, service, dest: str, limit: float, say) -> dict:
    name, source = service.name, service.owner
    started = time.monotonic()
    report = {"service": name, "from": source, "to": dest, "graceful": True, "timeout_s": limit}
    say("prepare", f"starting {name} on {dest}")
    await _ask(gw, dest, msgs.DrainPrepare(service=dataclasses.replace(service, owner=dest)))
    if gw.config.delivery == Delivery.SELECTIVE:
        gw.delivery_override[name] = (source, dest)
        gw.apply_delivery()
    try:
        gap_from = time.monotonic()  # from here until the destination's role, new flows are dropped
        kept = await _ask(gw, source, msgs.DrainSource(service=name))
    except VipError as e:
        await _undo(gw, name, source, dest, say, e)
    tcp0, udp_flows = int(kept.get("tcp", 0)), list(kept.get("udp_flows", []))
    problems: list[str] = []
    split = {"source": kept.get("timing_ms", {})}
    try:
        took = await _ask(gw, dest, msgs.DrainDest(service=name, udp_flows=tuple(udp_flows)))
        split["dest"] = took.get("timing_ms", {})
    except VipError as e:
        problems.append(f"destination role on {dest}: {e}")
    gap_ms = round((time.monotonic() - gap_from) * 1000, 2)
    # the owner switch after both roles (the roles decide the packets, not the table), so
    # the registry's write is not in the gap; a failure here leaves the drain to the end,
    # with the registry still naming the source
    try:
        async with gw._lock:
            gw.registry.set_owner(name, dest)  # RegistryError: nothing switched, undone
            gw.table.set_owner(name, dest)
    except VipError as e:
        await _undo(gw, name, source, dest, say, e)
    gw.apply_delivery()
    await gw.push_table()
    gw.log_event("drain_start", {"service": name, "from": source, "to": dest, "tcp": tcp0, "udp": len(udp_flows)})
    say("draining", f"new flows go to {dest}; {tcp0} TCP connections and {len(udp_flows)} UDP flows stay "
                    f"on {source} (at most {limit:g}s)")
    left_tcp, left_udp = tcp0, len(udp_flows)
    deadline = time.monotonic() + limit
    last_said = None
    while True:
        try:
            st = await _ask(gw, source, msgs.DrainStatus(service=name))
            left_tcp, left_udp = int(st.get("tcp_live", 0)), int(st.get("udp_live", 0))
        except VipError as e:
            problems.append(f"source {source} lost during the drain ({e}): its connections are lost")
            break
        if (left_tcp, left_udp) != last_said:
            say("waiting", f"{left_tcp} TCP connections and {left_udp} UDP flows still on {source}")
            last_said = (left_tcp, left_udp)
        if left_tcp == 0 and left_udp == 0:
            break
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(DRAIN_POLL_S)
    timed_out = left_tcp > 0 or left_udp > 0
    for node, message in ((source, msgs.DrainEnd(service=name, stop=True)), (dest, msgs.DrainEnd(service=name))):
        try:
            await _ask(gw, node, message)
        except VipError as e:
            problems.append(f"ending the drain on {node}: {e}")
    gw.delivery_override.pop(name, None)
    gw.apply_delivery()
    await gw.push_table()
    report.update({
        "outcome": "committed",
        "drain": "timeout" if timed_out else "complete",
        "tcp": d.report_counts(tcp0, left_tcp),
        "udp": d.report_counts(len(udp_flows), left_udp),
        "total_ms": round((time.monotonic() - started) * 1000, 2),
        # how long new flows found no node (a SYN retransmitted, a new flow's datagram lost)
        "switch_gap_ms": gap_ms,
        "switch_split_ms": split,
        "reason": "; ".join(problems) or (f"timeout after {limit:g}s: what was left was cut" if timed_out else ""),
    })
    gw.log_event("graceful_migration", report)
    log.info("graceful drain of %s %s -> %s: %s", name, source, dest, report)
    say("done", f"{name} now on {dest}: TCP {report['tcp']}, UDP {report['udp']}")
    return report


async def drain_node(gw, node: str, to: str | None, timeout: float | None, progress=None) -> dict:
    """Every service of `node`, drained gracefully at the same time (spread over the other
    nodes that are up and fit, or all to `to`)."""
    if gw.config.node(node) is None:
        raise LocalControlError(f"unknown node '{node}'")
    unfit = gw.failover.unfit_nodes()
    targets = [n.name for n in gw.config.nodes if n.name != node and n.name in gw.agents and n.name not in unfit]
    if to is not None:
        if gw.config.node(to) is None:
            raise LocalControlError(f"unknown node '{to}'")
        if to == node:
            raise LocalControlError("cannot drain a node into itself")
        targets = [to]
    if not targets:
        raise LocalControlError(f"no other node is up (with passing checks) to take the services of {node}")
    d.check_timeout(timeout)
    owned = [s for s in gw.table if s.owner == node]

    async def one(i, s):
        dest = targets[i % len(targets)]
        try:
            return await migrate(gw, s.name, dest, timeout, progress)
        except VipError as e:
            return {"service": s.name, "from": node, "to": dest, "graceful": True, "outcome": "refused",
                    "reason": str(e)}
    reports = await asyncio.gather(*(one(i, s) for i, s in enumerate(owned)))
    return {"node": node, "graceful": True, "migrations": list(reports)}
