"""The batched (per-connection) cutover: a service's packets move flow set by flow set.

Why
---
The whole-service cutover (clustercore.cutover) holds every flow of the service from the
source's freeze to the destination's release, so every client waits for the dump and the
restore of *all* connections (1,000: ~97 ms; 10,000: ~900 ms). The positions it relies on
are per flow, though: what the source consumed of a flow is a counted prefix of that
flow's new-epoch stream, and the destination drops exactly that prefix. Nothing forces all
flows to cross at the same instant. Here each flow crosses with its *batch*: it is held
only while its batch moves, so what one client waits depends on its batch's size, not on
how many connections the service has.

Theory of operation
-------------------
Batch 0, the *opening*, moves everything that is not an established connection of the
source: the listeners, the UDP sockets, and every flow the source does not keep (new
connections, the accept queue's, UDP flows). It is described by the set of flows the
source keeps (`kept`, its established connections at that moment); its flows are "every
flow not in kept". Later batches name their flows explicitly (a subset of kept, disjoint).

Why the listeners and UDP move first, not last:
- a new-epoch SYN must be born on the destination (a half-open request socket cannot be
  moved), so the source holds it: with the listener moved last, every client that
  connects during the migration would wait for the *whole* migration. Moved first, it
  waits at most for the opening batch;
- the source's set of connections then only shrinks: the migration ends whatever the
  arrival rate (a listener moved last keeps adding connections to move);
- UDP is one socket for all peers: its exactly-once cut (the source's queued datagrams
  drained and put back on the destination before its hold) is made once, in a batch that
  holds no established connection, so it is short.
Its cost: from the opening on, both instances serve (the destination the new connections,
the source its kept ones), so a program whose connections share state in memory cannot
be batched (docs/handoff.md).

Source (`BatchSource`), per flow: OWNED (accept; new-epoch packets counted; a new-epoch
SYN, and every later packet of its flow, held as in SourceCutover) -> FROZEN (its batch
froze: held) -> MOVED (its batch committed: new-epoch packets dropped, the destination has
them; old-epoch stragglers dropped and queued for forwarding) or PINNED (its batch rolled
back: accepted, the source keeps it for the rest of this migration).

Destination (`BatchDest`), per flow: HOLDING (every new-epoch packet held in arrival
order; old-epoch packets are always dropped) -> RELEASED (its batch released: the held
packets minus the consumed prefix accepted, the rest of a consumed count as a skip
budget, then ACCEPT) or ABORTED (its batch aborted: DROP for the rest of the migration).

Why an aborted batch is not retried (PINNED): the destination dropped packets of those
flows that the source accepts after its rollback, and a later freeze of the source may
come before the source has seen all of them; the destination would then skip packets the
source holds, and the commit would drop them: lost. Pinned flows stay on the source until
they close; the migration ends split (reported), never lossy.

Rollback of the opening batch is the whole migration's rollback: correct only while the
destination has released nothing (the driver's rule, as for SourceCutover.rollback).

Guarantee (tests/unit/test_batchcutover.py, a property over random interleavings and
batch scripts): every packet of the service is accepted by exactly one node, in per-flow
order, when each batch is frozen, handed over, released and committed in that order, or
rolled back (source) and aborted (destination) before its release.

Pure: handles are opaque, `now` is passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .cutover import CommitPlan, Flow, Handle, ReleasePlan, check_consumed, spend_skip
from .errors import LocalControlError
from .ownership import MigrationRole, Verdict
from .packet import Packet

OPENING = 0  # the batch id of the opening batch (listeners, UDP, every flow not kept)


class BatchPhase(enum.Enum):
    OWNED = "owned"  # source: not frozen yet / destination: holding
    FROZEN = "frozen"
    MOVED = "moved"  # source: committed / destination: released
    PINNED = "pinned"  # source: rolled back / destination: aborted


@dataclass
class _Held:
    flow: Flow
    handle: Handle
    new_epoch: bool
    at: float
    seq: int = 0  # arrival order on the destination (its hold is kept by flow)


@dataclass
class _SourceBatch:
    phase: BatchPhase = BatchPhase.FROZEN
    held: list[_Held] = field(default_factory=list)
    handed_over: int | None = None  # len(held) at the handover


def _check_id(batch: object) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise LocalControlError(f"batch id must be an int >= 0, got {batch!r}")
    return batch


def _check_flows(flows: Iterable[Flow], what: str) -> frozenset[Flow]:
    out = frozenset(flows)
    for flow in out:
        if not isinstance(flow, tuple) or len(flow) != 5:
            raise LocalControlError(f"{what}: {flow!r} is not a 5-tuple flow")
    return out


class _Batches:
    """Which batch a flow is in: the opening's is every flow not kept."""

    def __init__(self) -> None:
        self.kept: frozenset[Flow] | None = None  # None: not opened yet
        self.of: dict[Flow, int] = {}

    def open(self, kept: Iterable[Flow]) -> None:
        if self.kept is not None:
            raise LocalControlError("the kept flows were given already")
        self.kept = _check_flows(kept, "kept flows")

    def open_unless_given(self, kept: Iterable[Flow]) -> None:
        """At the opening: `kept`, or nothing when they were given before (expect)."""
        if self.kept is None:
            self.open(kept)
        elif kept:
            raise LocalControlError("the kept flows were given before the opening (expect)")

    def add(self, batch: int, flows: Iterable[Flow]) -> frozenset[Flow]:
        if self.kept is None:
            raise LocalControlError(f"batch {batch} before the opening batch")
        if _check_id(batch) == OPENING:
            raise LocalControlError("batch 0 is the opening batch")
        flows = _check_flows(flows, f"batch {batch}")
        if not flows:
            raise LocalControlError(f"batch {batch} has no flows")
        outside = flows - self.kept
        if outside:
            raise LocalControlError(f"batch {batch}: {sorted(outside)[0]} is not a kept flow")
        taken = [f for f in flows if f in self.of]
        if taken:
            raise LocalControlError(f"batch {batch}: {taken[0]} is already in batch {self.of[taken[0]]}")
        for f in flows:
            self.of[f] = batch
        return flows

    def batch_of(self, flow: Flow) -> int | None:
        """The flow's batch; None while it has none (not opened yet, or kept and unassigned)."""
        if self.kept is None:
            return None
        if flow not in self.kept:
            return OPENING
        return self.of.get(flow)

    def flows_of(self, batch: int, seen: Iterable[Flow]) -> set[Flow]:
        return {f for f in seen if self.batch_of(f) == batch}


class BatchSource(MigrationRole):
    """The old owner's side of a batched cutover."""

    def __init__(self, new_epoch: str) -> None:
        if not isinstance(new_epoch, str) or not new_epoch:
            raise LocalControlError(f"cutover epoch must be a non-empty string, got {new_epoch!r}")
        self.new_epoch = new_epoch
        self._batches = _Batches()
        self._state: dict[int, _SourceBatch] = {}
        self._consumed: dict[Flow, int] = {}
        self._waiting: list[_Held] = []  # held while OWNED (a new-epoch SYN and what follows)
        self._waiting_flows: set[Flow] = set()
        self._forward: list[Handle] = []
        self._rolled_back = False  # the whole migration (the opening batch rolled back)
        # old-epoch SYNs accepted so far: each may open a handshake here, which cannot move.
        # The node looks for half-open handshakes before its program hands the listeners
        # back (while UDP is still served), and again only if this count moved since
        self.syns_accepted = 0

    # -- observation

    def phase_of(self, batch: int) -> BatchPhase:
        st = self._state.get(batch)
        return BatchPhase.OWNED if st is None else st.phase

    @property
    def held_count(self) -> int:
        return len(self._waiting) + sum(len(b.held) for b in self._state.values())

    @property
    def consumed(self) -> dict[Flow, int]:
        return dict(self._consumed)

    # -- packets

    def on_packet(self, packet: Packet, epoch: str | None, handle: Handle, now: float) -> Verdict:
        is_new = epoch == self.new_epoch
        if self._rolled_back:
            return Verdict.ACCEPT
        flow = packet.flow
        batch = self._batches.batch_of(flow)
        phase = self.phase_of(batch) if batch is not None else BatchPhase.OWNED
        if phase is BatchPhase.MOVED:
            if not is_new:
                self._forward.append(handle)  # a straggler: only the new owner may take it
            return Verdict.DROP
        if phase is BatchPhase.FROZEN:
            self._state[batch].held.append(_Held(flow, handle, is_new, now))
            return Verdict.HOLD
        if phase is BatchPhase.OWNED and (flow in self._waiting_flows or (is_new and packet.is_syn)):
            self._waiting.append(_Held(flow, handle, is_new, now))
            self._waiting_flows.add(flow)
            return Verdict.HOLD
        if is_new:
            self._consumed[flow] = self._consumed.get(flow, 0) + 1
        elif packet.is_syn:
            self.syns_accepted += 1
        return Verdict.ACCEPT

    # -- batches

    def expect(self, kept: Iterable[Flow]) -> None:
        """The kept flows, known before the opening freezes (its set is built outside the
        hold). Changes no verdict: until the opening freezes every flow is OWNED."""
        self._batches.open(kept)

    def open(self, kept: Iterable[Flow], now: float) -> dict[Flow, int]:
        """Freeze the opening batch: every flow not in `kept` (the source's established
        connections, which it goes on serving; empty when given before: `expect`).
        Returns its flows' consumed counts."""
        if OPENING in self._state:
            raise LocalControlError("the opening batch was already frozen")
        self._batches.open_unless_given(kept)
        return self._freeze(OPENING)

    def freeze(self, batch: int, flows: Iterable[Flow], now: float) -> dict[Flow, int]:
        """Freeze a batch of kept flows: from now on they are held. Returns their counts."""
        if OPENING not in self._state:
            raise LocalControlError(f"batch {batch} before the opening batch")
        if self._rolled_back:
            raise LocalControlError("the migration was rolled back")
        flows = self._batches.add(batch, flows)
        return self._freeze(batch, flows)

    def _freeze(self, batch: int, flows: frozenset[Flow] | None = None) -> dict[Flow, int]:
        st = self._state[batch] = _SourceBatch()
        keep: list[_Held] = []
        for h in self._waiting:  # held while owned: they belong to this batch now, first
            (st.held if self._batches.batch_of(h.flow) == batch else keep).append(h)
        self._waiting = keep
        self._waiting_flows = {h.flow for h in keep}
        if flows is None:
            flows = self._batches.flows_of(batch, self._consumed)
        return {f: self._consumed[f] for f in flows if f in self._consumed}

    def hand_over_late(self, batch: int) -> tuple[Handle, ...]:
        """The batch's held old-epoch packets, for re-injection on the destination before
        it releases the batch. Once per batch, after its freeze."""
        st = self._frozen(batch, "hand over late packets of")
        if st.handed_over is not None:
            raise LocalControlError(f"late packets of batch {batch} were already handed over")
        st.handed_over = len(st.held)
        return tuple(h.handle for h in st.held if not h.new_epoch)

    def commit(self, batch: int) -> CommitPlan:
        """The destination released the batch: drop its hold, forward its stragglers."""
        st = self._state.get(_check_id(batch))
        if st is not None and st.phase is BatchPhase.MOVED:
            return CommitPlan((), ())  # a repeated commit changes nothing
        st = self._frozen(batch, "commit")
        if st.handed_over is None:
            raise LocalControlError(f"batch {batch} committed before its late packets were handed over")
        plan = CommitPlan(tuple(h.handle for h in st.held),
                          tuple(h.handle for h in st.held[st.handed_over:] if not h.new_epoch))
        st.phase, st.held = BatchPhase.MOVED, []
        return plan

    def rollback(self, batch: int) -> tuple[Handle, ...]:
        """The batch did not move (the destination released nothing of it): accept its
        hold in order; its flows stay here (PINNED). The opening batch's rollback is the
        whole migration's: every flow is the source's again, every hold accepted."""
        st = self._state.get(_check_id(batch))
        if st is not None and st.phase is BatchPhase.PINNED:
            return ()
        if batch == OPENING and st is None:  # before the opening froze: only the waiting hold
            accept, self._waiting, self._waiting_flows = self._waiting, [], set()
            for h in accept:
                if h.new_epoch:
                    self._consumed[h.flow] = self._consumed.get(h.flow, 0) + 1
            self._rolled_back = True
            self._state[OPENING] = _SourceBatch(phase=BatchPhase.PINNED)
            return tuple(h.handle for h in accept)
        st = self._frozen(batch, "roll back")
        accept = st.held
        if batch == OPENING:
            if any(b.phase is BatchPhase.MOVED for b in self._state.values()):
                raise LocalControlError("cannot roll back the opening batch: a batch already moved")
            for other in self._state.values():
                if other is not st:
                    accept = accept + other.held
                    other.phase, other.held = BatchPhase.PINNED, []
            accept = sorted(accept + self._waiting, key=lambda h: h.at)
            self._waiting, self._waiting_flows = [], set()
            self._rolled_back = True
        for h in accept:
            if h.new_epoch:
                self._consumed[h.flow] = self._consumed.get(h.flow, 0) + 1
        st.phase, st.held = BatchPhase.PINNED, []
        return tuple(h.handle for h in accept)

    def take_forward(self) -> tuple[Handle, ...]:
        """Old-epoch stragglers of moved batches, to be re-injected on the new owner."""
        out, self._forward = tuple(self._forward), []
        return out

    def _frozen(self, batch: int, what: str) -> _SourceBatch:
        st = self._state.get(_check_id(batch))
        if st is None or st.phase is not BatchPhase.FROZEN:
            phase = "not frozen" if st is None else st.phase.value
            raise LocalControlError(f"cannot {what} batch {batch}: it is {phase}")
        return st


@dataclass(frozen=True, slots=True)
class BatchRelease:
    """One batch's release on the destination: the plan and each flow's freeze."""

    plan: ReleasePlan
    freeze_ms: dict[Flow, float]  # per flow that had a packet accepted from the hold


class BatchDest(MigrationRole):
    """The new owner's side: hold every new-epoch flow, release it batch by batch."""

    def __init__(self, new_epoch: str) -> None:
        if not isinstance(new_epoch, str) or not new_epoch:
            raise LocalControlError(f"cutover epoch must be a non-empty string, got {new_epoch!r}")
        self.new_epoch = new_epoch
        self._batches = _Batches()
        self._phase: dict[int, BatchPhase] = {}
        # held packets by flow: a batch's release takes only its flows' (releasing one
        # batch must not cost every packet held for the others: the kept flows' copies
        # wait here for the whole migration)
        self._held: dict[Flow, list[_Held]] = {}
        self._held_n = self._seq = 0
        self._skip: dict[Flow, int] = {}
        self.freeze_ms: dict[Flow, float] = {}  # per flow, over every released batch
        self.released = 0
        self.suppressed = 0

    def phase_of(self, batch: int) -> BatchPhase:
        return self._phase.get(batch, BatchPhase.OWNED)

    @property
    def held_count(self) -> int:
        return self._held_n

    def _take(self, batch: int, flows: frozenset[Flow] | None = None) -> list[_Held]:
        """The held packets of `batch`'s flows, out of the hold, in arrival order. A kept
        batch's flows are given (exactly the flows whose batch it is): its release costs
        its own flows, not every flow held for the others (10,000 at 10,000 kept)."""
        if flows is None:
            flows = [f for f in self._held if self._batches.batch_of(f) == batch]
        else:
            flows = [f for f in flows if f in self._held]
        taken = [h for f in flows for h in self._held.pop(f)]
        self._held_n -= len(taken)
        taken.sort(key=lambda h: h.seq)
        return taken

    @property
    def skip_budget(self) -> dict[Flow, int]:
        return dict(self._skip)

    def on_packet(self, packet: Packet, epoch: str | None, handle: Handle, now: float) -> Verdict:
        if epoch != self.new_epoch:
            return Verdict.DROP  # old epoch: the source's to accept or hand over
        flow = packet.flow
        batch = self._batches.batch_of(flow)
        phase = self.phase_of(batch) if batch is not None else BatchPhase.OWNED
        if phase is BatchPhase.PINNED:
            return Verdict.DROP
        if phase is not BatchPhase.MOVED:
            self._held_n += 1
            self._seq += 1
            self._held.setdefault(flow, []).append(_Held(flow, handle, True, now, self._seq))
            return Verdict.HOLD
        if spend_skip(self._skip, flow):
            self.suppressed += 1
            return Verdict.DROP  # the source consumed this one before we had seen it
        return Verdict.ACCEPT

    @property
    def kept(self) -> frozenset[Flow] | None:
        """The source's kept flows (the later batches'), once given; None before."""
        return self._batches.kept

    def expect(self, kept: Iterable[Flow]) -> None:
        """The source's kept flows, given before the opening freezes: its release then
        need not name them (10,000 flows kept out of the opening's hold). Changes no
        verdict: until its release the opening's flows are held, as the kept ones are."""
        self._batches.open(kept)

    def open(self, kept: Iterable[Flow], consumed: Mapping[Flow, int], now: float) -> BatchRelease:
        """Release the opening batch (every flow not kept). Re-inject its late packets first.
        `kept` is empty when they were given before (`expect`)."""
        self._batches.open_unless_given(kept)
        return self._release(OPENING, consumed, now)

    def release(self, batch: int, flows: Iterable[Flow], consumed: Mapping[Flow, int],
                now: float) -> BatchRelease:
        """Release a batch of kept flows. Re-inject its late packets first."""
        if OPENING not in self._phase:
            raise LocalControlError(f"batch {batch} before the opening batch")
        return self._release(batch, consumed, now, self._batches.add(batch, flows))

    def _release(self, batch: int, consumed: Mapping[Flow, int], now: float,
                 flows: frozenset[Flow] | None = None) -> BatchRelease:
        remaining = check_consumed(consumed)
        for flow in remaining:
            if self._batches.batch_of(flow) != batch:
                raise LocalControlError(f"release of batch {batch}: consumed count for {flow}, "
                                        "a flow of another batch")
        drop: list[Handle] = []
        accept: list[Handle] = []
        first: dict[Flow, float] = {}
        for held in self._take(batch, flows):
            if remaining.get(held.flow, 0) > 0:
                remaining[held.flow] -= 1
                drop.append(held.handle)
            else:
                accept.append(held.handle)
                first.setdefault(held.flow, held.at)
        self._skip.update({flow: n for flow, n in remaining.items() if n > 0})
        self._phase[batch] = BatchPhase.MOVED
        self.released += len(accept)
        self.suppressed += len(drop)
        waited = {flow: max(0.0, (now - at) * 1000.0) for flow, at in first.items()}
        self.freeze_ms.update(waited)
        return BatchRelease(ReleasePlan(tuple(drop), tuple(accept)), waited)

    def abort(self, batch: int, flows: Iterable[Flow] = ()) -> tuple[Handle, ...]:
        """The batch did not move: drop its hold; its flows are dropped here from now on.
        The opening batch's abort is the whole migration's: everything is dropped."""
        if self.phase_of(_check_id(batch)) is BatchPhase.MOVED:
            raise LocalControlError(f"cannot abort batch {batch}: it was released")
        if self.phase_of(batch) is BatchPhase.PINNED:
            return ()
        if batch == OPENING:
            if any(p is BatchPhase.MOVED for p in self._phase.values()):
                raise LocalControlError("cannot abort the opening batch: a batch was released")
            if self._batches.kept is None:
                self._batches.open(())
            drop = tuple(h.handle for h in sorted((h for hs in self._held.values() for h in hs),
                                                   key=lambda h: h.seq))
            self._held, self._held_n = {}, 0
            for b in set(self._batches.of.values()) | {OPENING}:
                self._phase[b] = BatchPhase.PINNED
            self._batches.kept = frozenset()  # every flow is the opening's: dropped
            self._batches.of = {}
            return drop
        flows = self._batches.add(batch, flows)
        self._phase[batch] = BatchPhase.PINNED
        return tuple(h.handle for h in self._take(batch, flows))


__all__ = ["BatchDest", "BatchPhase", "BatchRelease", "BatchSource", "OPENING"]
