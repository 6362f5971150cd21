"""The `batched` migration strategy on a node: a service's connections move a batch at a
time while its program keeps serving the others. No I/O.

The gateway's machine (clustercore.batchmigration) orders the steps; this is what each
does on the node (design: docs/handoff.md, "Batched cutover"). Packets are decided by the
per-flow roles of clustercore.batchcutover (BatchSource, BatchDest) installed in the
node's filter; sockets travel through the program's `vip-batch` channel
(clustercore.batchchannel) and the existing dump / restore commands. The rows that run
these steps are in clustercore.batchtable (added to nodemigration's one table).

Source (the old owner; its program keeps running all along):
  Arm            BatchSource counts the new epoch.
  StopAccepting  half-closed connections and half-open handshakes finish (the program
                 still serves), the program hands back its listeners (it stops
                 accepting); the established connections it keeps serving are `kept`,
                 sent to the gateway now, before anything is frozen.
  OpenBatch      the program hands back its UDP sockets, the accept queue is taken; the
                 opening freezes every flow not kept; the accepted connections are
                 dumped, the UDP sockets drained. (Asked without StopAccepting, it does
                 that step's work first and sends `kept` in its reply.)
  CommitBatch k  drop batch k's hold, close its copies silently, hand over stragglers.
  FreezeBatch k  the program hands back batch k's connections (with what it owes on
                 them); the batch freezes; they are dumped.
  RollbackBatch k  repair off, the connections back to the program (with what it owed),
                 the batch's hold accepted in order: they stay here (pinned).
  FinishBatched  no pinned connection: stop the old instance, close the listeners'
                 copies, remove the role. Pinned ones: the program and the role stay.
  Rollback       (before the opening committed) the whole rollback: listeners, UDP and
                 the accepted connections back to the program, datagrams put back first.
Destination:
  Prepare        BatchDest holds the new epoch; the ports are bound; the new instance is
                 started with only its channel and waited for (READY=1, X_VIP_BATCH=1).
  ExpectKept     the source's kept flows, before the opening freezes (so the opening's
                 release names none).
  RestoreBatch 0 rebuild the opening's connections in repair mode, check the listeners
                 and UDP sockets are the ones bound at prepare.
  ReleaseBatch 0 repair off, late packets and queued datagrams in, the hold released
                 minus the consumed prefix, the sockets ADOPTed by the new instance with
                 what the old one owed. The point of no return here (marker first) and
                 makes the new instance the service's.
  RestoreReleaseBatch k  (k > 0) both at once: rebuilt in repair mode, then, if that
                 worked, released as above without a round trip to the gateway between.
                 A failed rebuild releases nothing; from the release's first thaw on,
                 only forward.
  AbortBatch k   drop its hold and rebuilt sockets; its flows are dropped from now on.
                 A batch released here is not aborted: the answer is its release's.
  Abort          (before the opening's release) the whole abort.
The destination gets no "finish": it knows the kept flows (from ExpectKept, or from an
older gateway's opening release) and ends (RELEASED) when every one was released or aborted.

Facts are recorded before each effect and taken before each undo, as in
clustercore.handoff, so an ending routine run after a failed command finishes or undoes
exactly what was reached, each action at most once.
"""

from __future__ import annotations

import binascii
import dataclasses
from typing import Any

from . import batch_messages as bm
from . import messages as msgs
from . import sockwire
from .batchcommands import (
    AdoptSockets,
    HandBackConnections,
    HandBackListeners,
    HandBackUdp,
    HasChannel,
    ListKept,
    ReadIdleTimes,
    StartWithChannel,
)
from .batchcutover import OPENING, BatchDest, BatchSource
from .batchfacts import BatchDestFacts, BatchSourceFacts, peer_of
from .batchfacts import give_back as _give_back
from .batchfacts import ms as _ms
from .batchfacts import owed_from_wire as _owed
from .handoff import _check_on_service, put_back_stragglers, undo_rebuilt
from .kinds import MigrateStrategy
from .nodecommands import (
    AcceptHeld,
    AcceptWaiting,
    AdoptInstance,
    CloseDescriptors,
    CloseSilently,
    ConnectDatagramSocket,
    CountKernelDrops,
    DescribeListeners,
    DrainDatagrams,
    DropHeld,
    DumpConnections,
    ForgetInstance,
    InstallRole,
    LeaveRepair,
    Local,
    MarkReleasing,
    Note,
    OpenSockets,
    Playbook,
    PutBackDatagrams,
    ReadClock,
    ReadPackets,
    Refused,
    RemoveRoleLater,
    RestoreConnections,
    ServiceMoved,
    StopInstance,
    Thaw,
    WaitHandshakes,
    WaitSettled,
    kind_of,
    prefill_sockets,
    socket_name,
)
from .packet import TCP, UDP
from .sockstate import ServiceSockets, TcpConnState

STRATEGY = MigrateStrategy.BATCHED.value  # in Prepare.strategy and Arm.strategy

# how many times the opening looks again for half-open handshakes when old-epoch SYNs keep
# being accepted (only those sent before the epoch flip can be: a few at most); each look
# waits at most the agent's SYN_RECV wait, as the one look before did
SYN_LOOKS = 3


def _fields(reply: bm.BatchReleaseDone) -> dict:
    """A release's answer as keyword arguments (AbortBatch of a released batch repeats it)."""
    return {f.name: getattr(reply, f.name) for f in dataclasses.fields(bm.BatchReleaseDone)}


class BatchedHandoff(Playbook):
    strategy = STRATEGY
    inject_once = False  # stragglers come after every batch's commit, not once

    def __init__(self) -> None:
        self.source: BatchSourceFacts | None = None
        self.destination: BatchDestFacts | None = None

    @property
    def serves_after_end(self) -> bool:
        """A finished source with pinned connections keeps its instance and its role
        (commit() below): the program serves them until they close."""
        f = self.source
        return f is not None and f.instance is not None and f.role is not None

    @property
    def complete(self) -> bool:
        """A destination that has nothing left to receive (RELEASED)."""
        return self.destination is not None and self.destination.complete

    # ============================================================ the source

    def arm(self, m, event: msgs.Arm, local: Local, now: float):
        if not (yield HasChannel(local.instance)):
            raise Refused(f"service '{m.service}': its program did not announce the batched "
                          "handoff (X_VIP_BATCH=1 on its vip-batch channel)")
        f = self.source = BatchSourceFacts(
            cut=BatchSource(event.epoch), instance=local.instance, own=tuple(local.sockets),
            tcp_ports=tuple(port for proto, port in local.service.ports if proto == TCP),
            udp_ports=tuple(port for proto, port in local.service.ports if proto == UDP))
        f.drops_at_start = yield CountKernelDrops()
        f.role = f.cut
        yield InstallRole(m.service, f.cut)  # its packets are counted from now on
        return msgs.Done()

    def stop_accepting(self, m, event: bm.StopAccepting, now: float):
        """Before the opening: the program hands back its listeners and says which
        connections it keeps. Nothing is frozen, so this list (10,000 flows at 10,000
        connections) reaches the gateway and the destination before any hold."""
        f = self.source
        if f.opened or f.kept is not None:
            raise Refused(f"the program of '{m.service}' stopped accepting already")
        yield from self._list_kept(m, now)
        return bm.KeptListed(kept=self._kept_order(), timing_ms=dict(f.timing))

    def _list_kept(self, m, now: float):
        f = self.source
        f.syns = f.cut.syns_accepted
        if f.tcp_ports:
            # a half-closed connection cannot be rebuilt, a half-open handshake cannot move:
            # both waited for here, in one look at the kernel's table per poll, while the
            # program still serves its UDP sockets (after the flip only an old-epoch SYN
            # can open a handshake here, and the role counts those: looked again at the
            # opening only if one came)
            yield WaitSettled(f.tcp_ports)
        t0 = yield ReadClock()
        handed = yield HandBackListeners(f.instance)  # it goes on reading its UDP sockets
        f.handed = list(handed.sockets)
        held = getattr(handed, "held", None)  # what the program says it serves, if it says
        t_list = yield ReadClock()
        # the program accepts no more: the connections it holds now are what it keeps
        # serving (only fewer as they close); what completes a handshake from here on
        # waits in the listeners' queues and is the opening's. Listed before the freeze:
        # the verdict loop runs meanwhile, nothing is held for it
        if held is None and f.tcp_ports:  # the program did not say: the kernel's tables, and
            f.idle = yield ReadIdleTimes()  # sock_diag for the order (idle first)
        f.kept = tuple((yield ListKept(f.tcp_ports, (), f.instance, f.idle, held))) if f.tcp_ports else ()
        f.cut.expect([k.flow for k in f.kept])  # the set is built here, not in the hold
        # settle: the step's start (`now`) -> the hand-back (the program still serves)
        f.timing = {"settle": _ms(now, t0), "hand_back": _ms(t0, t_list),
                    "list_kept": _ms(t_list, (yield ReadClock()))}

    def _kept_order(self) -> tuple:
        """The kept connections in the order the batches take them (the longest idle
        first; sorted is stable: ties keep the kernel's order). The gateway keeps it."""
        return tuple(k.flow for k in sorted(self.source.kept, key=lambda k: -float(k.idle_ms)))

    def open_batch(self, m, event: bm.OpenBatch, now: float):
        f = self.source
        if f.opened:
            raise Refused(f"the opening of '{m.service}' was frozen already")
        listed_before = f.kept is not None  # StopAccepting: the gateway has the list
        if not listed_before:
            yield from self._list_kept(m, now)
        timing, kept, syns = ({} if listed_before else dict(f.timing)), f.kept, f.syns
        looks = 0
        while f.tcp_ports and f.cut.syns_accepted != syns and looks < SYN_LOOKS:
            # an old-epoch SYN was accepted since the listing began: its handshake may be
            # open. From the count's read to the freeze below nothing waits (no packet is
            # decided in between), and from the freeze on such a SYN is held, not accepted
            syns, looks = f.cut.syns_accepted, looks + 1
            yield WaitHandshakes(f.tcp_ports)
        t_udp = yield ReadClock()
        if f.udp_ports:
            # the UDP sockets last: their clients wait from this hand-back to the
            # destination's adoption, not for the listing of the kept connections above
            f.handed += [s for s in (yield HandBackUdp(f.instance)).sockets if s not in f.handed]
        listeners = tuple(s for s in f.handed if kind_of(s[0]) == "tcp")
        udp = tuple(s for s in f.handed if kind_of(s[0]) == "udp")
        other = [s for s in f.handed if kind_of(s[0]) not in ("tcp", "udp")]
        if other:
            f.handed = [s for s in f.handed if s not in other]
            yield CloseDescriptors(tuple(sock for _, sock in other))
            yield Note(f"open {m.service}: the program handed back {sorted(n for n, _ in other)} "
                       "with its listeners; not moved", "warning")
        t_freeze = yield ReadClock()
        timing["udp_hand_back"] = _ms(t_udp, t_freeze)
        f.accepted = list((yield AcceptWaiting(listeners))) if listeners else []
        consumed = f.cut.open((), t_freeze)  # the kept flows: given at the listing
        f.opened, f.current, f.frozen = True, OPENING, True
        states: list[TcpConnState] = []
        if f.accepted:
            states = list((yield DumpConnections(tuple(f.accepted))))
            f.in_repair = [sock for _, sock in f.accepted]
        described = (yield DescribeListeners(listeners)) if listeners else ()
        for sock in udp:
            f.drained.append((yield DrainDatagrams(sock)))
        handles = f.cut.hand_over_late(OPENING)
        late = tuple((yield ReadPackets(handles))) if handles else ()
        bundle = ServiceSockets(service=m.service, listeners=tuple(described),
                                connections=tuple(states), udp=tuple(f.drained))
        timing["frozen_to_reply"] = _ms(t_freeze, (yield ReadClock()))
        totals = bundle.totals
        yield Note(f"open {m.service}: keeps {len(kept)} connections, moves {totals['listeners']} "
                   f"listeners, {totals['udp_sockets']} UDP sockets, {len(states)} accepted; {timing}")
        # the kept list crosses this hold only if the gateway did not have it before
        return bm.OpeningDone(
            consumed=consumed, kept=() if listed_before else self._kept_order(), late_packets=late,
            sockets=sockwire.to_wire(bundle), tcp_established=len(kept) + len(states),
            tcp_listening=totals["listeners"], udp_sockets=totals["udp_sockets"], timing_ms=timing)

    def freeze_batch(self, m, event: bm.FreezeBatch, now: float):
        f, timing, b = self.source, {}, event.batch
        if not f.opening_committed:
            raise Refused(f"batch {b} of '{m.service}' before the opening committed")
        if f.current is not None:
            raise Refused(f"batch {f.current} of '{m.service}' is still frozen")
        if b in f.committed or b in f.undone or b == OPENING:
            raise Refused(f"batch {b} of '{m.service}' was frozen before")
        f.current, f.frozen, f.owed = b, False, {}
        t0 = yield ReadClock()
        handed = yield HandBackConnections(f.instance, tuple(peer_of(fl) for fl in event.flows))
        f.copies, f.owed = list(handed.sockets), dict(handed.owed)
        t_freeze = yield ReadClock()
        timing["hand_back"] = _ms(t0, t_freeze)
        consumed = f.cut.freeze(b, event.flows, t_freeze)
        f.frozen = True
        states: list[TcpConnState] = []
        if f.copies:
            states = list((yield DumpConnections(tuple(f.copies))))
            f.in_repair = [sock for _, sock in f.copies]
        handles = f.cut.hand_over_late(b)
        late = tuple((yield ReadPackets(handles))) if handles else ()
        bundle = ServiceSockets(service=m.service, connections=tuple(states))
        wire = sockwire.to_wire(bundle)
        wire["owed"] = f.owed
        timing["frozen_to_reply"] = _ms(t_freeze, (yield ReadClock()))
        if len(states) != len(event.flows):
            yield Note(f"freeze {m.service} batch {b}: {len(event.flows) - len(states)} of its "
                       f"{len(event.flows)} connections closed meanwhile")
        return bm.BatchFreezeDone(consumed=consumed, late_packets=late, sockets=wire,
                                  connections=len(states),
                                  bytes_moved=bundle.totals["queued_bytes"], timing_ms=timing)

    def commit_batch(self, m, event: Any, now: float):
        """The destination released the batch (the opening: the service is its). Also the
        way on after a failed commit command (forward only)."""
        f = self.source
        b = getattr(event, "batch", f.current)
        if b in f.committed:
            yield Note(f"repeated CommitBatch {b} for '{m.service}'")
            return msgs.CommitDone()
        if b != f.current or not f.frozen:
            raise Refused(f"commit of batch {b} of '{m.service}': it is not the frozen one")
        if not f.committing:
            f.committing = True
            plan = f.cut.commit(b)
            f.to_drop, f.forward = plan.drop, plan.forward + f.cut.take_forward()
        drop, f.to_drop = f.to_drop, ()
        if drop:
            yield DropHeld(drop)
        forward, f.forward = f.forward, ()
        late = tuple((yield ReadPackets(forward))) if forward else ()
        copies, f.copies, f.in_repair, f.owed = f.copies + f.accepted, [], [], {}
        f.accepted = []
        if copies:
            yield CloseSilently(tuple(sock for _, sock in copies))  # no FIN, no RST
        if b == OPENING:
            f.opening_committed = True
            handed, f.handed, f.drained = f.handed, [], []
            if handed:  # the program's copies; the agent keeps its own until the finish
                yield CloseDescriptors(tuple(sock for _, sock in handed))
        f.committed.add(b)
        f.current, f.frozen, f.committing = None, False, False
        return msgs.CommitDone(late_packets=late)

    def rollback_batch(self, m, event: Any, now: float):
        """THE batch undo: the gateway's RollbackBatch, or a failed freeze. Repair off, the
        connections back to the program with what it owed, then the batch's hold accepted
        in order: they stay here (pinned) for the rest of the migration."""
        f = self.source
        b = getattr(event, "batch", f.current)
        if b in f.undone or (b is not None and b != f.current):
            yield Note(f"RollbackBatch {b} for '{m.service}': nothing to undo")
            return msgs.Done()
        if b in f.committed or b == OPENING:
            raise Refused(f"batch {b} of '{m.service}' cannot be undone here")
        in_repair, f.in_repair = f.in_repair, []
        if in_repair:
            yield LeaveRepair(tuple(in_repair))
        copies, owed, f.copies, f.owed = f.copies, f.owed, [], {}
        yield from _give_back(f, copies, owed)
        frozen, f.frozen = f.frozen, False
        if frozen:
            held = f.cut.rollback(b)
            if held:
                yield AcceptHeld(held)
        if b is not None:
            f.undone.add(b)
        f.current = None
        return msgs.Done()

    def rollback(self, m, event: Any, now: float):
        """THE whole source rollback (before the opening committed): the gateway's
        Rollback, a failed arm or opening, a reconnect that says the owner stayed. The
        accepted connections leave repair mode, the drained datagrams go back first, then
        the program gets its listeners, UDP sockets and those connections back; the hold is
        accepted in arrival order; the role goes after the grace period."""
        f = self.source
        if f is None:
            return msgs.Done()
        if f.opening_committed:
            raise Refused(f"whole rollback of '{m.service}' after its opening committed: "
                          "only forward is possible")
        in_repair, f.in_repair = f.in_repair, []
        if in_repair:
            yield LeaveRepair(tuple(in_repair))
        drained, f.drained = f.drained, []
        if any(st.datagrams for st in drained):
            yield PutBackDatagrams(tuple(drained))
        back, f.handed, f.accepted = f.handed + f.accepted, [], []
        yield from _give_back(f, back, {})
        held = f.cut.rollback(OPENING)
        f.opened, f.current, f.frozen = False, None, False
        if held:
            yield AcceptHeld(held)
        role, f.role = f.role, None
        if role is not None:
            yield RemoveRoleLater(m.service, role)
        return msgs.Done()

    def commit(self, m, event: Any, now: float):
        """FinishBatched (or the registry says the service moved): every batch moved or was
        pinned. Without pinned connections the old instance stops and the role goes; with
        some, both stay (the program serves them until they close)."""
        f = self.source
        if f is None:
            return msgs.CommitDone()
        pinned = getattr(event, "pinned", 0) or len(f.undone)
        if f.current is not None:
            yield Note(f"finish of '{m.service}' with batch {f.current} frozen and not committed: "
                       "its connections are left to the destination (not handled)", "error")
        forward = f.cut.take_forward()
        late = tuple((yield ReadPackets(forward))) if forward else ()
        drops = (yield CountKernelDrops()) - f.drops_at_start
        if pinned:
            yield Note(f"finish of '{m.service}': {pinned} pinned connections stay here, served by "
                       "the old instance; its role stays", "warning")
            return msgs.CommitDone(late_packets=late, kernel_drops=drops)
        instance, f.instance = f.instance, None
        if instance is not None:
            f.to_stop = instance  # kept until stopped: a failed ForgetInstance must not spare it
            yield ForgetInstance(m.service)
        to_stop, f.to_stop = f.to_stop, None
        if to_stop is not None:
            yield StopInstance(to_stop)
        own, f.own = f.own, ()
        if own:
            yield CloseDescriptors(tuple(sock for _, sock in own))
        role, f.role = f.role, None
        if role is not None:
            yield RemoveRoleLater(m.service, role)
        return msgs.CommitDone(late_packets=late, kernel_drops=drops)

    # ============================================================ the destination

    def prepare(self, m, event: msgs.Prepare, local: Local, now: float):
        service = local.service
        f = self.destination = BatchDestFacts(service=service, vips=local.vips,
                                              cut=BatchDest(event.epoch))
        f.drops_at_start = f.drops_reported = yield CountKernelDrops()
        f.role = f.cut
        yield InstallRole(m.service, f.cut)  # hold the new epoch from now on
        f.opened = list((yield OpenSockets(tuple(service.ports))))
        timing: dict = {}
        yield from prefill_sockets(event, timing, service, local.vips)
        t0 = yield ReadClock()
        f.instance = yield StartWithChannel(service)  # ready before the first batch comes
        timing["start"] = _ms(t0, (yield ReadClock()))
        return msgs.PrepareDone(timing_ms=timing)

    def expect_kept(self, m, event: bm.ExpectKept, now: float):
        """Before the opening: the flows the source keeps (they come in later batches).
        The opening's release then names none, so they cross no hold."""
        f = self.destination
        flows = tuple(event.flows)
        if f.cut.kept is not None:  # given before (here or by the opening's release)
            if f.kept is None and frozenset(flows) == f.cut.kept:  # asked again: the same answer
                return msgs.Done()
            raise Refused(f"the kept flows of '{m.service}' were given before")
        f.cut.expect(flows)
        yield Note(f"{m.service}: the source keeps {len(flows)} connections; they come in batches")
        return msgs.Done()

    def restore_batch(self, m, event: bm.RestoreBatch, now: float):
        t0 = yield from self._restore(m, event.batch, event.sockets)
        return msgs.Done(timing_ms={"restore": _ms(t0, (yield ReadClock()))})

    def restore_release_batch(self, m, event: bm.RestoreReleaseBatch, now: float):
        """A batch after the opening: rebuilt, then released at once (no round trip to the
        gateway between: the batch's connections are frozen for one hop less). A failed
        rebuild releases nothing (end_restore); from the release on, only forward."""
        f, b = self.destination, event.batch
        if b == OPENING:
            raise Refused(f"the opening of '{m.service}' is restored and released in two steps "
                          "(the owner switch is between)")
        if b in f.replies:
            yield Note(f"repeated RestoreReleaseBatch {b} for '{m.service}': answered as the first")
            return f.replies[b]
        t0 = yield from self._restore(m, b, event.sockets)
        restore_ms = _ms(t0, (yield ReadClock()))
        f.flows, f.consumed, f.late = tuple(event.flows), dict(event.consumed), tuple(event.late_packets)
        f.releasing = True  # from here on forward only (end_restore, abort_batch)
        reply = yield from self.finish_release(m, event, now)
        reply.timing_ms["restore"] = restore_ms
        return reply

    def end_restore(self, m, event: Any, now: float):
        """After a failed RestoreReleaseBatch: the release's rest if it had begun (forward
        only), else the rebuilt sockets closed (forget_batch)."""
        if self.destination.releasing:
            return (yield from self.finish_release(m, event, now))
        return (yield from self.forget_batch(m, event, now))

    def _restore(self, m, b: int, sockets: dict):
        """Batch b's sockets rebuilt in repair mode, after every check (nothing is done for
        a refused one). Returns when it began (ReadClock)."""
        f = self.destination
        if (b == OPENING) != (f.kept is None):
            raise Refused(f"restore of batch {b} of '{m.service}' out of order")
        if f.batch is not None:
            raise Refused(f"batch {f.batch} of '{m.service}' is restored and not released")
        if b in f.replies or b in f.aborted:
            raise Refused(f"batch {b} of '{m.service}' was handled before")
        wire = dict(sockets)
        owed = _owed(wire.pop("owed", None), f"batch {b} of '{m.service}'")
        try:
            bundle = sockwire.from_wire(wire)
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise Refused(f"bad socket state for batch {b} of '{m.service}': {e}") from None
        if b == OPENING:
            have = sorted(name for name, _ in f.opened)
            want = sorted([socket_name("tcp", *s.local) for s in bundle.listeners]
                          + [socket_name("udp", *s.local) for s in bundle.udp])
            if have != want:
                raise Refused(f"restore of '{m.service}': sockets on ports {want}, prepared {have}")
        elif bundle.listeners or bundle.udp:
            raise Refused(f"batch {b} of '{m.service}' carries listeners or UDP sockets")
        _check_on_service(m.service, f, bundle.listeners, bundle.connections, bundle.udp)
        t0 = yield ReadClock()
        f.batch, f.owed, f.released, f.given = b, owed, False, False
        for st in bundle.udp:
            if st.peer is not None:
                sock = next(s for s in f.opened if s[0] == socket_name("udp", *st.local))
                yield ConnectDatagramSocket(sock, st.peer)
        conns = tuple(bundle.connections)
        if conns:  # repair mode until the release: nothing leaves this node before it
            socks = list((yield RestoreConnections(conns)))
            f.restored, f.states = socks, list(conns)
            f.in_repair = list(zip(socks, conns))
        f.datagrams = bundle.udp
        return t0

    def forget_batch(self, m, event: Any, now: float):
        """A batch's restore failed (not the opening's): its rebuilt sockets go, silently;
        the gateway's AbortBatch that follows drops its hold."""
        f = self.destination
        restored, f.restored, f.states, f.in_repair = f.restored, [], [], []
        f.batch, f.owed = None, {}
        if restored:
            yield CloseSilently(tuple(restored))
        return msgs.Done()

    def release_batch(self, m, event: bm.ReleaseBatch, now: float):
        f, b = self.destination, event.batch
        if b in f.replies:
            yield Note(f"repeated ReleaseBatch {b} for '{m.service}': answered as the first")
            return f.replies[b]
        if b != f.batch:
            raise Refused(f"release of batch {b} of '{m.service}': restored is {f.batch}")
        f.flows, f.consumed, f.late = tuple(event.flows), dict(event.consumed), tuple(event.late_packets)
        if b == OPENING and f.cut.kept is not None:
            f.flows = ()  # known since ExpectKept (a restarted gateway's journal names them again)
        if b == OPENING:  # the point of no return here: a marker that outlives the agent first
            yield MarkReleasing(m.service, m.epoch or event.epoch)
        return (yield from self.finish_release(m, event, now))

    def finish_release(self, m, event: Any, now: float):
        """The release of the current batch (and after a failed command, the rest of it:
        forward only). Repair off first (a socket in repair mode discards what it gets)."""
        f = self.destination
        b = f.batch
        t0 = yield ReadClock()
        thaw, f.in_repair = f.in_repair, []
        if thaw:
            yield Thaw(tuple(s for s, _ in thaw), tuple(st for _, st in thaw))
        yield from put_back_stragglers(f)
        if not f.released:
            f.released = True
            at = yield ReadClock()
            rel = (f.cut.open(f.flows, f.consumed, at) if b == OPENING  # flows: () if expected
                   else f.cut.release(b, f.flows, f.consumed, at))
            f.to_drop, f.to_accept, f.waited = rel.plan.drop, rel.plan.accept, dict(rel.freeze_ms)
            f.timing["held"], f.timing["released"] = len(rel.plan.drop) + len(rel.plan.accept), len(rel.plan.accept)
            f.timing["to_gate"] = _ms(t0, at)  # what this step did before its hold opened
        drop, f.to_drop = f.to_drop, ()
        if drop:
            yield DropHeld(drop)
        accept, f.to_accept = f.to_accept, ()
        if accept:
            yield AcceptHeld(accept)
        if not f.given:
            f.given = True  # asked once: a program that refused is not asked again
            named = [(socket_name("conn", *st.local), sock)
                     for sock, st in zip(f.restored, f.states)]
            if b == OPENING:
                named = list(f.opened) + named
            owed, f.owed = f.owed, {}
            if named:
                yield AdoptSockets(f.instance, tuple(named), owed)
                f.timing["given"] = _ms(t0, (yield ReadClock()))  # the program has its sockets
        restored, f.restored, f.states = f.restored, [], []
        if restored:
            yield CloseDescriptors(tuple(restored))  # the new instance holds its own
        if b == OPENING:
            f.kept = f.cut.kept
            if not f.adopted:
                f.adopted = True
                yield AdoptInstance(m.service, f.instance, tuple(f.opened))
            yield ServiceMoved(m.service, m.node)
            f.timing["moved"] = _ms(t0, (yield ReadClock()))
            if f.waited:  # said after the release: no log write in the hold
                worst = max(f.waited, key=f.waited.get)
                yield Note(f"opening of {m.service} released: {len(f.waited)} flows had packets held, "
                           f"the longest {f.waited[worst]:.1f} ms ({worst[0]} {worst[1]}:{worst[2]})")
        else:
            f.settle(f.flows)
        reply = yield from self._released(m, b, t0)
        return reply

    def _released(self, m, b: int, t0: float):
        f = self.destination
        drops = yield CountKernelDrops()
        lost, f.drops_reported = max(0, drops - f.drops_reported), drops
        if lost:
            yield Note(f"batch {b} of {m.service}: {lost} packets dropped by the kernel", "error")
        held, released = f.timing.pop("held", 0), f.timing.pop("released", 0)
        timing: dict = {}
        reply = bm.BatchReleaseDone(
            held=held, released=released, duplicates_suppressed=held - released,
            reinjected=f.reinjected, lost=lost, waited_ms=tuple(round(v, 3) for v in f.waited.values()),
            timing_ms=timing)
        f.replies[b] = reply
        f.batch, f.reinjected, f.waited, f.flows, f.consumed = None, 0, {}, (), {}
        f.releasing = False
        if f.complete:
            yield from self._end_role(m)
        # stamped last: the gateway takes this step's time after its gate opened (release -
        # to_gate) out of the batch's frozen time, so no work may follow the stamp
        timing["release"] = _ms(t0, (yield ReadClock()))
        for key in ("to_gate", "given", "moved"):
            if key in f.timing:
                timing[key] = f.timing.pop(key)
        return reply

    def _end_role(self, m):
        role, f_role = self.destination.role, None
        self.destination.role = f_role
        if role is not None:
            yield RemoveRoleLater(m.service, role)

    def abort_batch(self, m, event: Any, now: float):
        """The gateway's AbortBatch (its flows are dropped here from now on); after a
        failed command, the rest of it."""
        f = self.destination
        if isinstance(event, bm.AbortBatch):
            b, flows = event.batch, tuple(event.flows)
            if b in f.aborted:
                yield Note(f"repeated AbortBatch {b} for '{m.service}'")
                return bm.BatchAbortDone()
            if b == OPENING or f.kept is None:
                raise Refused(f"AbortBatch {b} of '{m.service}': the opening is undone by Abort")
            if b in f.replies:  # released (its answer lost on the way): forward, say so
                yield Note(f"AbortBatch {b} for '{m.service}': it was released here; answered so")
                return bm.BatchAbortDone(was_released=True, **_fields(f.replies[b]))
            if f.complete:
                raise Refused(f"AbortBatch {b} of '{m.service}': every kept connection was released or aborted")
            if f.batch == b and f.releasing:
                raise Refused(f"batch {b} of '{m.service}' is being released: it cannot be aborted")
            f.aborted.add(b)
            f.to_drop = f.cut.abort(b, flows)
            f.aborting = (b, flows)
        b, flows = f.aborting
        held, f.to_drop = f.to_drop, ()
        if held:
            yield DropHeld(held)
        if f.batch == b:
            restored, f.restored, f.states, f.in_repair = f.restored, [], [], []
            f.batch, f.owed = None, {}
            if restored:
                yield CloseSilently(tuple(restored))
        f.settle(flows)
        if f.complete:
            yield from self._end_role(m)
        return bm.BatchAbortDone()

    def abort(self, m, event: Any, now: float):
        """THE whole destination abort (before the opening's release): the hold dropped,
        the new instance (it served nothing) killed, rebuilt sockets closed silently."""
        f = self.destination
        if f is None:
            return msgs.Done()
        if f.kept is not None:
            raise Refused(f"whole abort of '{m.service}' after its opening was released: "
                          "only forward is possible")
        held = f.cut.abort(OPENING)
        if held:
            yield DropHeld(held)
        yield from undo_rebuilt(m.service, f)
        return msgs.Done()

    def end_open(self, m, event: Any, now: float):
        """The gateway no longer runs this migration and batches were still to come (a
        newer migration began, the agent stops): nothing more arrives; the role goes."""
        f = self.destination
        if f is not None and f.batch is not None:
            restored, f.restored, f.in_repair = f.restored, [], []
            if restored:
                yield CloseSilently(tuple(restored))
        yield Note(f"batched migration of '{m.service}' ended here before every batch came "
                   f"({type(event).__name__})", "warning")
        if f is not None:
            yield from self._end_role(m)
        return msgs.Done()


__all__ = ["STRATEGY", "BatchDestFacts", "BatchSourceFacts", "BatchedHandoff", "peer_of"]
