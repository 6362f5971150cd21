"""The control messages of a batched handoff (clustercore.batchmigration drives them).

The gateway sends them to the two nodes; the replies come back typed. Same codec as
clustercore.messages (frozen keyword-only dataclasses, a total decoder that blames the
peer); flows travel in runs [proto, dst, dport, [src, sport, ...]] (FLOWS, below).

The gateway's controller sends them (gateway/batched.py). The node side: clustercore.batchnode
(the playbook), clustercore.batchtable (its rows), nodeshim.batchmigrate (its executor).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Mapping

from .cutover import Flow
from .errors import LocalControlError, PeerControlError
from .kinds import MigrateStrategy
from .messages import CONSUMED, CommitDone, Done, Reply, Step, _Codec, message, reply_type, wire

STRATEGY = MigrateStrategy.BATCHED.value  # named in Prepare and Arm: both nodes run the batched playbook


def _flow_ok(item: Any) -> bool:
    # written out (no generators): 10,000 kept flows cross three hops, and this check ran
    # 60,000 times there (~200 ms at 10,000, when those hops were in the opening's hold)
    if type(item) is not list and type(item) is not tuple or len(item) != 5:
        return False
    proto, src, sport, dst, dport = item
    return (type(proto) is int and type(sport) is int and type(dport) is int
            and 0 <= proto <= 65535 and 0 <= sport <= 65535 and 0 <= dport <= 65535
            and isinstance(src, str) and isinstance(dst, str) and src != "" and dst != "")


class _CheckedFlows(tuple):
    """Flows that passed _flows_from_wire: the message built from them need not check
    them a second time."""


# On the wire, flows go in runs that share protocol, destination and port (a service's
# connections all do): [proto, dst, dport, [src, sport, src, sport, ...]] per run, in the
# flows' order. As one 5-item list each, 10,000 flows cost ~38 ms a hop to build, encode,
# decode and check (4.3 ms at 1,000), as runs ~7 ms (0.7 ms). The kept list used to cross
# the opening's hold three times (OpeningDone, the owner switch's journal, ReleaseBatch 0);
# it now travels before the opening freezes (KeptListed, ExpectKept, the journal's order).
# The decoder also takes a flow as its own 5-item list (journals written before).


def _flows_to_wire(flows: Any) -> list:
    out: list = []
    run: list = [None, None, None, []]  # [proto, dst, dport, [src, sport, ...]]
    for proto, src, sport, dst, dport in flows:
        if run[0] != proto or run[1] != dst or run[2] != dport:  # a new run begins
            run = [proto, dst, dport, []]
            out.append(run)
        run[3] += (src, sport)
    return out


def _flows_from_wire(data: Any) -> tuple[Flow, ...]:
    if not isinstance(data, list):
        raise PeerControlError("flows: expected a list of [proto, dst, dport, [src, sport, ...]]")
    out: list[Flow] = []
    for i, item in enumerate(data):
        if type(item) is list and len(item) == 4:
            proto, dst, dport, flat = item
            if (type(proto) is not int or type(dport) is not int or not 0 <= proto <= 65535
                    or not 0 <= dport <= 65535 or not isinstance(dst, str) or dst == ""
                    or type(flat) is not list or len(flat) % 2):
                _bad_flow(i, item)
            srcs = flat[0::2]
            sports = flat[1::2]
            for src, sport in zip(srcs, sports):
                if type(src) is not str or src == "" or type(sport) is not int or not 0 <= sport <= 65535:
                    _bad_flow(i, [proto, src, sport, dst, dport])
                out.append((proto, src, sport, dst, dport))
        elif _flow_ok(item):
            out.append(tuple(item))
        else:
            _bad_flow(i, item)
    flows = _CheckedFlows(out)
    if len(set(flows)) != len(flows):
        raise PeerControlError("flows: a flow is listed twice")
    return flows


def _bad_flow(i: int, item: Any):
    raise PeerControlError(f"flows[{i}]: malformed flow {str(item)[:80]}")


def _check_flows(value: Any, where: str) -> tuple[Flow, ...]:
    if type(value) is _CheckedFlows:
        return value
    if not isinstance(value, (tuple, list, frozenset, set)) or not all(_flow_ok(f) for f in value):
        raise LocalControlError(f"{where} must be a sequence of 5-tuple flows")
    flows = tuple(tuple(f) for f in value)
    if len(set(flows)) != len(flows):
        raise LocalControlError(f"{where}: a flow is listed twice")
    return flows


FLOWS = _Codec(_flows_to_wire, _flows_from_wire, _check_flows)


# ---------------------------------------------------------------- replies


@reply_type
class OpeningDone(Reply):
    """The source froze the opening batch: what it keeps, in the order the batches take
    it (the longest idle first), and what moves now (listeners, UDP, the accept queue's
    connections, in `sockets`). `idle_ms` (one per kept flow) is what an older source sent
    instead of that order; the gateway sorts by it when it is there."""

    consumed: Mapping[Flow, int] = wire(CONSUMED, default_factory=dict)
    kept: tuple[Flow, ...] = wire(FLOWS, default_factory=tuple)
    idle_ms: tuple[float, ...] = ()  # per kept flow: since its last segment either way
    late_packets: tuple[bytes, ...] = ()
    sockets: dict = field(default_factory=dict)  # clustercore.sockwire.to_wire
    tcp_established: int = 0
    tcp_listening: int = 0
    udp_sockets: int = 0
    timing_ms: dict = field(default_factory=dict)


@reply_type
class KeptListed(Reply):
    """The source's program stopped accepting (its listeners are the agent's): the
    connections it keeps serving, in the order the batches take them (the longest idle
    first). Nothing is frozen yet: this list crosses no hold."""

    kept: tuple[Flow, ...] = wire(FLOWS, default_factory=tuple)
    timing_ms: dict = field(default_factory=dict)


@reply_type
class BatchFreezeDone(Reply):
    consumed: Mapping[Flow, int] = wire(CONSUMED, default_factory=dict)
    late_packets: tuple[bytes, ...] = ()
    sockets: dict = field(default_factory=dict)  # its connections, clustercore.sockwire
    connections: int = 0
    bytes_moved: int = 0
    timing_ms: dict = field(default_factory=dict)


@reply_type
class BatchReleaseDone(Reply):
    held: int = 0
    released: int = 0
    duplicates_suppressed: int = 0
    reinjected: int = 0
    lost: int = 0
    waited_ms: tuple[float, ...] = ()  # BatchRelease.freeze_ms: per flow that waited
    timing_ms: dict = field(default_factory=dict)


@reply_type
class BatchAbortDone(BatchReleaseDone):
    """AbortBatch's answer. `was_released` False: aborted (its hold dropped, its rebuilt
    sockets closed, its flows dropped from now on). True: the destination had released
    that batch (a RestoreReleaseBatch whose answer the gateway did not get) and it cannot
    be aborted: the other fields are that release's answer, and the batch goes forward."""
    was_released: bool = False


# ---------------------------------------------------------------- requests


@message("migrate.batch.stop_accepting", reply=KeptListed)
class StopAccepting(Step):
    """To the source, before the opening: the program hands back its listeners (it keeps
    serving its connections and its UDP sockets); say which connections it keeps."""


@message("migrate.batch.expect_kept", reply=Done)
class ExpectKept(Step):
    """To the destination, before the opening: the flows the source keeps (its batches'),
    so that the opening's release need not carry them through the hold."""
    flows: tuple[Flow, ...] = wire(FLOWS, default_factory=tuple)


@message("migrate.batch.open", reply=OpeningDone)
class OpenBatch(Step):
    """To the source: hand over the UDP sockets (and the listeners, if StopAccepting did
    not), freeze every flow it does not keep. `kept` in the reply only when it was not
    listed before (StopAccepting)."""


@message("migrate.batch.freeze", reply=BatchFreezeDone)
class FreezeBatch(Step):
    """To the source: the program hands back these connections; dump them."""
    batch: int
    flows: tuple[Flow, ...] = wire(FLOWS, default_factory=tuple)


@message("migrate.batch.restore", reply=Done)
class RestoreBatch(Step):
    """To the destination: rebuild the opening's sockets (repair mode), give them to the
    running new instance only at the release (the owner switch comes between)."""
    batch: int
    sockets: dict


@message("migrate.batch.restore_release", reply=BatchReleaseDone)
class RestoreReleaseBatch(Step):
    """To the destination, for a batch after the opening: rebuild its sockets and, if that
    worked, release it at once (ReleaseBatch's work, with these fields). A failed rebuild
    releases nothing (its sockets closed, as after RestoreBatch); once the release began it
    only goes forward. The gateway then learns which from the reply or, if the reply does
    not come, from AbortBatch's answer (BatchAbortDone.was_released)."""
    batch: int
    sockets: dict
    flows: tuple[Flow, ...] = wire(FLOWS, default_factory=tuple)
    consumed: Mapping[Flow, int] = wire(CONSUMED, default_factory=dict)
    late_packets: tuple[bytes, ...] = ()


@message("migrate.batch.release", reply=BatchReleaseDone)
class ReleaseBatch(Step):
    """To the destination: late packets in, repair off, hand the sockets to the new
    instance, release the batch's hold minus what the source consumed. The opening
    batch (0) is every flow not kept: the kept flows came before (ExpectKept), or here.
    Sent for the opening (the owner switch is between its restore and its release); the
    later batches' release comes with their restore (RestoreReleaseBatch). A restarted
    gateway may send it again for a batch whose release an older gateway journaled."""
    batch: int
    flows: tuple[Flow, ...] = wire(FLOWS, default_factory=tuple)  # batch 0: empty, or the kept flows
    consumed: Mapping[Flow, int] = wire(CONSUMED, default_factory=dict)
    late_packets: tuple[bytes, ...] = ()


@message("migrate.batch.commit", reply=CommitDone)
class CommitBatch(Step):
    """To the source: drop the batch's hold, close its copies silently."""
    batch: int


@message("migrate.batch.rollback", reply=Done)
class RollbackBatch(Step):
    """To the source: the batch did not move: its connections back to the program,
    its hold accepted; they stay here (pinned)."""
    batch: int


@message("migrate.batch.abort", reply=BatchAbortDone)
class AbortBatch(Step):
    """To the destination: drop the batch's hold and rebuilt sockets; drop its flows. A
    batch it had released is not aborted: the answer says so, with the release's."""
    batch: int
    flows: tuple[Flow, ...] = wire(FLOWS, default_factory=tuple)


@message("migrate.batch.finish", reply=CommitDone)
class FinishBatched(Step):
    """To the source: every batch moved or was pinned. No pinned connection: stop the old
    instance, close the listeners' copies, remove the role. Pinned ones: the old instance
    keeps serving them (the service is split until they close)."""
    pinned: int = 0


# the node steps (the node's machine takes them as events, clustercore.batchtable)
STEPS = (StopAccepting, ExpectKept, OpenBatch, FreezeBatch, RestoreBatch, RestoreReleaseBatch, ReleaseBatch,
         CommitBatch, RollbackBatch, AbortBatch, FinishBatched)

__all__ = ["AbortBatch", "BatchAbortDone", "BatchFreezeDone", "BatchReleaseDone", "CommitBatch", "ExpectKept", "FLOWS",
           "FinishBatched", "FreezeBatch", "KeptListed", "OpenBatch", "OpeningDone", "ReleaseBatch",
           "RestoreBatch", "RestoreReleaseBatch", "RollbackBatch", "STEPS", "STRATEGY", "StopAccepting"]
