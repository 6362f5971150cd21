"""The `process` migration strategy: the whole program moves, through criu. No I/O.

For programs that know nothing of vipcluster (nginx, redis-server, dnsmasq, a user's own
server). The program runs in its own PID namespace and session (nodeshim.criu
.spawn_isolated), so its tree can be checkpointed with `criu dump --leave-stopped` and
restored on another node with the same PIDs inside a fresh namespace. What criu carries:
memory, files, listening and established TCP sockets with their queues. What it does not,
and is done here with the handoff's commands: UDP receive queues (drained through pidfd
copies before the dump, re-injected on the destination - or put back on a rollback).

The packets of the switch are the cutover's (clustercore.cutover), exactly as for the
handoff: the source counts then holds, the destination holds then releases. The source's
hold IS the network lock (criu's own is skipped: `--network-lock skip`).

  destination prepare  hold the new epoch; start the image receiver; reply its endpoint
                       (PrepareDone.endpoint), which the gateway hands to the source in
                       Freeze.endpoint
  source arm           count the new epoch
  source freeze        connect to the destination's receiver and wait till it is ready
                       (ConnectImage, before the hold); hold everything; SIGSTOP
                       the tree (criu records the stopped state, so the copy is
                       restored stopped); drain the UDP queues; dump,
                       pages streamed to the destination; reply the counts, the drained
                       datagrams and the image bytes
  destination restore  wait for the verified image; criu restore (the copy stays stopped)
  destination release  re-inject the drained datagrams and late packets; release the
                       hold minus what the source consumed; repair off / SIGCONT the copy
                       (ThawProcess); adopt it
  source commit        drop the hold; kill the frozen source (its repair-mode sockets
                       vanish: no FIN, no RST)
  source rollback      put the drained datagrams back BEFORE it runs; repair off and
                       SIGCONT (proctree.thaw); accept the hold
  destination abort    drop the hold; cancel the receiver; a restored copy: its TCP
                       sockets into repair mode first, then SIGKILL (nothing reaches a
                       client); the image removed

Lazy pages (memory_mode: a large program, both nodes able): the freeze's dump carries
everything but the memory pages and keeps serving them (ImageSent.pages); the copy runs
at the release and pulls its pages from the frozen source. So the commit kills the
source only after its last page was served (StopAfterPages), and a rollback ends the
page server before the thaw (EndPageServer).

Anything criu refuses is a KernelError with criu's reason in one line: the step fails,
the source rolls back and serves on. Facts work as in clustercore.handoff: recorded before
an effect that needs undoing, taken before the undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import messages as msgs
from . import sockwire
from .handoff import put_back_stragglers
from .nodecommands import (
    AcceptHeld,
    AdoptInstance,
    CancelReceiver,
    CloseDescriptors,
    CloseImageLink,
    ConnectImage,
    CountKernelDrops,
    CountUdpBufferDrops,
    DiscardImage,
    DrainDatagrams,
    DropHeld,
    DumpProcess,
    EndPageServer,
    ForgetInstance,
    ImageSent,
    InstallRole,
    Local,
    Named,
    Note,
    Playbook,
    ProcessRestored,
    ReadClock,
    ReadPackets,
    Refused,
    RemoveRole,
    RemoveRoleLater,
    RestoreProcess,
    SilenceProcess,
    StartImageReceiver,
    StopAfterPages,
    StopInstance,
    StopTree,
    TakeDatagramSockets,
    ThawProcess,
    resume_source,
    WaitAccepted,
    WaitSettled,
)
from .packet import TCP, UDP
from .sockstate import ServiceSockets, UdpSocketState

PROCESS_KEY = "process"  # FreezeDone.sockets[PROCESS_KEY]: what the restore needs besides sockets
LAZY_ENV = "VIPCLUSTER_LAZY_PAGES"  # "off" in a node agent's environment: every image is copied
LAZY_MIN_BYTES = 64 << 20  # a tree with this much resident memory or more moves with lazy pages


def memory_mode(resident_bytes: int, *, source_lazy: bool, destination_lazy: bool,
                tls: bool = False, threshold: int = LAZY_MIN_BYTES) -> tuple[str, str]:
    """How a process image's memory moves: ("lazy" | "copy", why). Lazy (post-copy) pages
    shorten the freeze to the image without its pages, but leave the destination's copy
    depending on the source until every page has arrived; for a small program the freeze
    is short anyway and copying keeps the source free at once. Lazy needs userfaultfd and
    criu's pipes on both nodes, and no TLS (criu cannot do it on a socket it is given)."""
    if not source_lazy:
        return "copy", "the source cannot serve lazy pages"
    if not destination_lazy:
        return "copy", "the destination cannot take lazy pages (no userfaultfd?)"
    if tls:
        return "copy", "lazy pages are not used with TLS"
    if resident_bytes < threshold:
        return "copy", f"{resident_bytes >> 20} MiB resident, under the lazy threshold of {threshold >> 20} MiB"
    return "lazy", f"{resident_bytes >> 20} MiB resident, at or over {threshold >> 20} MiB"


def _ms(since: float, now: float) -> float:
    return round((now - since) * 1000.0, 2)


@dataclass
class SourceFacts:
    cut: Any
    instance: Any
    tcp_ports: tuple[int, ...]
    udp_ports: tuple[int, ...]
    drops_at_start: int = 0
    role: Any = None
    stopped: Any = None  # the tree, once asked to stop (or dumped): thawed by a rollback
    copies: list[Named] = field(default_factory=list)  # our pidfd copies of its UDP sockets
    drained: list[UdpSocketState] = field(default_factory=list)
    committed: bool = False
    to_stop: Any = None  # the old instance, from the commit's forget until it is stopped
    to_drop: tuple = ()
    forward: tuple = ()
    pages: Any = None  # a lazy dump's page server, until every page is served or it is ended
    link: Any = None  # ConnectImage's connections to the destination, until the dump takes them


@dataclass
class DestinationFacts:
    service: Any
    cut: Any
    drops_at_start: int = 0
    role: Any = None
    receiver: Any = None  # the image receive, until the image is restored or given up
    instance: Any = None  # the restored copy, until adopted
    stopped: Any = None  # the restored copy, until it is let run (ThawProcess)
    datagrams: tuple[UdpSocketState, ...] = ()
    consumed: dict = field(default_factory=dict)
    late: tuple[bytes, ...] = ()
    reinjected: int = 0
    released: bool = False
    to_drop: tuple = ()
    to_accept: tuple = ()
    timing: dict = field(default_factory=dict)


class ProcessMigration(Playbook):
    strategy = "process"

    def __init__(self) -> None:
        self.source: SourceFacts | None = None
        self.destination: DestinationFacts | None = None

    # ============================================================ the source

    def arm(self, m, event: msgs.Arm, local: Local, now: float):
        service = local.service
        f = self.source = SourceFacts(
            cut=m.cutovers.source(event.epoch), instance=local.instance,
            tcp_ports=tuple(port for proto, port in service.ports if proto == TCP),
            udp_ports=tuple(port for proto, port in service.ports if proto == UDP))
        f.drops_at_start = yield CountKernelDrops()
        f.role = f.cut
        yield InstallRole(m.service, f.cut)
        return msgs.Done()

    def freeze(self, m, event: msgs.Freeze, now: float):
        f, timing = self.source, {}
        endpoint = dict(event.endpoint or {})
        if not endpoint:
            raise Refused(f"freeze of '{m.service}': no image endpoint from the destination")
        # connected and answered before the source holds anything (the destination's page
        # server starts meanwhile): none of it inside the freeze. (Connecting at the arm,
        # before the flip, was tried: a destination agent killed in criu's restore then
        # cost the rolled-back source 6-8 UDP datagrams in tests/lab/test_process_strategy's
        # fault cases, cause not found; reverted.)
        t0 = yield ReadClock()
        f.link = yield ConnectImage(f.instance, endpoint)
        t_connected = yield ReadClock()
        if f.tcp_ports:
            yield WaitSettled(f.tcp_ports)  # criu moves established connections only
        t_freeze = yield ReadClock()
        timing["connect"], timing["settle"] = _ms(t0, t_connected), _ms(t_connected, t_freeze)
        # from here on every packet of the service is held: the hold is criu's network lock
        consumed = f.cut.freeze(t_freeze)
        if f.tcp_ports:
            yield WaitAccepted(f.tcp_ports)  # the program takes its accept queue first
        f.stopped = f.instance
        yield StopTree(f.instance)
        t_stopped = yield ReadClock()
        timing["stop"] = _ms(t_freeze, t_stopped)
        if f.udp_ports:
            f.copies = list((yield TakeDatagramSockets(f.instance, f.udp_ports)))
            for sock in f.copies:
                f.drained.append((yield DrainDatagrams(sock)))
            copies, f.copies = f.copies, []
            if copies:  # the program holds its own; ours would keep the port bound here
                yield CloseDescriptors(tuple(s for _, s in copies))
        t_dump = yield ReadClock()
        timing["drain"] = _ms(t_stopped, t_dump)
        link, f.link = f.link, None  # the dump takes it over, whatever happens
        sent: ImageSent = yield DumpProcess(f.instance, endpoint, f.tcp_ports, link=link)
        f.pages = sent.pages
        t_dumped = yield ReadClock()
        timing.update(dump=round(sent.dump_ms, 2), criu_frozen=round(sent.frozen_ms, 2),
                      transfer=round(sent.transfer_ms, 2), memory=sent.memory)
        timing.update(dict(sent.criu_ms or {}))  # criu's own split, where it gives one
        handles = f.cut.hand_over_late()
        late = tuple((yield ReadPackets(handles))) if handles else ()
        bundle = ServiceSockets(service=m.service, listeners=(), connections=(),
                                udp=tuple(f.drained))
        wire = sockwire.to_wire(bundle)
        wire[PROCESS_KEY] = {"output_pipe": sent.output_pipe, "image_bytes": sent.image_bytes}
        t_end = yield ReadClock()
        timing["frozen_to_reply"] = _ms(t_freeze, t_end)
        timing["dump_and_transfer"] = _ms(t_dump, t_dumped)
        yield Note(f"freeze {m.service}: image {sent.image_bytes} bytes, memory {sent.memory} "
                   f"({sent.memory_why}), {sent.tcp_established} connections; {timing}")
        return msgs.FreezeDone(
            consumed=consumed, late_packets=late, sockets=wire,
            tcp_established=sent.tcp_established, tcp_listening=sent.tcp_listening,
            udp_sockets=len(f.drained), bytes_moved=sent.image_bytes, timing_ms=timing)

    def commit(self, m, event: Any, now: float):
        """The copy runs on the destination: drop the hold, kill the frozen source (its
        sockets are in repair mode: they vanish without a FIN or RST)."""
        f = self.source
        if f is None:
            return msgs.CommitDone()
        if not f.committed:
            f.committed = True
            plan = f.cut.commit()
            f.to_drop, f.forward = plan.drop, plan.forward
        drop, f.to_drop = f.to_drop, ()
        if drop:
            yield DropHeld(drop)
        forward, f.forward = f.forward, ()
        late = tuple((yield ReadPackets(forward))) if forward else ()
        drops = (yield CountKernelDrops()) - f.drops_at_start
        if drops:
            yield Note(f"migration of {m.service}: the kernel dropped {drops} queued packets "
                       "on the source", "error")
        instance, f.instance, f.stopped, f.drained = f.instance, None, None, []
        if instance is not None:
            f.to_stop = instance  # kept until stopped: a failed ForgetInstance must not spare it
            yield ForgetInstance(m.service)
        to_stop, f.to_stop = f.to_stop, None
        pages, f.pages = f.pages, None
        timing = {}
        if to_stop is not None and pages is not None:
            # the copy runs, but pulls the pages it has not yet from this frozen instance
            served = yield StopAfterPages(to_stop, pages)
            timing = {"memory": "lazy", "pages_after_freeze": served if served is not None else "still serving"}
        elif to_stop is not None:
            yield StopInstance(to_stop)
        role, f.role = f.role, None
        if role is not None:
            yield RemoveRoleLater(m.service, role)
        return msgs.CommitDone(late_packets=late, kernel_drops=drops, timing_ms=timing)

    def rollback(self, m, event: Any, now: float):
        """THE source rollback. Our UDP copies closed; the drained datagrams put back while
        the tree is still stopped (it reads them before anything newer); repair off and
        SIGCONT (proctree.thaw; also right after a dump that criu itself undid); the hold
        accepted in arrival order; the role removed after the grace period."""
        f = self.source
        if f is None:
            return msgs.Done()
        link, f.link = f.link, None
        if link is not None:
            yield CloseImageLink(link)  # connected, never dumped over
        pages, f.pages = f.pages, None
        if pages is not None:
            yield EndPageServer(pages)  # criu resumes the tree; ThawProcess follows
        yield from resume_source(m.service, f, ThawProcess)
        return msgs.Done()

    # ============================================================ the destination

    def prepare(self, m, event: msgs.Prepare, local: Local, now: float):
        if not (event.address and event.source_address):
            raise Refused(f"prepare of '{m.service}': no cluster addresses for the image transfer")
        f = self.destination = DestinationFacts(service=local.service,
                                                cut=m.cutovers.destination(event.epoch))
        f.drops_at_start = yield CountKernelDrops()
        f.role = f.cut
        yield InstallRole(m.service, f.cut)  # hold the new epoch from now on
        rx = yield StartImageReceiver(m.service, event.source, event.address, event.source_address)
        f.receiver = rx.receiver
        return msgs.PrepareDone(endpoint=dict(rx.endpoint))

    def restore(self, m, event: msgs.Restore, now: float):
        f = self.destination
        wire = dict(event.sockets)
        extra = wire.pop(PROCESS_KEY, None)
        try:
            bundle = sockwire.from_wire(wire)
        except (ValueError, KeyError, TypeError) as e:
            raise Refused(f"bad socket state for '{m.service}': {e}") from None
        if not isinstance(extra, dict):
            raise Refused(f"restore of '{m.service}': the source sent no process image")
        if bundle.connections or bundle.listeners:
            raise Refused(f"restore of '{m.service}': a process image carries its own TCP sockets")
        pipe = extra.get("output_pipe")
        t0 = yield ReadClock()
        restored: ProcessRestored = yield RestoreProcess(f.service, f.receiver, pipe if isinstance(pipe, str) else None)
        f.instance = f.stopped = restored.instance
        t1 = yield ReadClock()
        receiver, f.receiver = f.receiver, None
        if receiver is not None:
            yield DiscardImage(receiver)  # restored: the image is no longer needed
        f.datagrams = bundle.udp
        timing = {"restore": _ms(t0, t1), **restored.timing_ms}
        f.timing.update(timing)
        yield Note(f"restore {m.service}: {timing}")
        return msgs.Done(timing_ms=timing)

    def release(self, m, event: msgs.Release, now: float):
        f = self.destination
        f.consumed, f.late = dict(event.consumed), tuple(event.late_packets)
        return (yield from self.finish_release(m, event, now))

    def finish_release(self, m, event: Any, now: float):
        """Past the point of no return: the source's queued datagrams and late packets into
        the stopped copy's sockets first, the hold minus what the source consumed, then the
        copy runs. After a failed command this goes on with the rest."""
        f = self.destination
        t0 = yield ReadClock()
        udp_errors_before = yield CountUdpBufferDrops()
        yield from put_back_stragglers(f)
        if not f.released:
            f.released = True
            plan = f.cut.release(f.consumed, (yield ReadClock()))
            f.to_drop, f.to_accept = plan.drop, plan.accept
        drop, f.to_drop = f.to_drop, ()
        if drop:
            yield DropHeld(drop)
        accept, f.to_accept = f.to_accept, ()
        if accept:
            yield AcceptHeld(accept)
        f.cut.settle()  # from here a packet read and not decided is ours (a successor accepts it)
        stopped, f.stopped = f.stopped, None
        if stopped is not None:
            yield ThawProcess(stopped, restored=True)  # criu's restore left repair mode: SIGCONT
        instance, f.instance = f.instance, None
        if instance is not None:
            yield AdoptInstance(m.service, instance, ())
        role, f.role = f.role, None
        if role is not None:
            yield RemoveRoleLater(m.service, role)
        stats = f.cut.stats()
        f.timing["release"] = _ms(t0, (yield ReadClock()))
        drops = (yield CountKernelDrops()) - f.drops_at_start
        drops += max(0, (yield CountUdpBufferDrops()) - udp_errors_before)
        if drops:
            yield Note(f"migration of {m.service}: {drops} packets dropped by the kernel on "
                       "the destination", "error")
        yield Note(f"release {m.service}: {f.timing}")
        return msgs.ReleaseDone(
            held=stats.held, released=stats.released,
            duplicates_suppressed=stats.duplicates_suppressed, reinjected=f.reinjected,
            lost=drops, kernel_drops=drops, freeze_ms=round(stats.freeze_ms, 3),
            timing_ms=dict(f.timing))

    def abort(self, m, event: Any, now: float):
        """THE destination abort: nothing of it may reach a client."""
        f = self.destination
        if f is None:
            return msgs.Done()
        held = f.cut.abort()
        if held:
            yield DropHeld(held)
        receiver, f.receiver = f.receiver, None
        if receiver is not None:
            yield CancelReceiver(receiver)
        instance, f.instance, f.stopped = f.instance, None, None
        if instance is not None:
            try:
                yield SilenceProcess(instance)  # repair mode on: its close sends nothing
            finally:
                yield StopInstance(instance)
        role, f.role = f.role, None
        if role is not None:
            yield RemoveRole(m.service, role)
        return msgs.Done()
