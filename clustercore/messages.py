"""Every control message of vipcluster as a type, and the one codec that puts them on the wire.

Why types: a message built from a dict with an op string is rebuilt and re-parsed in as
many places as it is used, and grep cannot find who sends what. Here each message is a
small frozen dataclass (keyword-only, checked when built, as h11's events are), its wire
name is `OP`, and `decode` is the only way in from the wire.

The wire form is one JSON object per message: `{"op": OP, **fields}` for a message, with an
integer `id` added when the sender wants a reply; a reply is `{"id", "ok": true, "result"}`
or `{"id", "ok": false, "error", "kind": "local"|"peer"}` (see transport's framing). A
request class names the type of its reply in `REPLY` (None: the result is free-form JSON
for display, e.g. status counters).

Fields are str, int, float, bool, `X | None`, tuple[str, ...], bytes / tuple[bytes, ...]
(base64 on the wire), dict / list (plain JSON, for free-form data), or a field with its
own codec (`wire=`: the consumed counts, the service table). Whose fault: building a bad
message here raises LocalControlError (our code used the API wrongly); `decode` turns
anything wrong in bytes from a peer into PeerControlError, and never raises anything else.

Groups: the agent link (gateway <-> node agent), the migration steps (gateway -> agent),
and the control API (vipctl -> gateway).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from .cutover import Flow, check_consumed, consumed_from_wire, consumed_to_wire
from .errors import LocalControlError, PeerControlError, VipError
from .ownership import Service

# integers on the wire are counts, ports, ids, pids: bounded, so a 5000-digit number is an
# error, not a slow conversion
MAX_INT = 2**63 - 1


# ---------------------------------------------------------------- field codecs


@dataclass(frozen=True)
class _Codec:
    to_wire: Callable[[Any], Any]
    from_wire: Callable[[Any], Any]  # raises PeerControlError / ValueError / TypeError / KeyError
    check: Callable[[Any, str], Any]  # a locally built value: normalised, or LocalControlError


def _services_from_wire(data: Any) -> tuple[Service, ...]:
    if not isinstance(data, list):
        raise PeerControlError("services: expected a list")
    out = []
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise PeerControlError(f"services[{i}]: expected an object")
        try:
            s = Service.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PeerControlError(f"services[{i}]: malformed service ({e})") from None
        if not all(isinstance(v, str) and v for v in (s.name, s.owner, s.exec_spec)):
            raise PeerControlError(f"services[{i}]: name, owner and exec must be strings")
        out.append(s)
    return tuple(out)


def _consumed_to_wire(consumed: Mapping[Flow, int]) -> list:
    return consumed_to_wire(consumed)


def _check_consumed(value: Any, where: str) -> Mapping[Flow, int]:
    try:
        return check_consumed(value)
    except (LocalControlError, TypeError, AttributeError) as e:
        raise LocalControlError(f"{where}: {e}") from None


def _check_services(value: Any, where: str) -> tuple[Service, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(s, Service) for s in value):
        raise LocalControlError(f"{where} must be a sequence of Service, got {_short(value)}")
    return tuple(value)


def _check_service(value: Any, where: str) -> Service:
    if not isinstance(value, Service):
        raise LocalControlError(f"{where} must be a Service, got {_short(value)}")
    return value


CONSUMED = _Codec(_consumed_to_wire, consumed_from_wire, _check_consumed)
SERVICES = _Codec(lambda ss: [s.to_dict() for s in ss], _services_from_wire, _check_services)
SERVICE = _Codec(lambda s: s.to_dict(), lambda d: _services_from_wire([d])[0], _check_service)


def wire(codec: _Codec, **kw):
    """A dataclass field with its own wire codec."""
    return field(metadata={"codec": codec}, **kw)


# ---------------------------------------------------------------- the base


class Message:
    """A control message. Subclasses are frozen keyword-only dataclasses with an OP."""

    OP: ClassVar[str] = ""
    REPLY: ClassVar[type["Message"] | None] = None

    def __post_init__(self) -> None:
        for f, kind in _schema(type(self)):
            value = getattr(self, f.name)
            codec = f.metadata.get("codec")
            if codec is not None:
                object.__setattr__(self, f.name, codec.check(value, f"{type(self).__name__}.{f.name}"))
                continue
            ok, value = _check(kind, value)
            if not ok:
                raise LocalControlError(f"{type(self).__name__}.{f.name} must be {_describe(kind)}, "
                                        f"got {_short(value)}")
            object.__setattr__(self, f.name, value)

    def to_wire(self) -> dict:
        out: dict[str, Any] = {"op": self.OP}
        for f, kind in _schema(type(self)):
            value = getattr(self, f.name)
            codec = f.metadata.get("codec")
            if codec is not None:
                out[f.name] = codec.to_wire(value)
            else:
                out[f.name] = _to_wire(kind, value)
        return out

    def fields_to_wire(self) -> dict:
        """The fields only (a reply's `result`)."""
        d = self.to_wire()
        del d["op"]
        return d


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_SCHEMAS: dict[type, list[tuple[dataclasses.Field, Any]]] = {}


def _schema(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = [(f, hints[f.name]) for f in dataclasses.fields(cls)]
        _SCHEMAS[cls] = schema
    return schema


def _check(kind: Any, value: Any) -> tuple[bool, Any]:
    """Is `value` of the field type `kind`? Returns (ok, normalised value)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True, value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return True, None
        inner = [a for a in args if a is not type(None)]
        return _check(inner[0], value) if len(inner) == 1 else (False, value)
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return type(value) is int and -MAX_INT <= value <= MAX_INT, value
    if kind is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and value == value and abs(value) < float("inf"))
        return ok, float(value) if ok else value
    if kind is str:
        return isinstance(value, str), value
    if kind is bytes:
        return isinstance(value, (bytes, bytearray)), bytes(value) if isinstance(value, (bytes, bytearray)) else value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (tuple, list)):
            return False, value
        if args[0] is float:  # one loop, not one _check per item (10,000 idle times)
            inf = float("inf")
            for v in value:
                t = type(v)
                if not (t is float or t is int) or v != v or abs(v) >= inf:
                    return False, value
            return True, tuple(map(float, value))
        items = []
        for v in value:
            ok, v = _check(args[0], v)
            if not ok:
                return False, value
            items.append(v)
        return True, tuple(items)
    if kind is dict or origin is dict:
        return isinstance(value, dict), value
    if kind is list or origin is list:
        return isinstance(value, list), value
    raise LocalControlError(f"message field type {kind!r} has no wire form")  # a bug here


def _describe(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _to_wire(kind: Any, value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, tuple):
        return [_to_wire(None, v) for v in value]
    return value


def _from_wire(kind: Any, value: Any, where: str) -> Any:
    """Undo _to_wire for one field (bytes from base64); types are checked afterwards."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return value if value is None or len(inner) != 1 else _from_wire(inner[0], value, where)
    if kind is bytes:
        return _b64(value, where)
    if origin is tuple and args and args[0] is bytes:
        if not isinstance(value, list):
            raise PeerControlError(f"{where}: expected a list of base64 strings")
        return tuple(_b64(v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise PeerControlError(f"{where}: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise PeerControlError(f"{where}: not base64") from None


# ---------------------------------------------------------------- decoding (total)

REGISTRY: dict[str, type[Message]] = {}


def message(op: str, reply: type[Message] | None = None):
    """Class decorator: a frozen keyword-only dataclass registered under `op`."""
    def wrap(cls):
        cls = dataclass(frozen=True, kw_only=True)(cls)
        cls.OP = op
        cls.REPLY = reply
        if op in REGISTRY:
            raise LocalControlError(f"two messages named {op!r}")
        REGISTRY[op] = cls
        return cls
    return wrap


class Reply(Message):
    """The result of a request, as a type (sent as the reply's `result`, without an op)."""


def reply_type(cls):
    """Class decorator for a reply: a frozen keyword-only dataclass, not registered."""
    return dataclass(frozen=True, kw_only=True)(cls)


def decode(obj: object) -> Message:
    """A message from its wire form. Anything wrong is the peer's fault: PeerControlError,
    nothing else, whatever `obj` is."""
    if not isinstance(obj, dict):
        raise PeerControlError("malformed control message: not an object")
    op = obj.get("op")
    cls = REGISTRY.get(op) if isinstance(op, str) else None
    if cls is None:
        raise PeerControlError(f"unknown message {_short(op)}")
    return decode_fields(cls, obj, skip=("op", "id"))


def decode_fields(cls: type[Message], obj: object, skip: tuple[str, ...] = ()) -> Message:
    """Build `cls` from a wire object (a message's fields or a reply's result)."""
    name = cls.OP or cls.__name__
    if not isinstance(obj, dict):
        raise PeerControlError(f"{name}: expected an object, got {_short(obj)}")
    schema = _schema(cls)
    known = {f.name for f, _ in schema}
    extra = [k for k in obj if k not in known and k not in skip]
    if extra:
        raise PeerControlError(f"{name}: unknown field {_short(sorted(map(str, extra))[0])}")
    kwargs = {}
    try:
        for f, kind in schema:
            if f.name not in obj:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise PeerControlError(f"{name}: missing field '{f.name}'")
                continue
            value = obj[f.name]
            codec = f.metadata.get("codec")
            kwargs[f.name] = codec.from_wire(value) if codec else _from_wire(kind, value, f"{name}.{f.name}")
        return cls(**kwargs)
    except PeerControlError:
        raise
    except (VipError, ValueError, TypeError, KeyError, RecursionError) as e:
        raise PeerControlError(f"{name}: {e}") from None


def decode_reply(request: Message, result: object) -> object:
    """A request's result as its REPLY type (free-form results are returned as they are)."""
    cls = type(request).REPLY
    if cls is None:
        return result
    return decode_fields(cls, {} if result is None else result)


# ---------------------------------------------------------------- replies


@reply_type
class Done(Reply):
    """A step that reports nothing but how long its parts took."""
    timing_ms: dict = field(default_factory=dict)


@reply_type
class PrepareDone(Reply):
    """The destination holds the new epoch; `endpoint` says where the source sends what
    it must (the `process` strategy's image receiver: address, files_port, page_port)."""
    endpoint: dict = field(default_factory=dict)
    timing_ms: dict = field(default_factory=dict)


@reply_type
class FreezeDone(Reply):
    consumed: Mapping[Flow, int] = wire(CONSUMED)
    late_packets: tuple[bytes, ...] = ()
    sockets: dict  # clustercore.sockwire.to_wire, with "streamed" and "app_state"
    tcp_established: int
    tcp_listening: int
    udp_sockets: int
    bytes_moved: int
    timing_ms: dict = field(default_factory=dict)


@reply_type
class ReleaseDone(Reply):
    held: int
    released: int
    duplicates_suppressed: int
    reinjected: int = 0
    lost: int = 0
    kernel_drops: int = 0
    freeze_ms: float = 0.0
    timing_ms: dict = field(default_factory=dict)
    # a restarted agent asked again finds no trace of this release (its predecessor died
    # before the first effect): nothing was released here, the counts above are all 0
    not_released: bool = False
    # the handoff's new instance: how many starts it took; if none worked, why (the
    # service is down on this node) and how many moved connections were closed with it
    start_attempts: int = 0
    service_down: str = ""
    connections_closed: int = 0


@reply_type
class CommitDone(Reply):
    late_packets: tuple[bytes, ...] = ()
    kernel_drops: int = 0
    timing_ms: dict = field(default_factory=dict)  # a lazy process migration: its pages' time


@reply_type
class Injected(Reply):
    injected: int


@reply_type
class ServiceStarted(Reply):
    pid: int | None
    fds: tuple[str, ...] = ()


@reply_type
class Reconciled(Reply):
    started: tuple[str, ...] = ()
    stopped: tuple[str, ...] = ()


# ---------------------------------------------------------------- the agent link


@message("hello")
class Hello(Message):
    """The agent's first message inside TLS: the name it claims, which must be the one its
    certificate carries (the gateway refuses and logs any other)."""
    node: str


@message("welcome")
class Welcome(Message):
    services: tuple[Service, ...] = wire(SERVICES)
    anchor: str | None = None
    epochs: dict = field(default_factory=dict)
    migrating: tuple[str, ...] = ()  # migrations the gateway runs (the rest are over)
    heartbeat_s: float = 1.0  # how often the agent must say it is alive


@message("denied")
class Denied(Message):
    error: str


@message("heartbeat")
class Heartbeat(Message):
    pass


@message("notice")
class Notice(Message):
    text: str


@message("table")
class Table(Message):
    services: tuple[Service, ...] = wire(SERVICES)
    anchor: str | None = None
    epochs: dict = field(default_factory=dict)


@message("reconcile", reply=Reconciled)
class Reconcile(Message):
    services: tuple[Service, ...] = wire(SERVICES)
    migrating: tuple[str, ...] = ()


@message("service.start", reply=ServiceStarted)
class ServiceStart(Message):
    service: Service = wire(SERVICE)


@message("service.stop")
class ServiceStop(Message):
    name: str


@message("counters")
class Counters(Message):
    pass


@reply_type
class CensusDone(Reply):
    tcp4: int = 0
    tcp6: int = 0


@message("census", reply=CensusDone)
class Census(Message):
    """To a service's owner, before a handoff migration: its established TCP connections
    on the VIPs, by family (Prepare.expect_tcp4/6)."""
    service: str


@message("health.report")
class HealthReport(Message):
    """The owner's agent: a service's check changed state (clustercore.health)."""
    service: str
    state: str  # clustercore.health.Health value
    failures: int = 0
    detail: str = ""


# graceful drain (gateway.graceful, nodeshim.drain): new flows to the destination at once,
# established ones stay with the source's conntrack until they end or the timeout


@message("drain.prepare")
class DrainPrepare(Message):
    """Destination: start an instance (service.owner is this node) and forget stale
    conntrack entries of the service's ports; its packets are still dropped here."""
    service: Service = wire(SERVICE)


@message("drain.source")
class DrainSource(Message):
    """Source: accept flows conntrack already knows, and others only while they carry the
    old epoch tag `epoch` (until the gateway's flip)."""
    service: str
    epoch: str = ""


@message("drain.dest")
class DrainDest(Message):
    """Destination: accept new flows with the new tag `epoch` (UDP ones once `udp_open`),
    drop the source's UDP flows ("ADDR:SPORT:DPORT")."""
    service: str
    epoch: str = ""
    udp_flows: tuple[str, ...] = ()
    udp_open: bool = True


@message("drain.status")
class DrainStatus(Message):
    """Source: its live flows; `baseline` (the first, after the flip): they are the ones
    the drain leaves here, and the reply lists the UDP ones."""
    service: str
    baseline: bool = False


@message("drain.end")
class DrainEnd(Message):
    """Either side: remove the drain role (back to the table's verdict); the source also
    stops its old instance when `stop`."""
    service: str
    stop: bool = False


@message("node.verdicts")
class NodeVerdicts(Message):
    action: str = "read"
    since: int = 0
    ttl: float | None = None
    limit: int | None = None


# ---------------------------------------------------------------- migration steps
# Sent by the gateway's migration machine (clustercore.migration) to the two nodes, and
# handled by the node's machine (clustercore.nodemigration). Every step names the service
# and the epoch the migration flips to.


@dataclass(frozen=True, kw_only=True)
class Step(Message):
    service: str
    epoch: str


@message("migrate.prepare", reply=PrepareDone)
class Prepare(Step):
    source: str
    # cluster-network addresses, filled in by the gateway's controller from its config
    # (the machine knows node names only): where the destination listens for the image
    # (`address`, its own) and whom it accepts it from (`source_address`)
    address: str = ""
    source_address: str = ""
    # the strategy both nodes move with, resolved by the gateway's controller (a program's
    # announcement of the fd store is known on its node only); "" = the service's own rule
    strategy: str = ""
    # the source's established TCP connections before the migration (its answer to
    # Census, filled in by the controller; 0: unknown): a handoff's destination makes
    # their sockets now, not in the hold (nodeshim.tcprepair.prefill)
    expect_tcp4: int = 0
    expect_tcp6: int = 0


@message("migrate.arm", reply=Done)
class Arm(Step):
    destination: str
    strategy: str = ""  # as in Prepare


@message("migrate.freeze", reply=FreezeDone)
class Freeze(Step):
    endpoint: dict = field(default_factory=dict)  # the destination's PrepareDone.endpoint


@message("migrate.chunk", reply=Done)
class Chunk(Message):
    """Dumped connections streamed ahead by the source, relayed by the gateway."""
    service: str
    seq: int
    count: int
    packed: bytes  # clustercore.sockwire.pack_connections
    total: int = 0  # connections the source dumps in all (0: not said): progress for vipctl


@message("migrate.restore", reply=Done)
class Restore(Step):
    sockets: dict


@message("migrate.release", reply=ReleaseDone)
class Release(Step):
    consumed: Mapping[Flow, int] = wire(CONSUMED)
    late_packets: tuple[bytes, ...] = ()


@message("migrate.commit", reply=CommitDone)
class Commit(Step):
    pass


@message("migrate.rollback", reply=Done)
class Rollback(Step):
    pass


@message("migrate.abort", reply=Done)
class Abort(Step):
    pass


@message("migrate.inject", reply=Injected)
class Inject(Step):
    packets: tuple[bytes, ...] = ()


# ---------------------------------------------------------------- the control API (vipctl)


@message("ping")
class Ping(Message):
    pass


@message("status")
class Status(Message):
    pass


@message("service.add")
class ServiceAdd(Message):
    name: str
    node: str
    ports: tuple[str, ...]
    exec: str = ""  # a command line, builtin:NAME or external; empty with `pid`
    migrate: str = "auto"  # kinds.MigrateStrategy
    sockets: str = "activation"  # kinds.Sockets
    pid: int | None = None  # adopt this running process on `node` (exec becomes adopted:PID)
    check: dict | None = None  # clustercore.health.HealthSpec.to_dict()


@message("service.remove")
class ServiceRemove(Message):
    name: str


@message("service.list")
class ServiceList(Message):
    pass


@message("verdicts")
class Verdicts(Message):
    action: str = "read"
    since: dict = field(default_factory=dict)  # node -> sequence number
    ttl: float | None = None
    limit: int | None = None


@message("migrate")
class Migrate(Message):
    name: str
    to: str
    graceful: bool = False  # no state moved: new flows to `to`, old ones finish (gateway.graceful)
    timeout_s: float | None = None  # graceful: cut what is left after this many seconds
    # this once, the batched handoff (kinds.MigrateStrategy.BATCHED) whatever the service's
    # `migrate` says: connections move in batches, each frozen only while it moves
    batched: bool = False
    batch_size: int = 0  # batched: connections per batch, fixed (0: the gateway's default)


@message("node.drain")
class NodeDrain(Message):
    node: str
    to: str | None = None
    graceful: bool = False
    timeout_s: float | None = None


@message("progress")
class Progress(Message):
    """A line of progress for a running request (carries the request's id)."""
    step: str
    detail: str


AGENT_REQUESTS = (Table, Reconcile, ServiceStart, ServiceStop, Counters, NodeVerdicts,
                  DrainPrepare, DrainSource, DrainDest, DrainStatus, DrainEnd,
                  Prepare, Arm, Freeze, Chunk, Restore, Release, Commit, Rollback, Abort, Inject)
STEPS = (Prepare, Arm, Freeze, Restore, Release, Commit, Rollback, Abort, Inject)
CONTROL_REQUESTS = (Ping, Status, ServiceAdd, ServiceRemove, ServiceList, Verdicts, Migrate,
                    NodeDrain)
