"""The `handoff` migration strategy: the service moves by its sockets. No I/O.

It speaks the systemd file-descriptor store (clustercore.sdnotify), so any program can
take part, not only ours: on the handoff signal the old instance puts its state (a memfd
named `state`) and every socket (`tcp-PORT`, `udp-PORT`, `conn-PORT`) in the agent's fd
store with FDSTORE=1 + FDNAME=, says STOPPING=1 and waits (the agent stops it). The source dumps those
connections with TCP_REPAIR and drains those UDP sockets; the destination rebuilds them
and, at release, starts the new instance the way systemd starts a service from its fd
store: everything as LISTEN_FDS / LISTEN_FDNAMES (the builtins, nodeshim.builtins, are the
reference implementation; examples/handoff_counter.py a third party's). The packets of
the switch are decided by the cutover (clustercore.cutover): the source counts then
holds, the destination holds then releases.

Each step is a playbook (clustercore.nodecommands.Playbook) the node's machine
(clustercore.nodemigration) runs. The facts record what was done so far; the endings
(rollback, abort, commit, finish_release) work from them, so whichever step stopped, they
undo or finish exactly what it had reached, each action at most once:

- record before acting when the action must be undone even if it fails half-way (the
  role installed, the process asked to stop);
- take (clear) the fact before the undo, so a failed undo is not retried forever and the
  rest of the routine still runs.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from . import messages as msgs
from . import sockwire
from .sdnotify import STATE_FDNAME
from .nodecommands import (
    AcceptHeld,
    AcceptWaiting,
    AdoptInstance,
    CloseDescriptors,
    CloseSilently,
    ConnectDatagramSocket,
    CountKernelDrops,
    CountUdpBufferDrops,
    DecideWaiting,
    DescribeListeners,
    DrainDatagrams,
    DropHeld,
    DumpConnections,
    ForgetInstance,
    HandOver,
    HandToStandby,
    InjectPackets,
    InstallRole,
    LeaveRepair,
    LetPacketsIn,
    Local,
    LongestQueueWait,
    Named,
    Note,
    OpenSockets,
    Pause,
    Playbook,
    PutBackDatagrams,
    ReadClock,
    ReadPackets,
    ReadStateFd,
    Refused,
    RemoveRole,
    RemoveRoleLater,
    RestoreConnections,
    Resume,
    StartHandedOver,
    StartStandby,
    StopInstance,
    StreamChunk,
    Thaw,
    WaitHalfClosed,
    WaitHandshakes,
    WaitStarted,
    kind_of,
    prefill_sockets,
    resume_source,
    socket_name,
)
from .errors import VipError
from .kinds import ServiceKind, service_kind
from .packet import TCP, UDP
from .sockstate import ServiceSockets, TcpConnState, UdpSocketState

CHUNK = 256  # connections dumped (restored) between two runs of the verdict loop
# The source's dump grows its chunks 256, 512, 1024, 1024, ...: each turn of the loop
# between two (the held packets read, the chunk sent) costs the hold time. At 10,000
# connections, bench-handoff alternated with fixed 256 (6 moves each): the dump's
# median 139 -> 119 ms, the freeze 165 -> 156 ms (the slowest 200 -> 166).
DUMP_CHUNK_MAX = 1024
SYN_LOOKS = 3  # handshake checks again before a freeze, at most (old-epoch SYNs read late)
# The new instance's start at the release (past the point of no return). A start fails
# when the program cannot be started or exits before it says READY=1; the agent still
# holds every handed descriptor (the restored connections, listeners, UDP sockets, the
# state), so it is started again with the same ones: the connections survive a failed
# start. Bounded: START_ATTEMPTS starts, START_BACKOFF_S before the 2nd, 3rd...; a program
# alive but silent after START_READY_S counts as started (its health check judges it).
# Worst case about 3 x 1.5 s + 0.5 s, under the gateway's release timeout for a handoff.
START_ATTEMPTS = 3
START_BACKOFF_S = (0.1, 0.4)
START_READY_S = 1.5


def put_back_stragglers(f):
    """The source's queued datagrams (into the sockets bound at prepare) and its late
    packets, before the hold is released; shared by every strategy's release."""
    datagrams, f.datagrams = f.datagrams, ()
    if any(st.datagrams for st in datagrams):
        f.reinjected += yield PutBackDatagrams(datagrams)
    late, f.late = f.late, ()
    if late:
        f.reinjected += yield InjectPackets(late)


def undo_rebuilt(service: str, f):
    """The destination's teardown after its hold was dropped: the new instance killed, the
    rebuilt connections closed in repair mode (no FIN, no RST), the sockets bound at
    prepare closed, the role removed at once (an aborted role only drops)."""
    instance, f.instance = f.instance, None
    if instance is not None:
        yield StopInstance(instance)
    restored, f.restored, f.in_repair = f.restored, [], []
    if restored:
        yield CloseSilently(tuple(restored))
    opened, f.opened = f.opened, []
    if opened:
        yield CloseDescriptors(tuple(sock for _, sock in opened))
    role, f.role = f.role, None
    if role is not None:
        yield RemoveRole(service, role)


def prestarts(service) -> bool:
    """The destination starts the service's next instance at prepare (StartStandby):
    builtins, whose program adopts descriptors through its channel. Any other program
    gets them as LISTEN_FDS, so it starts at the release."""
    return service is not None and service_kind(service.exec_spec) is ServiceKind.BUILTIN


def waiting_first(socks, states, released_flows) -> list:
    """(socket, state) pairs, the connections whose client waits for an answer first: data
    queued for the program (its receive queue, or held packets the release let in) or
    bytes it owes. A standby takes them 250 a message and serves each message's at once:
    at 10,000 connections the last message comes ~130 ms after the first, and an idle
    client waits for nothing."""
    flows = frozenset(released_flows)

    def idle(pair) -> bool:
        st = pair[1]
        return not (st.recv_queue or st.send_queue
                    or _flow_of(st) in flows)
    return sorted(zip(socks, states), key=idle)  # stable: the dump's order otherwise


def _flow_of(st: TcpConnState) -> tuple:
    """The flow (as clustercore.packet names it) of a client's packets to this connection."""
    return (TCP, st.remote[0], st.remote[1], st.local[0], st.local[1])


def _thaw(f, pairs):
    """Repair off for these (socket, state) pairs; window probes counted in f.timing."""
    probes = yield Thaw(tuple(s for s, _ in pairs), tuple(st for _, st in pairs))
    if isinstance(probes, int):
        f.timing["window_probes"] = f.timing.get("window_probes", 0) + probes


def _ms(since: float, now: float) -> float:
    return round((now - since) * 1000.0, 2)


@dataclass
class SourceFacts:
    """What the source did so far (what its rollback or commit must undo or finish)."""

    cut: Any  # its SourceCutover
    instance: Any  # the running service
    own: tuple[Named, ...]  # the agent's own copies of its listeners and UDP sockets
    tcp_ports: tuple[int, ...]
    drops_at_start: int = 0
    armed_at: float = 0.0  # when the arm began (the queue's waits are counted from there)
    role: Any = None  # installed in the filter, until its removal is asked
    stopped: Any = None  # the instance, once asked to hand over: resumed by a rollback
    listeners: tuple[Named, ...] = ()  # what it stored in the fd store: its listeners...
    udp: tuple[Named, ...] = ()  # ...its UDP sockets...
    state: tuple[Named, ...] = ()  # ...its state memfd...
    copies: list[Named] = field(default_factory=list)  # ...its connections (and accepted ones)
    in_repair: list[Any] = field(default_factory=list)  # of those, dumped (repair mode on)
    drained: list[UdpSocketState] = field(default_factory=list)  # datagrams read out
    committed: bool = False
    to_stop: Any = None  # the old instance, from the commit's forget until it is stopped
    to_drop: tuple = ()
    forward: tuple = ()


@dataclass
class DestinationFacts:
    """What the destination did so far (what its abort, or its release, works from)."""

    service: Any
    cut: Any  # its DestCutover
    vips: tuple[str, ...] = ()  # every restored socket is on one, on one of the service's ports
    drops_at_start: int = 0
    prepared_at: float = 0.0  # when the prepare began (the queue's waits are counted from there)
    role: Any = None
    opened: list[Named] = field(default_factory=list)  # bound at prepare; ours until adopted
    instance: Any = None  # the new instance, until it is adopted as the running one
    standby: Any = None  # started at prepare with its channel only; given everything at the release
    restored: list[Any] = field(default_factory=list)  # rebuilt connections (same order as states)
    states: list[TcpConnState] = field(default_factory=list)
    in_repair: list[tuple[Any, TcpConnState]] = field(default_factory=list)
    streamed_ms: float = 0.0
    streamed_decode_ms: float = 0.0  # of which unpacking and checking the records
    datagrams: tuple[UdpSocketState, ...] = ()  # the source's UDP queues, put back at release
    app_state: bytes | None = None  # the old instance's state memfd, for the new one
    started: bool = False  # the new instance was asked to start (at release)
    start_attempts: int = 0  # how many starts it took (or were tried, if none worked)
    start_failures: list[str] = field(default_factory=list)  # why each failed start failed
    service_down: str = ""  # every start failed: why (the release reply says so)
    connections_closed: int = 0  # moved connections lost with it (closed: clients see it)
    consumed: dict = field(default_factory=dict)
    late: tuple[bytes, ...] = ()
    reinjected: int = 0
    released: bool = False
    to_drop: tuple = ()
    to_accept: tuple = ()
    timing: dict = field(default_factory=dict)


def _check_on_service(name: str, f: DestinationFacts, listeners=(), connections=(), udp=()) -> None:
    """Refuse (before anything is rebuilt) socket states that are not on the VIP and the
    service's ports: the gateway link must not make us build a connection, with its
    sequence numbers and queued bytes, on any other address or port of this node."""
    ports = {TCP: set(), UDP: set()}
    for proto, port in f.service.ports:
        ports.setdefault(proto, set()).add(port)
    for proto, states in ((TCP, listeners), (TCP, connections), (UDP, udp)):
        for st in states:
            addr, port = st.local
            if addr not in f.vips or port not in ports[proto]:
                kind = "tcp" if proto == TCP else "udp"
                raise Refused(f"restore of '{name}': a socket on {addr}:{port}/{kind} is not on the "
                              f"service's address {' or '.join(f.vips) or '(none)'} and ports")


class Handoff(Playbook):
    strategy = "handoff"

    def __init__(self) -> None:
        self.source: SourceFacts | None = None
        self.destination: DestinationFacts | None = None

    # ============================================================ the source

    def arm(self, m, event: msgs.Arm, local: Local, now: float):
        service = local.service
        f = self.source = SourceFacts(
            cut=m.cutovers.source(event.epoch), instance=local.instance, own=tuple(local.sockets),
            tcp_ports=tuple(port for proto, port in service.ports if proto == TCP), armed_at=now)
        f.drops_at_start = yield CountKernelDrops()
        f.role = f.cut
        yield InstallRole(m.service, f.cut)  # its packets reach the queue and are counted
        return msgs.Done()

    def freeze(self, m, event: msgs.Freeze, now: float):
        f, timing = self.source, {}
        t_start = yield ReadClock()
        if f.tcp_ports:
            # half-closed connections cannot be rebuilt: they finish while the service
            # runs, or the freeze is refused (the migration rolls back, nothing breaks)
            yield WaitHalfClosed(f.tcp_ports)
        t_take = yield ReadClock()
        f.stopped = f.instance
        stored = list((yield HandOver(f.instance)))
        t_handed = yield ReadClock()
        f.listeners = tuple(s for s in stored if kind_of(s[0]) == "tcp")  # tcp-PORT, tcp6-PORT
        f.udp = tuple(s for s in stored if kind_of(s[0]) == "udp")
        f.copies = [s for s in stored if kind_of(s[0]) == "conn"]
        f.state = tuple(s for s in stored if s[0] == STATE_FDNAME)
        other = [s for s in stored if s[0] != STATE_FDNAME and kind_of(s[0]) not in ("tcp", "udp", "conn")]
        if other:  # nothing we know how to move: not kept (as systemd closes what it cannot use)
            yield CloseDescriptors(tuple(sock for _, sock in other))
            yield Note(f"freeze {m.service}: the program stored descriptors named "
                       f"{sorted({n for n, _ in other})}, not moved", "warning")
        # what queued up while the program handed over is decided now (accepted and
        # counted: it lands in the stopped program's receive queues and moves with them;
        # as much as one wake-up of the loop takes, 256 packets a queue, tens at the
        # lab's rates), so the hold starts at the freeze and not at the oldest packet the
        # loop had not reached yet: 20-35 ms before it at 10,000 connections, when this
        # was LetPacketsIn (its sleep(0) resumed this step before the loop's readers ran,
        # and the next wait came after the freeze). Before the handshake check: a SYN
        # accepted here is a handshake that check then waits for
        yield DecideWaiting()
        t_let_in = yield ReadClock()
        if f.tcp_ports:
            yield WaitHandshakes(f.tcp_ports)  # a half-open handshake cannot move
        # and what came during the check. New SYNs are held; an old-epoch SYN accepted
        # here (one from before the flip, read late) is a handshake to wait for again
        syns = f.cut.syns_accepted
        yield DecideWaiting()
        looks = 0
        while f.tcp_ports and f.cut.syns_accepted != syns and looks < SYN_LOOKS:
            syns, looks = f.cut.syns_accepted, looks + 1
            yield WaitHandshakes(f.tcp_ports)
            yield DecideWaiting()
        # the process is stopped: its set of connections cannot change but by the kernel
        # adding to the accept queue, which is drained after the cutover's freeze
        t_freeze = yield ReadClock()
        timing["hand_over"] = _ms(t_take, t_freeze)
        timing["half_closed"] = _ms(t_start, t_take)
        timing["handed"], timing["let_in"] = _ms(t_take, t_handed), _ms(t_handed, t_let_in)
        # from here on every packet of the service is held, until commit or rollback
        consumed = f.cut.freeze(t_freeze)
        if f.listeners:
            f.copies += (yield AcceptWaiting(f.listeners))
        t_dump = yield ReadClock()
        states: list[TcpConnState] = []
        streamed = 0  # connections sent ahead: the destination restores them while we dump
        # the first chunk small, so the destination starts restoring early; the next ones
        # twice as large, up to DUMP_CHUNK_MAX: fewer turns of the loop in the hold
        i, size, seq = 0, CHUNK, 0
        while i < len(f.copies):
            batch = tuple(f.copies[i:i + size])
            dumped = yield DumpConnections(batch)
            f.in_repair += [sock for _, sock in batch]
            states += dumped
            if i + size < len(f.copies) and all(c.family == 4 for c in dumped):
                chunk = msgs.Chunk(service=m.service, seq=seq, count=len(dumped),
                                   packed=sockwire.pack_connections(dumped), total=len(f.copies))
                if (yield StreamChunk(chunk)):
                    streamed = len(states)
            yield LetPacketsIn()  # the kernel queue fills while we dump: let the loop run
            i, seq, size = i + size, seq + 1, min(size * 2, DUMP_CHUNK_MAX)
        t_listeners = yield ReadClock()
        timing["dump"] = _ms(t_dump, t_listeners)
        listeners = (yield DescribeListeners(f.listeners)) if f.listeners else ()
        for sock in f.udp:
            f.drained.append((yield DrainDatagrams(sock)))
        handles = f.cut.hand_over_late()
        late = tuple((yield ReadPackets(handles))) if handles else ()
        t_wire = yield ReadClock()
        whole = ServiceSockets(service=m.service, listeners=tuple(listeners),
                               connections=tuple(states), udp=tuple(f.drained))
        rest = ServiceSockets(service=m.service, listeners=tuple(listeners),
                              connections=tuple(states[streamed:]), udp=tuple(f.drained))
        wire = sockwire.to_wire(rest)  # compact: JSON per connection was the freeze's cost
        wire["streamed"] = streamed
        app_state = (yield ReadStateFd(f.state[-1][1])) if f.state else b""  # the last one stored
        wire["app_state"] = base64.b64encode(app_state).decode() if app_state else None
        t_end = yield ReadClock()
        timing["encode"] = _ms(t_wire, t_end)
        timing["frozen_to_reply"] = _ms(t_freeze, t_end)
        # the longest any packet the source accepted waited in its queue since the arm
        # (a loop held up by the hand-over leaves requests unacknowledged meanwhile)
        timing["queue_wait"] = yield LongestQueueWait(f.armed_at)
        totals = whole.totals
        yield Note(f"freeze {m.service}: {totals['connections']} connections; {timing}")
        return msgs.FreezeDone(
            consumed=consumed, late_packets=late, sockets=wire,
            tcp_established=totals["connections"], tcp_listening=totals["listeners"],
            udp_sockets=totals["udp_sockets"], bytes_moved=totals["queued_bytes"],
            timing_ms=timing)

    def commit(self, m, event: Any, now: float):
        """The destination owns the service: drop the hold, close our copies of the
        connections silently, stop the old instance. Also the way on after a failed
        commit step (past the point of no return the only way is forward)."""
        f = self.source
        if f is None:
            return msgs.CommitDone()
        t0 = yield ReadClock()
        timing = {}
        if not f.committed:
            f.committed = True
            plan = f.cut.commit()
            f.to_drop, f.forward = plan.drop, plan.forward
        drop, f.to_drop = f.to_drop, ()
        if drop:
            yield DropHeld(drop)
        forward, f.forward = f.forward, ()
        late = tuple((yield ReadPackets(forward))) if forward else ()
        copies, f.copies, f.in_repair = f.copies, [], []
        if copies:
            yield CloseSilently(tuple(sock for _, sock in copies))  # no FIN, no RST
        t_closed = yield ReadClock()
        timing["drop_hold_and_close"] = _ms(t0, t_closed)
        drops = (yield CountKernelDrops()) - f.drops_at_start
        if drops:
            yield Note(f"migration of {m.service}: the kernel dropped {drops} queued packets "
                       "on the source", "error")
        instance, f.instance, f.stopped, f.drained = f.instance, None, None, []
        if instance is not None:
            f.to_stop = instance  # kept until stopped: a failed ForgetInstance must not spare it
            yield ForgetInstance(m.service)
        to_stop, f.to_stop = f.to_stop, None
        if to_stop is not None:
            yield StopInstance(to_stop)
        t_stopped = yield ReadClock()
        timing["stop_old_instance"] = _ms(t_closed, t_stopped)  # with the drops count, forget
        own, f.own, f.listeners, f.udp, f.state = f.own + f.listeners + f.udp + f.state, (), (), (), ()
        if own:
            yield CloseDescriptors(tuple(sock for _, sock in own))
        role, f.role = f.role, None
        if role is not None:
            yield RemoveRoleLater(m.service, role)
        timing["commit"] = _ms(t0, (yield ReadClock()))
        return msgs.CommitDone(late_packets=late, kernel_drops=drops, timing_ms=timing)

    def rollback(self, m, event: Any, now: float):
        """THE source rollback: the gateway's Rollback, a lost link before the freeze, a
        reconnect or shutdown that says the owner stayed, a failed arm or freeze. The
        order matters:

        1. dumped connections leave repair mode (a window probe): they go on where they
           stopped;
        2. what it stored and our copies are closed: the process holds its own
           descriptors, and ours would keep a connection alive after the process closed it
           (the client would never get its FIN). A connection we accepted from the
           listener at the freeze has no other holder: it is closed for good (the client
           sees a FIN);
        3. drained datagrams are put back BEFORE the process runs again, so it reads them
           before anything newer;
        4. the process resumes;
        5. the hold is accepted, in arrival order (after 3: older first);
        6. the role goes after the grace period (the fast path is re-synced then).
        """
        f = self.source
        if f is None:
            return msgs.Done()
        in_repair, f.in_repair = f.in_repair, []
        if in_repair:
            yield LeaveRepair(tuple(in_repair))
        stored, f.listeners, f.udp, f.state = f.listeners + f.udp + f.state, (), (), ()
        if stored:
            yield CloseDescriptors(tuple(sock for _, sock in stored))
        yield from resume_source(m.service, f, Resume)
        return msgs.Done()

    # ============================================================ the destination

    def prepare(self, m, event: msgs.Prepare, local: Local, now: float):
        service = local.service
        f = self.destination = DestinationFacts(service=service, vips=local.vips,
                                                cut=m.cutovers.destination(event.epoch), prepared_at=now)
        f.drops_at_start = yield CountKernelDrops()
        f.role = f.cut
        yield InstallRole(m.service, f.cut)  # hold the new epoch from now on
        # the sockets are bound now (the hold keeps every packet from them): a port taken
        # here refuses the migration before anything is frozen. The new instance starts
        # at the release, with everything in LISTEN_FDS (systemd has no way to hand a
        # running program descriptors later)
        f.opened = list((yield OpenSockets(tuple(service.ports))))
        yield from prefill_sockets(event, f.timing, service, local.vips)
        if prestarts(service):
            # a builtin takes descriptors from a running instance's channel: its start
            # (the interpreter, its imports: ~100 ms) happens now, not in the stop window
            t0 = yield ReadClock()
            try:
                f.standby = yield StartStandby(service)
            except VipError as e:  # it starts at the release instead, as any program
                yield Note(f"prepare {m.service}: no standby instance ({e}); it starts at the release", "warning")
            f.timing["standby_start"] = _ms(t0, (yield ReadClock()))
        return msgs.PrepareDone()

    def chunk(self, m, event: msgs.Chunk, now: float):
        """Connections the source streamed ahead: rebuild them now, in repair mode."""
        f = self.destination
        try:
            states = sockwire.unpack_connections(event.packed)
        except ValueError as e:
            raise Refused(f"bad streamed socket state for '{m.service}': {e}") from None
        if len(states) != event.count:
            raise Refused(f"streamed chunk of '{m.service}': {len(states)} connections, "
                          f"header says {event.count}")
        _check_on_service(m.service, f, connections=states)
        f.streamed_decode_ms += _ms(now, (yield ReadClock()))
        socks = yield RestoreConnections(states)
        self._restored(socks, states)
        f.streamed_ms += _ms(now, (yield ReadClock()))
        return msgs.Done()

    def _restored(self, socks, states) -> None:
        f = self.destination
        f.restored += socks
        f.states += states
        f.in_repair += list(zip(socks, states))

    def restore(self, m, event: msgs.Restore, now: float):
        f = self.destination
        wire = dict(event.sockets)
        app_state, streamed = wire.pop("app_state", None), wire.pop("streamed", 0)
        try:
            bundle = sockwire.from_wire(wire)
            saved = base64.b64decode(app_state, validate=True) if app_state else None
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise Refused(f"bad socket state for '{m.service}': {e}") from None
        t_decoded = yield ReadClock()
        timing = {"decode": _ms(now, t_decoded)}
        # the listeners and UDP sockets were bound at prepare: they must be the ones moved
        have = sorted(name for name, _ in f.opened)
        want = sorted([socket_name("tcp", *s.local) for s in bundle.listeners]
                      + [socket_name("udp", *s.local) for s in bundle.udp])
        if have != want:
            raise Refused(f"restore of '{m.service}': sockets on ports {want}, prepared {have}")
        if len(f.states) != streamed:
            raise Refused(f"restore of '{m.service}': {len(f.states)} streamed connections "
                          f"arrived, the source sent {streamed}")
        _check_on_service(m.service, f, bundle.listeners, bundle.connections, bundle.udp)
        for st in bundle.udp:
            if st.peer is not None:
                sock = next(s for s in f.opened if s[0] == socket_name("udp", *st.local))
                yield ConnectDatagramSocket(sock, st.peer)
        # in repair mode until the release: nothing leaves this node before the point of
        # no return, and if the agent dies the sockets close without a packet
        conns = bundle.connections
        for i in range(0, len(conns), CHUNK):
            batch = tuple(conns[i:i + CHUNK])
            self._restored((yield RestoreConnections(batch)), batch)
            yield LetPacketsIn()  # the held packets keep coming in meanwhile
        timing["restore"] = _ms(t_decoded, (yield ReadClock()))
        timing["restore_streamed"] = round(f.streamed_ms, 2)
        timing["restore_streamed_decode"] = round(f.streamed_decode_ms, 2)
        f.app_state = saved or None  # the new instance gets it as its `state` memfd
        f.datagrams = bundle.udp
        yield Note(f"restore {m.service}: {len(conns)} connections; {timing}")
        return msgs.Done(timing_ms=timing)

    def release(self, m, event: msgs.Release, now: float):
        f = self.destination
        f.consumed, f.late = dict(event.consumed), tuple(event.late_packets)
        return (yield from self.finish_release(m, event, now))

    def finish_release(self, m, event: Any, now: float):
        """Release (the point of no return is behind us): repair off, the source's queued
        datagrams and late packets in first, the hold minus what the source consumed,
        then the new instance starts with the sockets, the connections and the state. After
        a failed step this goes on with the rest."""
        f = self.destination
        t0 = yield ReadClock()
        if not f.released:
            # what arrived and the loop has not read yet (it restored the dump's chunks
            # meanwhile: at 10,000 connections it read held packets up to 20-28 ms after
            # they came) is read now, and held: released below with the rest, not after the
            # thaws and the start that follow, its clients nearer their loss probes
            yield DecideWaiting()
        # out of repair mode first: a socket in repair mode discards what it gets. Only the
        # connections the hold has packets of come out before the hold is let in (at
        # 10,000 connections thawing all of them took 17-24 ms, which the oldest held
        # packet waited on top of the freeze); the rest follow before any other packet of
        # the service is accepted (settle, below). No packet is read from the queue
        # between here and then (none of these commands waits), so the held flows are
        # all there are. The source's late packets are injected into the kernel, not
        # held: with any, everything is thawed first, as before.
        thaw, f.in_repair = f.in_repair, []
        if thaw and not f.released and not f.late:
            held = f.cut.held_flows
            first = [pair for pair in thaw if _flow_of(pair[1]) in held]
            f.in_repair = [pair for pair in thaw if _flow_of(pair[1]) not in held]
            thaw = first
        if thaw:
            yield from _thaw(f, thaw)
        f.timing["thaw"] = _ms(t0, (yield ReadClock()))
        udp_errors_before = yield CountUdpBufferDrops()
        yield from put_back_stragglers(f)
        if not f.released:
            f.released = True
            t_plan = yield ReadClock()
            f.timing["released_at"] = _ms(t0, t_plan)  # where freeze_ms ends
            plan = f.cut.release(f.consumed, t_plan)
            f.to_drop, f.to_accept = plan.drop, plan.accept
        drop, f.to_drop = f.to_drop, ()
        if drop:
            yield DropHeld(drop)
        accept, f.to_accept = f.to_accept, ()
        if accept:
            yield AcceptHeld(accept)
        rest, f.in_repair = f.in_repair, []
        if rest:  # before settle: from there on a packet that comes is accepted
            t_rest = yield ReadClock()
            yield from _thaw(f, rest)
            f.timing["thaw_rest"] = _ms(t_rest, (yield ReadClock()))
        f.cut.settle()  # from here a packet read and not decided is ours (a successor accepts it)
        if not f.started:
            f.started = True  # the starts run once: a failure later on does not repeat them
            yield from self._start_new_instance(m, f)
        restored, f.restored = f.restored, []
        if restored:
            if f.service_down:  # no program took them: closed, so their clients know at once
                f.connections_closed = len(restored)
            yield CloseDescriptors(tuple(restored))  # the new instance holds its own now
        instance, f.instance = f.instance, None
        if instance is not None:
            # a dead last attempt too: the agent's watchdog restarts it from scratch (with
            # these listeners; its health check sees it), as any service that exited
            opened, f.opened = f.opened, []
            yield AdoptInstance(m.service, instance, tuple(opened))
        opened, f.opened = f.opened, []
        if opened:  # no process at all: ours would keep the ports bound (EADDRINUSE for the next start)
            yield CloseDescriptors(tuple(sock for _, sock in opened))
        role, f.role = f.role, None
        if role is not None:
            yield RemoveRoleLater(m.service, role)
        stats = f.cut.stats()
        f.timing["release"] = _ms(t0, (yield ReadClock()))
        # the longest a packet of ours waited in the queue since the prepare: the hold
        # (freeze_ms) and what was read late, held or not
        f.timing["queue_wait"] = yield LongestQueueWait(f.prepared_at)
        drops = (yield CountKernelDrops()) - f.drops_at_start
        # a full socket buffer drops at the moment we accept: count it as lost, honestly
        drops += max(0, (yield CountUdpBufferDrops()) - udp_errors_before)
        if drops:
            yield Note(f"migration of {m.service}: {drops} packets dropped by the kernel on "
                       "the destination", "error")
        yield Note(f"release {m.service}: {f.timing}")
        return msgs.ReleaseDone(
            held=stats.held, released=stats.released,
            duplicates_suppressed=stats.duplicates_suppressed, reinjected=f.reinjected,
            lost=drops, kernel_drops=drops, freeze_ms=round(stats.freeze_ms, 3),
            timing_ms=dict(f.timing), start_attempts=f.start_attempts,
            service_down=f.service_down, connections_closed=f.connections_closed)

    def _start_new_instance(self, m, f: DestinationFacts):
        """Start the new instance with everything handed over, again with the same
        descriptors if a start fails (bounded, with a backoff). Sets f.instance (an exited
        one if every start produced a process that died) and, if none started,
        f.service_down."""
        named = tuple((socket_name("conn", *st.local), sock)
                      for sock, st in waiting_first(f.restored, f.states, getattr(f.cut, "released_flows", ())))
        t0 = yield ReadClock()
        standby, f.standby = f.standby, None
        if standby is not None:
            try:
                yield HandToStandby(standby, tuple(f.opened), named, f.app_state)
            except VipError as e:  # our descriptors are still ours: start afresh with them
                yield StopInstance(standby)
                yield Note(f"release {m.service}: the standby instance did not take over ({e}); "
                           "starting a new one", "warning")
            else:
                f.instance, f.app_state, f.start_attempts = standby, None, 1
                f.timing["start"] = _ms(t0, (yield ReadClock()))
                f.timing["standby"] = 1
                return
        exited = None
        for attempt in range(1, START_ATTEMPTS + 1):
            if attempt > 1:
                yield Pause(START_BACKOFF_S[min(attempt - 2, len(START_BACKOFF_S) - 1)])
            f.start_attempts = attempt
            try:
                instance = yield StartHandedOver(f.service, tuple(f.opened), named, f.app_state)
            except VipError as e:
                f.start_failures.append(f"start {attempt}: {e}")
                continue
            f.instance = instance  # from here a failed command's way on adopts it
            check = yield WaitStarted(instance, START_READY_S)
            if check.outcome != "exited":
                f.app_state, exited = None, None
                break
            f.instance, exited = None, instance
            f.start_failures.append(f"start {attempt}: {check.detail or 'exited'}")
            yield StopInstance(instance)  # reaped (and whatever it left in its session ended)
        f.timing["start"] = _ms(t0, (yield ReadClock()))
        if f.instance is not None:
            if f.start_failures:
                yield Note(f"release {m.service}: the new instance started at attempt {f.start_attempts} "
                           f"with every handed descriptor, after: {'; '.join(f.start_failures)}", "warning")
            if check.outcome == "running":
                yield Note(f"release {m.service}: the new instance did not say READY=1 within "
                           f"{START_READY_S:g}s; counted as started", "warning")
            return
        f.instance, f.app_state = exited, None
        f.service_down = (f"the new instance did not start ({f.start_attempts} attempts: "
                          f"{'; '.join(f.start_failures)})")
        yield Note(f"release {m.service}: {f.service_down}; its {len(f.restored)} moved connections "
                   "are closed, the service is down here until restarted", "error")

    def abort(self, m, event: Any, now: float):
        """THE destination abort: the gateway's Abort, a reconnect or shutdown that says
        the migration is over, a failed prepare, chunk or restore. Nothing of it may
        reach a client: the hold is dropped, a new instance (started only at the release)
        killed, the rebuilt connections closed in repair mode (no FIN, no RST)."""
        f = self.destination
        if f is None:
            return msgs.Done()
        held = f.cut.abort()
        if held:
            yield DropHeld(held)
        standby, f.standby = f.standby, None
        if standby is not None:
            yield StopInstance(standby)
        yield from undo_rebuilt(m.service, f)
        return msgs.Done()
