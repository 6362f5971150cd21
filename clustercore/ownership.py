"""Who owns what: the service table and the per-node verdict.

The gateway keeps the authoritative `ServiceTable` (in SQLite) and pushes a snapshot of
it to every node agent. Each node's `NodeFilter` turns that snapshot into a verdict for
every packet to the VIP: ACCEPT what this node owns, DROP everything else, HOLD what a
migration asks to hold. The same `NodeFilter` runs inside the real shim (fed by the
netfilter queue) and inside the in-memory cluster used by tests and pcap replay, so the
pure model *is* the reference for the kernel data path.

Traffic that belongs to no service:
- TCP/UDP to a port no service has: dropped on every node (silence, never an RST).
- ICMP echo and other port-less protocols: accepted by exactly one node, the *anchor*
  (chosen by the gateway: the first node that is up), so `ping VIP` gets one reply.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Iterable

from .errors import LocalControlError
from .health import HealthSpec
from .packet import ICMP, ICMPV6, TCP, UDP, Packet, format_port, parse_packet


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"
    HOLD = "hold"


@dataclass(frozen=True)
class Service:
    name: str
    owner: str
    ports: tuple[tuple[int, int], ...]
    exec_spec: str
    migrate: str = "auto"  # kinds.MigrateStrategy requested at `service add`
    sockets: str = "activation"  # kinds.Sockets: who binds the VIP ports
    health: HealthSpec | None = None  # its check (clustercore.health), if any

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "owner": self.owner,
            "ports": [format_port(p) for p in self.ports],
            "exec": self.exec_spec,
            "migrate": self.migrate,
            "sockets": self.sockets,
        }
        if self.health is not None:
            d["check"] = self.health.to_dict()  # "check": the spec ("health" is a state in list/status views)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Service":
        from .packet import parse_port_spec

        check = d.get("check")
        return cls(d["name"], d["owner"], tuple(parse_port_spec(p) for p in d["ports"]), d["exec"],
                   str(d.get("migrate", "auto")), str(d.get("sockets", "activation")),
                   HealthSpec.from_dict(check) if check is not None else None)


class ServiceTable:
    """The set of services and their owners; refuses conflicting changes."""

    def __init__(self, services: Iterable[Service] = ()) -> None:
        self._services: dict[str, Service] = {}
        for s in services:
            self.add(s)

    def __iter__(self):
        return iter(sorted(self._services.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._services)

    def get(self, name: str) -> Service | None:
        return self._services.get(name)

    def port_user(self, key: tuple[int, int]) -> str | None:
        for s in self._services.values():
            if key in s.ports:
                return s.name
        return None

    def check_add(self, service: Service) -> None:
        if service.name in self._services:
            raise LocalControlError(f"service '{service.name}' already exists")
        if not service.ports:
            raise LocalControlError(f"service '{service.name}' needs at least one --port")
        if len(set(service.ports)) != len(service.ports):
            raise LocalControlError(f"service '{service.name}' lists a port twice")
        for key in service.ports:
            user = self.port_user(key)
            if user is not None:
                raise LocalControlError(
                    f"port {format_port(key)} on the VIP is already taken by service '{user}'"
                )

    def add(self, service: Service) -> None:
        self.check_add(service)
        self._services[service.name] = service

    def remove(self, name: str) -> Service:
        if name not in self._services:
            raise LocalControlError(f"unknown service '{name}'")
        return self._services.pop(name)

    def set_owner(self, name: str, owner: str) -> None:
        self._services[name] = dataclasses.replace(self._services[name], owner=owner)

    def snapshot(self) -> list[dict]:
        return [s.to_dict() for s in self]


@dataclass
class Counters:
    accepted: int = 0
    dropped: int = 0
    held: int = 0

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "dropped": self.dropped, "held": self.held}


# the counter bucket for packets that belong to no service
NO_SERVICE = "(none)"


@dataclass
class Decision:
    verdict: Verdict
    service: str | None
    packet: Packet | None


class MigrationRole:
    """What a migration needs from the filter: a per-packet verdict for one service.

    clustercore.cutover provides the real roles (source and destination); this base
    class documents the interface the filter calls.
    """

    def on_packet(self, packet: Packet, epoch: str | None, handle: object, now: float) -> Verdict:
        raise NotImplementedError

    @property
    def undecided_verdict(self) -> Verdict | None:
        """The verdict a packet of this service should get if the agent dies after reading
        it and before deciding it (or while holding it): its successor finds such packets
        by id only, with no bytes to decide them by (nodeshim.queuekeep). None: this role
        cannot tell (the successor drops them: TCP retransmits)."""
        return None

    @property
    def ended(self) -> bool:
        """The migration's outcome is carried out on this node: the role holds nothing and
        never will again, and a packet of its service is decided as the fast path will
        (accepted where the service runs, dropped elsewhere). A successor may then decide
        the packets it finds read and undecided by their bytes (nodeshim.queuekeep)."""
        return False


@dataclass
class NodeFilter:
    """The verdict of one node for every packet to the VIP."""

    node: str
    anchor: str | None = None
    services: dict[str, Service] = field(default_factory=dict)
    counters: dict[str, Counters] = field(default_factory=dict)
    roles: dict[str, MigrationRole] = field(default_factory=dict)
    _by_key: dict[tuple[int, int], str] = field(default_factory=dict)
    unparsed: int = 0

    def load(self, services: Iterable[Service], anchor: str | None) -> None:
        """Replace the table with a new snapshot from the gateway."""
        self.services = {s.name: s for s in services}
        self._by_key = {k: s.name for s in self.services.values() for k in s.ports}
        self.anchor = anchor
        for name in self.services:
            self.counters.setdefault(name, Counters())
        self.counters.setdefault(NO_SERVICE, Counters())

    def owned(self) -> list[Service]:
        return [s for s in self.services.values() if s.owner == self.node]

    def service_for(self, packet: Packet) -> str | None:
        return self._by_key.get(packet.service_key)

    def decide(self, data: bytes, epoch: str | None = None, handle: object = None,
               now: float = 0.0) -> Decision:
        packet = parse_packet(data)
        if packet is None:
            self.unparsed += 1
            # unreadable bytes: never hand them to the stack on a node that might RST
            c = self.counters.setdefault(NO_SERVICE, Counters())
            c.dropped += 1
            return Decision(Verdict.DROP, None, None)
        return self.decide_packet(packet, epoch, handle, now)

    def decide_packet(self, packet: Packet, epoch: str | None = None, handle: object = None,
                      now: float = 0.0) -> Decision:
        name = self.service_for(packet)
        if name is None:
            if packet.proto in (ICMP, ICMPV6) and packet.service_key[1] == 0:
                verdict = Verdict.ACCEPT if self.anchor == self.node else Verdict.DROP
            elif packet.proto in (TCP, UDP):
                verdict = Verdict.DROP
            else:
                verdict = Verdict.ACCEPT if self.anchor == self.node else Verdict.DROP
            self._count(NO_SERVICE, verdict)
            return Decision(verdict, None, packet)
        role = self.roles.get(name)
        if role is not None:
            verdict = role.on_packet(packet, epoch, handle, now)
        elif self.services[name].owner == self.node:
            verdict = Verdict.ACCEPT
        else:
            verdict = Verdict.DROP
        self._count(name, verdict)
        return Decision(verdict, name, packet)

    def _count(self, name: str, verdict: Verdict) -> None:
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = Counters()
        if verdict is Verdict.ACCEPT:
            c.accepted += 1
        elif verdict is Verdict.DROP:
            c.dropped += 1
        else:
            c.held += 1

    def counters_dict(self) -> dict[str, dict]:
        return {k: v.to_dict() for k, v in sorted(self.counters.items())}
