"""Graceful drain, the gateway's side (clustercore.drain says how the nodes decide).

One service, from its owner (source) to `dest`, without moving any state:

1. prepare   dest: start an instance, forget stale conntrack entries of the ports
             (selective delivery: both nodes get the service's packets until the end)
2. source    source: accept the flows its conntrack knows, and any packet with the old
             epoch tag (so far: all of them)
3. dest      dest: accept its own flows and SYNs with the new tag (so far: none); UDP closed
4. flip      owner and epoch in the registry, then one nft transaction: from here new
             connections carry the new tag: the destination's, exactly
5. flows     source: its live TCP connections and UDP flows (the ones the drain leaves it)
6. udp       dest: new UDP flows with the new tag, except the source's; push the table
7. wait      ask the source every DRAIN_POLL_S how many of its flows are still live, until
             none is or the timeout passes
8. end       remove both roles; the source stops its old instance (whatever is left is cut)

New TCP connections change hands at the flip with no gap and no overlap. A new UDP flow's
datagrams between steps 4 and 6 (a request with a conntrack dump and a rule change:
`udp_gap_ms` in the report) are dropped on both nodes. A failure before the flip undoes
steps 1-3.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from clustercore import drain as d
from clustercore import messages as msgs
from clustercore.errors import LocalControlError, VipError
from clustercore.kinds import Delivery

from . import nft
from .controller import drain_targets, movable

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
    service = movable(gw, name, dest, "drained")
    source = service.owner
    nodes_up = {n.name: n.name in gw.agents for n in gw.config.nodes}
    gw.controller.book.begin(service=name, owner=source, dest=dest, nodes=nodes_up)
    try:
        gw.failover.check_destination(dest)
        # two gateways: only while this one holds the driver lease (gateway.ha)
        async with (gw.ha.driving(name) if getattr(gw, "ha", None) is not None else contextlib.nullcontext()):
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
    old_epoch = gw.epochs.get(name, 1)
    old_tag, new_tag = nft.epoch_mac(old_epoch), nft.epoch_mac(old_epoch + 1)
    split: dict = {}
    try:
        split["source"] = (await _ask(gw, source, msgs.DrainSource(service=name, epoch=old_tag))).get("timing_ms", {})
        split["dest"] = (await _ask(gw, dest, msgs.DrainDest(service=name, epoch=new_tag, udp_open=False))).get(
            "timing_ms", {})
        async with gw._lock:
            # durable first (a failed write flips nothing: undone), then the one nft
            # transaction from which new connections carry the new tag: the destination's
            gw.registry.set_owner(name, dest)
            try:
                gw.registry.set_epoch(name, old_epoch + 1)
                gw.epochs[name] = old_epoch + 1
                gw.apply_delivery()
            except VipError:
                gw.epochs[name] = old_epoch
                for undo in (lambda: gw.registry.set_epoch(name, old_epoch),
                             lambda: gw.registry.set_owner(name, source)):
                    try:
                        undo()
                    except VipError as e:
                        log.error("graceful drain of %s: cannot undo the registry: %s", name, e)
                raise
            flipped = time.monotonic()
            gw.table.set_owner(name, dest)
    except VipError as e:
        await _undo(gw, name, source, dest, say, e)
    problems: list[str] = []
    tcp0, udp_flows = 0, []
    try:  # which flows the flip left on the source; new UDP flows wait for this list
        st = await _ask(gw, source, msgs.DrainStatus(service=name, baseline=True))
        tcp0, udp_flows = int(st.get("tcp_live", 0)), list(st.get("udp_flows", []))
    except VipError as e:
        problems.append(f"source {source} lost at the flip ({e}): its connections are lost")
    try:
        await _ask(gw, dest, msgs.DrainDest(service=name, epoch=new_tag, udp_flows=tuple(udp_flows), udp_open=True))
    except VipError as e:
        problems.append(f"destination role on {dest}: {e}")
    udp_gap_ms = round((time.monotonic() - flipped) * 1000, 2)
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
        # new TCP connections change hands at the flip (no gap); a new UDP flow's datagrams
        # are dropped until the destination knows the source's flows: this long
        "udp_gap_ms": udp_gap_ms,
        "roles_ms": split,
        "reason": "; ".join(problems) or (f"timeout after {limit:g}s: what was left was cut" if timed_out else ""),
    })
    gw.log_event("graceful_migration", report)
    log.info("graceful drain of %s %s -> %s: %s", name, source, dest, report)
    say("done", f"{name} now on {dest}: TCP {report['tcp']}, UDP {report['udp']}")
    return report


async def drain_node(gw, node: str, to: str | None, timeout: float | None, progress=None) -> dict:
    """Every service of `node`, drained gracefully at the same time (spread over the other
    nodes that are up and fit, or all to `to`)."""
    if gw.config.node(node) is None:  # before asking failover about an unknown node
        raise LocalControlError(f"unknown node '{node}'")
    targets = drain_targets(gw, node, to, gw.failover.unfit_nodes(), " (with passing checks)")
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
