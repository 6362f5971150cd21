"""The exact cutover of one service's packets from a source node to a destination node.

Why positions, not hashes
-------------------------
During a live migration both nodes receive a copy of every packet for the service. The
source must go on serving until its sockets are frozen; the destination must then take
over at *exactly* the next packet of every flow. Packet bytes cannot say where that is:
a stream of identical UDP datagrams (IP ID 0 with DF) has no distinguishing field. What
both nodes do share is the order of each flow, and an origin both can recognise: the
gateway writes an *epoch* tag into every copy (the source MAC), and flips it to the
migration's `new_epoch` at one instant. Counting new-epoch packets per flow therefore
gives both nodes the same positions, whatever their delays.

Theory of operation
-------------------
Destination (`DestCutover`), started before the flip: it HOLDs every new-epoch packet in
arrival order and DROPs anything else (the source still owns it).

Source (`SourceCutover`), started before the flip: until `freeze()` it ACCEPTs, counting
per flow how many new-epoch packets it consumed. A new-epoch TCP SYN is HELD instead: the
connection it opens must be born on the destination, because a half-open request socket
cannot be moved. Once a flow has a held packet, all its later packets are held, so what
the source consumed of a flow is always a *prefix* of that flow's new-epoch stream.
`freeze()` returns the counts; from then on everything is HELD (not dropped, so a rollback
loses nothing).

Old-epoch packets that the source holds ("late" packets, in flight when the gateway
flipped) were dropped by the destination, so their bytes travel with the socket state
(`hand_over_late()`) and are re-injected on the destination before it releases anything.
Stragglers that reach the source after the handover are forwarded at `commit()`, and after
commit the source keeps DROPping them while queueing them for forwarding (`take_forward()`).

`release(consumed)` on the destination drops, per flow, the first `consumed[flow]` held
packets (the source consumed them) and accepts the rest in arrival order. When the
destination lags and holds fewer than that, the rest becomes a skip budget: later arrivals
of the flow are dropped until it is used up. After release the destination owns the
new-epoch stream; old-epoch packets stay dropped there forever (each was either accepted by
the source or handed over by it).

Outcomes: `commit()` drops everything the source held (the destination has it);
`rollback()` accepts it in arrival order, and the destination's `abort()` drops its hold.
Rollback is only correct while the destination has released nothing.

Guarantee: every packet of the service is accepted by exactly one node, in per-flow order.
Per-flow order assumes each flow's old-epoch packets reach the source before the handover
(the flip happens before the freeze, and dumping sockets takes far longer than a packet's
trip); a later straggler is still delivered exactly once, but behind any new-epoch packets
of its flow that the destination already released.

Both classes are pure: handles are opaque (the netfilter queue's packet objects in the
shim, integers in tests), `now` is passed in, and nothing here touches the kernel.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import LocalControlError, PeerControlError
from .ownership import MigrationRole, Verdict
from .packet import Packet

Flow = tuple[int, str, int, str, int]
Handle = Any


def spend_skip(skip: dict[Flow, int], flow: Flow) -> bool:
    """Is this packet of `flow` one the source consumed (a duplicate to drop)? Spends one
    of the flow's budget in `skip` (flow -> packets left to drop) if so."""
    budget = skip.get(flow, 0)
    if not budget:
        return False
    if budget == 1:
        del skip[flow]
    else:
        skip[flow] = budget - 1
    return True


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    """What the destination does with its hold: drop the duplicates, accept the rest."""

    drop: tuple[Handle, ...]
    accept: tuple[Handle, ...]  # in arrival order


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """What the source does at commit: drop every held packet, and send a copy of
    `forward` (old-epoch stragglers held after the handover) to the destination."""

    drop: tuple[Handle, ...]
    forward: tuple[Handle, ...]  # a subset of drop, in arrival order


@dataclass(frozen=True, slots=True)
class DestStats:
    held: int  # packets held before release
    released: int  # held packets accepted at release
    duplicates_suppressed: int  # dropped at release or by a skip budget afterwards
    first_held_at: float | None  # arrival of the first held packet that was accepted
    last_released_at: float | None

    @property
    def freeze_ms(self) -> float:
        """How long the client's traffic stood still, on the destination's clock."""
        if self.first_held_at is None or self.last_released_at is None:
            return 0.0
        return max(0.0, (self.last_released_at - self.first_held_at) * 1000.0)


@dataclass(frozen=True, slots=True)
class _Held:
    flow: Flow
    handle: Handle
    new_epoch: bool
    at: float


class _Phase(enum.Enum):
    COUNTING = "counting"  # source: before freeze / destination: holding
    FROZEN = "frozen"
    RELEASED = "released"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"
    ABORTED = "aborted"


def epoch_mac(epoch: int) -> str:
    """The epoch tag the gateway writes into the source MAC of every copy of a service's
    packets (locally administered, unicast). Lives here, not in gateway/nft.py, because
    the tag is the cutover's in-band origin and the pure in-memory cluster needs it too."""
    e = epoch % 65536
    return f"02:76:63:00:{e >> 8:02x}:{e & 0xff:02x}"


def _check_epoch(new_epoch: object) -> str:
    if not isinstance(new_epoch, str) or not new_epoch:
        raise LocalControlError(f"cutover epoch must be a non-empty string, got {new_epoch!r}")
    return new_epoch


class SourceCutover(MigrationRole):
    """The old owner's side: consume a counted prefix, then hold until commit or rollback."""

    def __init__(self, new_epoch: str) -> None:
        self.new_epoch = _check_epoch(new_epoch)
        self._phase = _Phase.COUNTING
        self._consumed: dict[Flow, int] = {}
        self._held: list[_Held] = []
        self._held_flows: set[Flow] = set()
        self._handed_over = 0  # len(_held) at the handover: later old-epoch entries are stragglers
        self._handover_done = False
        self._forward: list[Handle] = []
        self.frozen_at: float | None = None
        self.first_held_at: float | None = None
        self.syns_accepted = 0  # old-epoch SYNs accepted (a handshake the freeze must wait for)

    @property
    def phase(self) -> str:
        return self._phase.value

    @property
    def held_count(self) -> int:
        return len(self._held)

    @property
    def consumed(self) -> dict[Flow, int]:
        return dict(self._consumed)

    def on_packet(self, packet: Packet, epoch: str | None, handle: Handle, now: float) -> Verdict:
        is_new = epoch == self.new_epoch
        phase = self._phase
        if phase is _Phase.ROLLED_BACK:
            return Verdict.ACCEPT  # the source is the owner again
        if phase is _Phase.COMMITTED:
            if not is_new:
                self._forward.append(handle)  # a straggler: only the new owner may take it
            return Verdict.DROP
        flow = packet.flow
        if phase is _Phase.FROZEN or flow in self._held_flows or (is_new and packet.is_syn):
            self._held.append(_Held(flow, handle, is_new, now))
            self._held_flows.add(flow)
            if self.first_held_at is None:
                self.first_held_at = now
            return Verdict.HOLD
        if is_new:
            self._consumed[flow] = self._consumed.get(flow, 0) + 1
        elif packet.is_syn:
            self.syns_accepted += 1
        return Verdict.ACCEPT

    def freeze(self, now: float) -> dict[Flow, int]:
        """Stop consuming; return per flow how many new-epoch packets were consumed."""
        if self._phase is not _Phase.COUNTING:
            raise LocalControlError(f"cannot freeze a source cutover that is {self.phase}")
        self._phase = _Phase.FROZEN
        self.frozen_at = now
        return dict(self._consumed)

    @property
    def undecided_verdict(self) -> Verdict:
        """Until the commit this node is the owner (a migration that loses its source's
        agent rolls back): accept, as rollback() does with the hold. Once committed: drop,
        as commit() does (the destination has every packet since the freeze)."""
        return Verdict.DROP if self._phase is _Phase.COMMITTED else Verdict.ACCEPT

    @property
    def ended(self) -> bool:
        return self._phase in (_Phase.COMMITTED, _Phase.ROLLED_BACK)

    def hand_over_late(self) -> tuple[Handle, ...]:
        """The held old-epoch packets, in arrival order, for re-injection on the
        destination before its release. Call once, after freeze, when the socket state is
        sent; stragglers held after this call are forwarded at commit instead."""
        if self._phase is not _Phase.FROZEN:
            raise LocalControlError(
                f"late packets are handed over after freeze, not when {self.phase}"
            )
        if self._handover_done:
            raise LocalControlError("late packets were already handed over")
        self._handover_done = True
        self._handed_over = len(self._held)
        return tuple(h.handle for h in self._held if not h.new_epoch)

    def late_after_handover(self) -> tuple[Handle, ...]:
        """Old-epoch packets held since the handover (to be forwarded at commit)."""
        return tuple(h.handle for h in self._held[self._handed_over :] if not h.new_epoch)

    def commit(self) -> CommitPlan:
        """The destination took over: drop the hold, forward the late stragglers."""
        if self._phase is _Phase.COMMITTED:
            return CommitPlan((), ())  # a repeated commit message changes nothing
        if self._phase is not _Phase.FROZEN:
            raise LocalControlError(f"cannot commit a source cutover that is {self.phase}")
        plan = CommitPlan(tuple(h.handle for h in self._held), self.late_after_handover())
        self._phase = _Phase.COMMITTED
        self._held.clear()
        return plan

    def rollback(self) -> tuple[Handle, ...]:
        """The migration failed before the destination released: accept the hold, in order."""
        if self._phase is _Phase.ROLLED_BACK:
            return ()
        if self._phase is _Phase.COMMITTED:
            raise LocalControlError("cannot roll back a source cutover that already committed")
        accept = tuple(h.handle for h in self._held)
        self._phase = _Phase.ROLLED_BACK
        self._held.clear()
        return accept

    def take_forward(self) -> tuple[Handle, ...]:
        """Old-epoch stragglers dropped since commit, to be re-injected on the new owner."""
        out, self._forward = tuple(self._forward), []
        return out


class DestCutover(MigrationRole):
    """The new owner's side: hold the new-epoch stream, then release it minus what the
    source consumed."""

    def __init__(self, new_epoch: str) -> None:
        self.new_epoch = _check_epoch(new_epoch)
        self._phase = _Phase.COUNTING
        self._held: list[_Held] = []
        self._skip: dict[Flow, int] = {}
        self._held_total = 0  # the hold's size when it ended (release or abort)
        self._released = 0
        self._suppressed = 0
        self._first_held_at: float | None = None
        self._last_released_at: float | None = None
        self._released_flows: frozenset[Flow] = frozenset()
        self._settled = False  # the release's plan carried out (undecided_verdict)

    @property
    def phase(self) -> str:
        return "holding" if self._phase is _Phase.COUNTING else self._phase.value

    @property
    def held_count(self) -> int:
        return len(self._held)

    @property
    def skip_budget(self) -> dict[Flow, int]:
        return dict(self._skip)

    @property
    def held_flows(self) -> frozenset[Flow]:
        """The flows of the packets held now (none once released or aborted)."""
        return frozenset(h.flow for h in self._held)

    @property
    def released_flows(self) -> frozenset[Flow]:
        """The flows the release accepted held packets of: their clients wait for an answer."""
        return self._released_flows

    @property
    def undecided_verdict(self) -> Verdict | None:
        """Holding (or aborted): drop, as abort() does (the source has them). Released and
        settled (the release's plan applied: `settle()`): this node is the owner and
        accepts what comes, unless a skip budget is left (a packet read then may be one
        the source consumed: no single verdict is right, None). Between release() and
        settle() the hold's plan is half applied; drop (the release's documented loss,
        never a duplicate)."""
        if self._phase is not _Phase.RELEASED or not self._settled:
            return Verdict.DROP
        return None if self._skip else Verdict.ACCEPT

    @property
    def ended(self) -> bool:
        """Aborted, or released and settled with no skip budget left (one left: a packet
        of its flow is dropped here though the service runs here)."""
        return self._phase is _Phase.ABORTED or self.undecided_verdict is Verdict.ACCEPT

    def settle(self) -> None:
        """The release's plan was carried out (its drops and accepts given): from now on a
        packet read and not decided belongs to this node."""
        if self._phase is _Phase.RELEASED:
            self._settled = True

    def stats(self) -> DestStats:
        held = len(self._held) if self._phase is _Phase.COUNTING else self._held_total
        return DestStats(held, self._released, self._suppressed, self._first_held_at,
                         self._last_released_at)

    def on_packet(self, packet: Packet, epoch: str | None, handle: Handle, now: float) -> Verdict:
        if epoch != self.new_epoch or self._phase is _Phase.ABORTED:
            return Verdict.DROP  # old epoch: the source's to accept or hand over
        flow = packet.flow
        if self._phase is _Phase.COUNTING:
            self._held.append(_Held(flow, handle, True, now))
            return Verdict.HOLD
        if spend_skip(self._skip, flow):
            self._suppressed += 1
            return Verdict.DROP  # the source consumed this one before we had seen it
        return Verdict.ACCEPT

    def release(self, consumed: Mapping[Flow, int], now: float) -> ReleasePlan:
        """Become the owner. Re-inject the source's late packets BEFORE applying the plan."""
        if self._phase is not _Phase.COUNTING:
            raise LocalControlError(f"cannot release a destination cutover that is {self.phase}")
        remaining = check_consumed(consumed)
        drop: list[Handle] = []
        accept: list[Handle] = []
        flows: set[Flow] = set()
        for held in self._held:
            if remaining.get(held.flow, 0) > 0:
                remaining[held.flow] -= 1
                drop.append(held.handle)
            else:
                accept.append(held.handle)
                flows.add(held.flow)
                if self._first_held_at is None:
                    self._first_held_at = held.at
        self._released_flows = frozenset(flows)
        self._skip = {flow: n for flow, n in remaining.items() if n > 0}
        self._held_total = len(self._held)
        self._held.clear()
        self._released = len(accept)
        self._suppressed = len(drop)
        self._last_released_at = now
        self._phase = _Phase.RELEASED
        return ReleasePlan(tuple(drop), tuple(accept))

    def abort(self) -> tuple[Handle, ...]:
        """The migration rolled back: drop the hold; from now on drop everything."""
        if self._phase is _Phase.RELEASED:
            raise LocalControlError("cannot abort a destination cutover that already released")
        if self._phase is _Phase.ABORTED:
            return ()  # a repeated abort message changes nothing
        drop = tuple(h.handle for h in self._held)
        self._held_total = len(self._held)
        self._held.clear()
        self._phase = _Phase.ABORTED
        return drop


def check_consumed(consumed: Mapping[Flow, int]) -> dict[Flow, int]:
    """A validated copy of per-flow consumed counts (LocalControlError if malformed)."""
    if not isinstance(consumed, Mapping):
        raise LocalControlError(f"consumed counts must be a mapping, got {type(consumed).__name__}")
    out: dict[Flow, int] = {}
    for flow, count in consumed.items():
        if not isinstance(flow, tuple) or len(flow) != 5:
            raise LocalControlError(f"consumed counts: {flow!r} is not a 5-tuple flow")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise LocalControlError(
                f"consumed count for flow {flow} must be an int >= 0, got {count!r}"
            )
        out[flow] = count
    return out


# ---------------------------------------------------------------- on the wire
# Control messages are JSON (clustercore.protocol): flows become lists, bytes base64.
# Decoding is strict and blames the peer, since these values come from another node.


def consumed_to_wire(consumed: Mapping[Flow, int]) -> list[list]:
    return [[*flow, count] for flow, count in sorted(check_consumed(consumed).items())]


def consumed_from_wire(data: Any) -> dict[Flow, int]:
    if not isinstance(data, list):
        raise PeerControlError(
            "consumed counts: expected a list of [proto, src, sport, dst, dport, count]"
        )
    out: dict[Flow, int] = {}
    for i, item in enumerate(data):
        ok = (
            isinstance(item, list)
            and len(item) == 6
            and all(isinstance(item[k], str) for k in (1, 3))
            and all(type(item[k]) is int for k in (0, 2, 4, 5))  # bool is not a count
            and item[5] >= 0
        )
        if not ok:
            raise PeerControlError(f"consumed counts[{i}]: malformed entry {item!r}")
        flow = (item[0], item[1], item[2], item[3], item[4])
        if flow in out:
            raise PeerControlError(f"consumed counts[{i}]: flow {flow} listed twice")
        out[flow] = item[5]
    return out


def packets_to_wire(packets: tuple[bytes, ...] | list[bytes]) -> list[str]:
    return [base64.b64encode(p).decode("ascii") for p in packets]


def packets_from_wire(data: Any) -> tuple[bytes, ...]:
    if not isinstance(data, list):
        raise PeerControlError("late packets: expected a list of base64 strings")
    out = []
    for i, item in enumerate(data):
        try:
            if not isinstance(item, str):
                raise ValueError
            out.append(base64.b64decode(item, validate=True))
        except (ValueError, binascii.Error):
            raise PeerControlError(f"late packets[{i}]: not base64") from None
    return tuple(out)


__all__ = [
    "CommitPlan",
    "DestCutover",
    "DestStats",
    "Flow",
    "ReleasePlan",
    "SourceCutover",
    "Verdict",
    "check_consumed",
    "consumed_from_wire",
    "epoch_mac",
    "consumed_to_wire",
    "packets_from_wire",
    "packets_to_wire",
]
