"""The node's side of a live migration: performs the steps the gateway's controller asks for.

Source node (the service's owner):
  migrate_arm      install a SourceCutover for the service (count new-epoch packets)
  migrate_freeze   quiesce the service process (builtins flush and save state, then stop;
                   other commands get SIGSTOP), wait for half-open handshakes to finish,
                   freeze the cutover (hold everything from now), take the process's
                   connections (pidfd_getfd), accept what waits in the listener, dump
                   every TCP connection (TCP_REPAIR), describe listeners, drain UDP queues,
                   hand over late old-epoch packets
  migrate_commit   drop the hold, close the old sockets silently (repair mode), kill the
                   old instance
  migrate_rollback unrepair the connections, put drained datagrams back, resume the
                   process, accept the hold in order
Destination node:
  migrate_prepare  install a DestCutover (hold new-epoch packets)
  migrate_restore  open listeners and UDP sockets, rebuild connections, start the new
                   instance *gated* (it waits on a pipe before serving, so a rollback
                   after restore cannot leave answers behind)
  migrate_release  re-inject the queued UDP datagrams and the late packets, release the
                   hold minus what the source consumed, open the gate
  migrate_abort    drop the hold, close everything silently, kill the gated instance
  migrate_inject   re-inject stragglers forwarded from the source at commit

Fault injection for the lab tests: if the file `<state_dir>/faults/<op>` exists when a
step arrives, its content says what to do: `fail` (refuse the step), `die` (the agent
exits at once, like a crash), `drop` (close the gateway connection without answering).
The file is removed when it fires.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from clustercore.cutover import (DestCutover, SourceCutover, consumed_from_wire, consumed_to_wire,
                                 packets_from_wire, packets_to_wire)
from clustercore.errors import KernelError, LocalControlError, VipError
from clustercore.packet import TCP
from clustercore.protocol import require
from clustercore import sockwire
from clustercore.sockstate import ServiceSockets

from . import pidfd, services, tcprepair, udphandoff
from .queue import kernel_drops

log = logging.getLogger("vipcluster.migrate")

REINJECT_MARK = 0x7669
ROLE_GRACE_S = 5.0
QUIESCE_TIMEOUT_S = 2.0
SYN_RECV_WAIT_S = 0.5
CHUNK = 256  # sockets dumped or restored between two runs of the verdict loop
HALF_CLOSED_WAIT_S = 1.0
READY_TIMEOUT_S = 10.0


@dataclass
class SourceSide:
    cut: SourceCutover
    rs: services.RunningService | None = None
    conns: list[socket.socket] = field(default_factory=list)  # our copies, dumped (repair on)
    udp_drained: list = field(default_factory=list)  # (socket, UdpSocketState)
    frozen: bool = False
    stopped: bool = False
    drops_at_start: int = 0


@dataclass
class DestSide:
    cut: DestCutover
    bundle: ServiceSockets | None = None
    socks: list[tuple[str, socket.socket]] = field(default_factory=list)
    conns: list[socket.socket] = field(default_factory=list)
    states: list = field(default_factory=list)  # TcpConnState of each of `conns`, same order
    chunk_ms: float = 0.0
    restored: bool = False
    state_path: str | None = None
    rs: services.RunningService | None = None
    service: object = None
    released: bool = False
    drops_at_start: int = 0


def _stat_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "X"


SYN_RECV = {"03"}
# FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING: TCP_REPAIR cannot rebuild these
HALF_CLOSED = {"04", "05", "08", "09", "0B"}


def _count_states(vip: str, ports: set[int], states: set[str]) -> int:
    """Connections on VIP:port in the given TCP states (hex codes), from /proc/net/tcp."""
    want = {f"{int.from_bytes(socket.inet_aton(vip), 'little'):08X}:{p:04X}" for p in ports}
    n = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] in states and parts[1] in want:
                    n += 1
    except OSError:
        return 0
    return n


def _udp_rcvbuf_errors() -> int:
    """Datagrams this namespace dropped because a socket's receive buffer was full."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return 0


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 2)


def inject_ip_packets(packets: list[bytes]) -> int:
    """Hand raw IPv4 packets (as captured) to the local stack, in order, via a raw socket.
    They loop through `lo`, which the queue rule skips, so they reach the socket directly."""
    if not packets:
        return 0
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, REINJECT_MARK)
        for p in packets:
            if len(p) < 20 or p[0] >> 4 != 4:
                continue
            raw.sendto(p, (socket.inet_ntoa(p[16:20]), 0))
    except OSError as e:
        raise KernelError("inject raw packets", e.errno) from None
    finally:
        raw.close()
    return len(packets)


class MigrationAgent:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.sources: dict[str, SourceSide] = {}
        self.dests: dict[str, DestSide] = {}
        self.fault_dir = os.path.join(agent.config.state_dir, "faults")

    def busy(self, name: str) -> bool:
        return name in self.sources or name in self.dests

    # --- dispatch --------------------------------------------------------------------
    async def handle(self, msg: dict):
        op = msg.get("op", "")
        handler = getattr(self, "op_" + op.removeprefix("migrate_"), None) if op.startswith("migrate_") else None
        if handler is None:
            raise LocalControlError(f"unknown request '{op}'")
        self._fault(op)
        name = require(msg, "service")
        t0 = time.monotonic()
        result = await handler(name, msg)
        log.info("%s %s done in %.1f ms", op, name, (time.monotonic() - t0) * 1000)
        return result

    def _fault(self, op: str) -> None:
        path = os.path.join(self.fault_dir, op)
        if not os.path.exists(path):
            return
        with open(path) as f:
            what = f.read().strip()
        os.unlink(path)
        log.warning("fault injection at %s: %s", op, what)
        if what == "die":
            os._exit(17)
        if what == "drop":
            if self.agent.rpc is not None:
                self.agent.rpc.close()
            raise LocalControlError(f"fault injected at {op}: connection dropped")
        raise KernelError(op, None, "fault injected")

    def _service(self, name: str):
        s = next((s for s in self.agent.filter.services.values() if s.name == name), None)
        if s is None:
            raise LocalControlError(f"unknown service '{name}' on {self.agent.config.name}")
        return s

    def _later_remove_role(self, name: str, role) -> None:
        def drop():
            if self.agent.filter.roles.get(name) is role:
                if isinstance(role, DestCutover) and role.skip_budget:
                    asyncio.get_running_loop().call_later(ROLE_GRACE_S, drop)
                    return
                del self.agent.filter.roles[name]
                self.agent.sync_datapath()  # back to the kernel fast path
        asyncio.get_running_loop().call_later(ROLE_GRACE_S, drop)

    # --- source ----------------------------------------------------------------------
    async def op_arm(self, name: str, msg: dict):
        if name in self.sources or name in self.dests:
            raise LocalControlError(f"service '{name}' is already migrating on {self.agent.config.name}")
        rs = self.agent.running.get(name)
        if rs is None:
            raise LocalControlError(f"service '{name}' does not run on {self.agent.config.name}")
        cut = SourceCutover(require(msg, "epoch"))
        self.sources[name] = SourceSide(cut, rs, drops_at_start=kernel_drops(self.agent.config.queue_num))
        self.agent.filter.roles[name] = cut
        self.agent.sync_datapath()  # the service's packets now reach the queue (and are counted)
        return {}

    async def _quiesce(self, rs: services.RunningService) -> None:
        builtin = rs.service.exec_spec.startswith("builtin:")
        os.kill(rs.pid, signal.SIGUSR1 if builtin else signal.SIGSTOP)
        deadline = time.monotonic() + QUIESCE_TIMEOUT_S
        while _stat_state(rs.pid) not in ("T", "t"):
            if time.monotonic() > deadline:
                raise KernelError("quiesce", None, f"service process {rs.pid} did not stop")
            if _stat_state(rs.pid) in ("X", "Z"):
                raise KernelError("quiesce", None, f"service process {rs.pid} exited")
            await asyncio.sleep(0.001)

    async def op_freeze(self, name: str, msg: dict):
        side = self.sources.get(name)
        if side is None:
            raise LocalControlError(f"service '{name}' is not armed for migration here")
        rs = side.rs
        vip = self.agent.config.vip
        tcp_ports = {p for proto, p in rs.service.ports if proto == TCP}
        # half-closed connections cannot be rebuilt: let them finish while the service still
        # runs; if they do not, refuse (the migration rolls back, nothing is broken)
        deadline = time.monotonic() + HALF_CLOSED_WAIT_S
        while tcp_ports and (n := _count_states(vip, tcp_ports, HALF_CLOSED)):
            if time.monotonic() > deadline:
                raise KernelError("freeze", None, f"{n} half-closed connection(s) on the service did not "
                                  f"finish within {HALF_CLOSED_WAIT_S:g}s; retry when they have")
            await asyncio.sleep(0.005)
        await self._quiesce(rs)
        side.stopped = True
        # a half-open handshake cannot move; new SYNs are held by the cutover, so wait
        deadline = time.monotonic() + SYN_RECV_WAIT_S
        while tcp_ports and _count_states(vip, tcp_ports, SYN_RECV) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        # take the process's connections now: it is stopped, so the set cannot change
        # except by the kernel adding to the accept queue (drained after the freeze)
        t_take = time.monotonic()
        listeners = [(n, s) for n, s in rs.sockets if s.type == socket.SOCK_STREAM]
        udp_socks = [(n, s) for n, s in rs.sockets if s.type == socket.SOCK_DGRAM]
        conns, names = [], []
        for fd, s in pidfd.take_sockets(rs.pid).items():
            try:
                ok = (s.type == socket.SOCK_STREAM and s.family == socket.AF_INET
                      and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                      and s.getsockname()[0] == vip and s.getsockname()[1] in tcp_ports)
            except OSError:
                ok = False
            if ok:
                conns.append(s)
                names.append(f"conn-{s.getsockname()[1]}")
            else:
                s.close()
        timing = {"take_sockets": _ms(t_take)}
        # ---- from here on synchronous: no packet is decided while we dump ----
        t_freeze = time.monotonic()
        consumed = side.cut.freeze(t_freeze)
        side.frozen = True
        for lname, ls in listeners:  # connections still waiting in the accept queue
            ls.setblocking(False)
            while True:
                try:
                    c, _ = ls.accept()
                except (BlockingIOError, InterruptedError):
                    break
                conns.append(c)
                names.append(f"conn-{ls.getsockname()[1]}")
        t_dump = time.monotonic()
        # dump in chunks, letting the verdict loop run in between: the kernel queue keeps
        # filling while we work (everything is HELD now), and must not overflow
        states = []
        streamed = 0  # connections already sent ahead to the destination
        stream = self.agent.rpc is not None
        try:
            for i in range(0, len(conns), CHUNK):
                chunk = tcprepair.dump_many(conns[i:i + CHUNK], names[i:i + CHUNK])
                states += chunk
                # stream what is complete, so the destination restores while we dump on
                if stream and i + CHUNK < len(conns) and all(c.family == 4 for c in chunk):
                    self.agent.rpc.send({"op": "migrate_chunk", "service": name, "seq": i // CHUNK,
                                         "count": len(chunk),
                                         "packed": base64.b64encode(sockwire.pack_connections(chunk)).decode()})
                    streamed = len(states)
                await asyncio.sleep(0)
        except BaseException:
            for s in conns[:len(states)]:
                try:
                    tcprepair.unrepair(s)
                except VipError:
                    pass
            raise
        timing["dump"] = _ms(t_dump)
        side.conns = conns
        listener_states = [tcprepair.dump_listener(s, n) for n, s in listeners]
        udp_states = []
        for n, s in udp_socks:
            st = udphandoff.drain_udp(s, n)
            side.udp_drained.append((s, st))
            udp_states.append(st)
        bundle = ServiceSockets(service=name, listeners=tuple(listener_states),
                                connections=tuple(states), udp=tuple(udp_states))
        rest = ServiceSockets(service=name, listeners=tuple(listener_states),
                              connections=tuple(states[streamed:]), udp=tuple(udp_states))
        late = [h.get_payload() for h in side.cut.hand_over_late()]
        t_wire = time.monotonic()
        wire = sockwire.to_wire(rest)  # compact: JSON for thousands of connections was the freeze
        wire["streamed"] = streamed
        wire["app_state"] = self._read_app_state(rs)
        timing["encode"] = _ms(t_wire)
        timing["frozen_to_reply"] = _ms(t_freeze)
        totals = bundle.totals
        log.info("freeze %s: %d connections; %s", name, totals["connections"], timing)
        return {
            "timing_ms": timing,
            "consumed": consumed_to_wire(consumed),
            "late_packets": packets_to_wire(late),
            "sockets": wire,
            "tcp_established": totals["connections"],
            "tcp_listening": totals["listeners"],
            "udp_sockets": totals["udp_sockets"],
            "bytes_moved": totals["queued_bytes"],
        }

    def _read_app_state(self, rs) -> str | None:
        path = services.state_file(self.agent.log_dir, rs.service.name)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.unlink(path)
            return base64.b64encode(data).decode()
        except FileNotFoundError:
            return None

    async def op_commit(self, name: str, msg: dict):
        return self._commit_source(name)

    def _commit_source(self, name: str) -> dict:
        side = self.sources.pop(name, None)
        if side is None:
            return {"late_packets": []}
        plan = side.cut.commit()
        for h in plan.drop:
            h.drop()
        forward = [h.get_payload() for h in plan.forward]
        tcprepair.close_many(side.conns)
        drops = kernel_drops(self.agent.config.queue_num) - side.drops_at_start
        if drops:
            log.error("migration of %s: the kernel dropped %d queued packets on the source", name, drops)
        rs = side.rs
        self.agent.running.pop(name, None)
        self.agent._record_running()
        try:
            os.killpg(rs.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rs.process.wait(2.0)
        for _, s in rs.sockets:
            s.close()
        self._later_remove_role(name, side.cut)
        return {"late_packets": packets_to_wire(forward), "kernel_drops": drops}

    async def op_rollback(self, name: str, msg: dict):
        side = self.sources.pop(name, None)
        if side is None:
            return {}
        for s in side.conns:
            tcprepair.unrepair(s)
            s.close()  # our copy only: the process keeps its own descriptor
        for s, st in side.udp_drained:  # the datagrams we read go back first, in order
            udphandoff.reinject(st.datagrams, st.local[0], st.local[1], REINJECT_MARK)
        if side.stopped and side.rs is not None:
            try:
                os.killpg(side.rs.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for h in side.cut.rollback():
            h.accept()
        self._later_remove_role(name, side.cut)
        return {}

    # --- destination -----------------------------------------------------------------
    async def op_prepare(self, name: str, msg: dict):
        if name in self.sources or name in self.dests:
            raise LocalControlError(f"service '{name}' is already migrating on {self.agent.config.name}")
        if name in self.agent.running:
            raise LocalControlError(f"service '{name}' already runs on {self.agent.config.name}")
        service = self._service(name)
        if not service.exec_spec.startswith("builtin:"):
            raise LocalControlError(f"service '{name}': only builtin services can be migrated yet "
                                    "(a command-line service would need the state hook and the gate)")
        cut = DestCutover(require(msg, "epoch"))
        side = DestSide(cut, service=service, drops_at_start=kernel_drops(self.agent.config.queue_num))
        self.dests[name] = side
        self.agent.filter.roles[name] = cut
        self.agent.sync_datapath()  # the service's packets now reach the queue (and are held)
        # start the new instance now, gated, with its listeners and UDP sockets bound
        # (the hold keeps every packet from them): the interpreter's start-up is then
        # long over when the release comes, and no client waits for it
        try:
            side.socks = services.open_sockets(self.agent.config.vip, service.ports)
            side.rs = services.spawn(service, list(side.socks), self.agent.log_dir, gated=True)
            # and wait until it is up (its start-up must not compete with the freeze)
            await services.wait_ready(side.rs, READY_TIMEOUT_S)
        except BaseException:
            self._discard_dest(side)
            raise
        return {}

    async def op_chunk(self, name: str, msg: dict):
        """Connections streamed ahead by the source: rebuild them now (repair mode)."""
        side = self.dests.get(name)
        if side is None:
            raise LocalControlError(f"service '{name}' is not prepared for migration here")
        if side.restored:
            raise LocalControlError(f"chunk for '{name}' after its restore")
        try:
            states = sockwire.unpack_connections(base64.b64decode(require(msg, "packed"), validate=True))
        except (ValueError, binascii.Error) as e:
            raise LocalControlError(f"bad streamed socket state: {e}") from None
        if len(states) != msg.get("count"):
            raise LocalControlError(f"streamed chunk of '{name}': {len(states)} connections, header says {msg.get('count')}")
        t0 = time.monotonic()
        try:
            side.conns += tcprepair.restore_many(states, thaw=False)
        except BaseException:
            self._discard_dest(side)
            raise
        side.states += states
        side.chunk_ms += _ms(t0)
        return {}

    async def op_restore(self, name: str, msg: dict):
        side = self.dests.get(name)
        if side is None:
            raise LocalControlError(f"service '{name}' is not prepared for migration here")
        t0 = time.monotonic()
        wire = dict(require(msg, "sockets", dict))
        app_state = wire.pop("app_state", None)
        try:
            bundle = sockwire.from_wire(wire)
        except (ValueError, KeyError, TypeError) as e:
            raise LocalControlError(f"bad socket state: {e}") from None
        side.bundle = bundle
        timing = {"decode": _ms(t0)}
        try:
            if side.rs is None:
                raise LocalControlError(f"service '{name}' has no instance prepared here")
            # the listeners and UDP sockets were opened at prepare: they must be the ones moved
            have = sorted(s.getsockname()[1] for _, s in side.socks)
            want = sorted([st.local[1] for st in bundle.listeners] + [st.local[1] for st in bundle.udp])
            if have != want:
                raise LocalControlError(f"restore of '{name}': sockets on ports {want}, prepared {have}")
            for st in bundle.udp:
                if st.peer is not None:
                    udp = next(s for _, s in side.socks if s.type == socket.SOCK_DGRAM and s.getsockname()[1] == st.local[1])
                    udp.connect(st.peer)
            # stay in repair mode until release: nothing leaves this node before the
            # point of no return, and if we die the sockets close without a packet
            t_restore = time.monotonic()
            conns = bundle.connections
            if len(side.states) != wire.get("streamed", 0):
                raise LocalControlError(f"restore of '{name}': {len(side.states)} streamed connections "
                                        f"arrived, the source sent {wire.get('streamed')}")
            for i in range(0, len(conns), CHUNK):  # chunks: let the held packets in meanwhile
                side.conns += tcprepair.restore_many(conns[i:i + CHUNK], thaw=False)
                await asyncio.sleep(0)
            side.states += list(conns)
            timing["restore"] = _ms(t_restore)
            timing["restore_streamed"] = round(side.chunk_ms, 2)
            if app_state:
                path = services.state_file(self.agent.log_dir, name) + ".in"
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(base64.b64decode(app_state))
                side.state_path = path  # handed to the instance over the gate at release
            side.restored = True
        except BaseException:
            self._discard_dest(side)
            raise
        # we keep the listeners and UDP sockets, as for any service we run
        side.rs.sockets = list(side.socks)
        log.info("restore %s: %d connections; %s", name, len(bundle.connections), timing)
        return {"timing_ms": timing}

    async def op_release(self, name: str, msg: dict):
        side = self.dests.get(name)
        if side is None or not side.restored:
            raise LocalControlError(f"service '{name}' is not restored here")
        # out of repair mode first: a socket in repair mode discards what it receives
        t0 = time.monotonic()
        tcprepair.thaw_many(side.conns, side.states)
        timing = {"thaw": _ms(t0)}
        udp_errors_before = _udp_rcvbuf_errors()
        reinjected = 0
        for st in side.bundle.udp:  # into the UDP socket bound at prepare (same VIP:port)
            reinjected += udphandoff.reinject(st.datagrams, st.local[0], st.local[1], REINJECT_MARK)
        reinjected += inject_ip_packets(list(packets_from_wire(msg.get("late_packets", []))))
        plan = side.cut.release(consumed_from_wire(require(msg, "consumed", list)), time.monotonic())
        for h in plan.drop:
            h.drop()
        for h in plan.accept:
            h.accept()
        named = [(st.name or f"conn-{st.local[1]}", s) for st, s in zip(side.states, side.conns)]
        services.open_gate(side.rs, named, state_path=side.state_path)
        for s in side.conns:
            s.close()  # the new instance holds its own descriptors now
        side.conns = []
        side.released = True
        # the new instance is a normal running service from now on
        self.agent.running[name] = side.rs
        self.agent.restarts[name] = 0
        self.agent._record_running()
        self.dests.pop(name, None)
        self._later_remove_role(name, side.cut)
        st = side.cut.stats()
        timing["release"] = _ms(t0)
        drops = kernel_drops(self.agent.config.queue_num) - side.drops_at_start
        # a full socket buffer drops at the moment we accept: count it as lost, honestly
        drops += max(0, _udp_rcvbuf_errors() - udp_errors_before)
        if drops:
            log.error("migration of %s: %d packets dropped by the kernel on the destination", name, drops)
        log.info("release %s: %s", name, timing)
        return {"timing_ms": timing, "held": st.held, "released": st.released, "duplicates_suppressed": st.duplicates_suppressed,
                "reinjected": reinjected, "lost": drops, "kernel_drops": drops,
                "freeze_ms": round(st.freeze_ms, 3)}

    async def op_abort(self, name: str, msg: dict):
        side = self.dests.pop(name, None)
        if side is None:
            return {}
        for h in side.cut.abort():
            h.drop()
        self._discard_dest(side)
        if self.agent.filter.roles.get(name) is side.cut:
            del self.agent.filter.roles[name]
            self.agent.sync_datapath()
        return {}

    def _discard_dest(self, side: DestSide) -> None:
        if side.rs is not None:
            try:
                os.killpg(side.rs.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            side.rs.process.wait(2.0)
            services.close_gate(side.rs)
        tcprepair.close_many(side.conns)  # silently, whatever state they are in
        side.conns = []
        for _, s in side.socks:
            s.close()
        side.socks = []

    async def op_inject(self, name: str, msg: dict):
        n = inject_ip_packets(list(packets_from_wire(msg.get("packets", []))))
        return {"injected": n}

    def forget_except(self, running: set[str]) -> None:
        """After a reconnection: end (abort / roll back) every migration the gateway does
        not run any more. The registry's owner already says who won."""
        self.abort_all("the gateway no longer runs this migration", keep=running)

    def abort_all(self, why: str, keep: set[str] = frozenset()) -> None:
        for name in [n for n in self.dests if n not in keep]:
            log.warning("aborting the migration of %s here: %s", name, why)
            side = self.dests.pop(name)
            for h in side.cut.abort():
                h.drop()
            self._discard_dest(side)
        for name, side in list(self.sources.items()):
            if name in keep:
                continue
            if side.cut.phase == "committed":
                continue
            svc = self.agent.filter.services.get(name)
            if side.frozen and svc is not None and svc.owner != self.agent.config.name:
                # the registry already names the new owner: the migration went forward
                log.warning("committing the migration of %s here (owner is %s): %s", name, svc.owner, why)
                self._commit_source(name)
                continue
            log.warning("rolling back the migration of %s here: %s", name, why)
            # leave the old instance running where it was
            for s in side.conns:
                try:
                    tcprepair.unrepair(s)
                except VipError:
                    pass
            if side.stopped and side.rs is not None:
                try:
                    os.killpg(side.rs.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            for s, st in side.udp_drained:
                try:
                    udphandoff.reinject(st.datagrams, st.local[0], st.local[1], REINJECT_MARK)
                except VipError:
                    pass
            for h in side.cut.rollback():
                h.accept()
            del self.sources[name]

