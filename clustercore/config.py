"""Configuration: one place, frozen dataclasses, every error names its field.

The CLI reads a config file's bytes, `parse_toml` turns them into a dict (or a ConfigError:
not UTF-8, not TOML), and `gateway_config_from_dict` / `node_config_from_dict` validate it.
Nothing here opens files, so the same code validates configs in tests, in the lab writer
and in the daemons. Choices (delivery, datapath) become the enums of `clustercore.kinds`.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import tomllib
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError
from .kinds import Datapath, Delivery, member

DEFAULT_CONTROL_SOCKET = "/run/vipcluster/control.sock"
DEFAULT_STATE_DIR = "/var/lib/vipcluster"
DEFAULT_AGENT_PORT = 7400
DEFAULT_GATEWAY_METRICS = "127.0.0.1:9470"  # Prometheus endpoints (docs/metrics.md); "off" disables
DEFAULT_NODE_METRICS = "127.0.0.1:9471"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_IFNAME_RE = re.compile(r"^[^\s/]{1,15}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


@dataclass(frozen=True)
class NodeEntry:
    name: str
    address: str  # the node's address on the cluster network
    mac: str  # the node's MAC on the cluster network (the gateway rewrites to it)


def vips_of(vip: str, vip6: str | None) -> tuple[str, ...]:
    """Every address the cluster serves: the VIP (IPv4 or IPv6) and, dual-stack, the IPv6 VIP."""
    return (vip,) + ((vip6,) if vip6 else ())


@dataclass(frozen=True)
class GatewayConfig:
    vip: str  # IPv4 or IPv6
    client_interface: str
    cluster_interface: str
    listen_address: str
    # the gateway's TLS identity (vipwire.pki): the cluster CA, its certificate and key
    tls_ca: str
    tls_cert: str
    tls_key: str
    nodes: tuple[NodeEntry, ...]
    listen_port: int = DEFAULT_AGENT_PORT
    control_socket: str = DEFAULT_CONTROL_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    heartbeat_s: float = 1.0
    node_timeout_s: float = 5.0
    delivery: Delivery = Delivery.BROADCAST
    vip6: str | None = None  # dual-stack: the IPv6 VIP next to an IPv4 `vip`
    metrics_address: str = DEFAULT_GATEWAY_METRICS  # HOST:PORT of /metrics, or "off"
    metrics_tls: bool = False  # /metrics over TLS 1.3, a collector's certificate required
    # two gateways (issue 11): this gateway's name, every gateway's, and the etcd
    # endpoints ("host:port") of the registry they share; one gateway: SQLite, no etcd
    name: str = "gateway"
    gateways: tuple[str, ...] = ()
    etcd_endpoints: tuple[str, ...] = ()
    migration_timeouts: tuple[tuple[str, float], ...] = ()  # (state, seconds) overrides
    # the single-owner fast path (gateway.bpf) in front of the nft table; off: nft alone
    bpf_fast_path: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "delivery", _enum_field("delivery", Delivery, self.delivery, None))

    @property
    def vips(self) -> tuple[str, ...]:
        return vips_of(self.vip, self.vip6)

    def node(self, name: str) -> NodeEntry | None:
        return next((n for n in self.nodes if n.name == name), None)


@dataclass(frozen=True)
class NodeConfig:
    name: str
    vip: str
    gateway_address: str
    # this node's TLS identity (vipwire.pki): the cluster CA, its certificate and key
    tls_ca: str
    tls_cert: str
    tls_key: str
    gateway_port: int = DEFAULT_AGENT_PORT
    queue_num: int = 0
    queue_maxlen: int = 65536
    # the hold spreads over queues queue_num .. queue_num + queue_count - 1, by flow (the
    # low bits of the source port: one flow, one queue, so its order is kept); each queue
    # holds at most queue_maxlen packets. A power of two.
    queue_count: int = 4
    state_dir: str = DEFAULT_STATE_DIR
    # the interface facing the gateway: the agent turns GRO off on it (see nodeshim.netlink)
    cluster_interface: str | None = None
    datapath: Datapath = Datapath.FAST
    # a frozen source with no gateway for this long rolls back by itself (it must outlast
    # a gateway restart: a restarted gateway finishes what it journaled)
    migration_lease_s: float = 10.0
    vip6: str | None = None  # dual-stack: the IPv6 VIP next to an IPv4 `vip`
    metrics_address: str = DEFAULT_NODE_METRICS  # HOST:PORT of /metrics, or "off"
    metrics_tls: bool = False  # /metrics over TLS 1.3, a collector's certificate required
    # keep conntrack on for the VIP's flows all the time: a graceful drain needs it (its
    # old node must know the flows that began before the drain). Off by default: with it,
    # live migrations cost clients TCP retransmissions (clustercore.fastpath.to_notrack)
    conntrack: bool = False
    # the steady-state verdict map in a tcx program on cluster_interface (nodeshim.bpfnode)
    # instead of an nft table; needs cluster_interface, datapath "fast", conntrack off
    bpf_fast_path: bool = True

    @property
    def queue_nums(self) -> range:
        return range(self.queue_num, self.queue_num + self.queue_count)

    def __post_init__(self) -> None:
        object.__setattr__(self, "datapath", _enum_field("datapath", Datapath, self.datapath, None))

    @property
    def vips(self) -> tuple[str, ...]:
        return vips_of(self.vip, self.vip6)


# --- field readers -------------------------------------------------------------------------


def _get(d: dict, key: str, source: str | None, prefix: str = "") -> Any:
    if key not in d:
        raise ConfigError(prefix + key, "missing", source)
    return d[key]


def _str(d, key, source, prefix="", default=None, pattern=None, what="a string"):
    if key not in d and default is not None:
        return default
    v = _get(d, key, source, prefix)
    if not isinstance(v, str) or not v:
        raise ConfigError(prefix + key, f"must be {what}, got {v!r}", source)
    if pattern is not None and not pattern.match(v):
        raise ConfigError(prefix + key, f"must be {what}, got {v!r}", source)
    return v


def _ipv4(d, key, source, prefix=""):
    v = _str(d, key, source, prefix, what="an IPv4 address")
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        raise ConfigError(prefix + key, f"must be an IPv4 address, got {v!r}", source) from None
    return v


def _ip(d, key, source, prefix=""):
    """An IPv4 or IPv6 address, in its canonical text (sockets report it that way)."""
    v = _str(d, key, source, prefix, what="an IPv4 or IPv6 address")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ConfigError(prefix + key, f"must be an IPv4 or IPv6 address, got {v!r}", source) from None


def _vip_pair(d, source) -> tuple[str, str | None]:
    """`vip` (IPv4 or IPv6) and, for a dual-stack cluster, `vip6` (IPv6, next to an IPv4 vip)."""
    vip = _ip(d, "vip", source)
    _check_vip(vip, "vip", source)
    if "vip6" not in d:
        return vip, None
    vip6 = _ip(d, "vip6", source)
    if ipaddress.ip_address(vip6).version != 6:
        raise ConfigError("vip6", f"must be an IPv6 address, got {vip6!r}", source)
    if ipaddress.ip_address(vip).version != 4:
        raise ConfigError("vip6", "is for a dual-stack cluster: vip must then be the IPv4 address", source)
    _check_vip(vip6, "vip6", source)
    return vip, vip6


def _check_vip(addr: str, key: str, source) -> None:
    a = ipaddress.ip_address(addr)
    if a.is_multicast or a.is_unspecified or a.is_loopback or (a.version == 6 and a.is_link_local):
        raise ConfigError(key, f"must be a unicast address, got {addr!r}", source)


def _boolean(d, key, source, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(key, f"must be true or false, got {v!r}", source)
    return v


def _int(d, key, source, lo, hi, default=None, prefix=""):
    if key not in d and default is not None:
        return default
    v = _get(d, key, source, prefix)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(prefix + key, f"must be an integer from {lo} to {hi}, got {v!r}", source)
    return v


def _float(d, key, source, lo, hi, default):
    if key not in d:
        return default
    v = d[key]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(key, f"must be a number from {lo} to {hi}, got {v!r}", source)
    return float(v)


E = TypeVar("E", bound=enum.StrEnum)


def _enum_field(key: str, kind: type[E], value: object, source: str | None) -> E:
    found = member(kind, value)
    if found is None:
        raise ConfigError(key, f"must be one of {', '.join(kind)}, got {value!r}", source)
    return found


def _choice(d, key, source, kind: type[enum.StrEnum], default: enum.StrEnum):
    return _enum_field(key, kind, d.get(key, default), source)


def _tls_fields(d: dict, source) -> dict:
    if "key_file" in d:
        raise ConfigError("key_file", "the shared cluster key is gone: give tls_ca, tls_cert and tls_key "
                          "(create them with 'vipctl pki init DIR --node NAME ...')", source)
    return {k: _str(d, k, source, what="a file path") for k in ("tls_ca", "tls_cert", "tls_key")}


def _check_known(d: dict, known: set[str], source, prefix=""):
    for k in d:
        if k not in known:
            raise ConfigError(prefix + k, "unknown field", source)


def listen_address(value: str) -> tuple[str, int] | None:
    """"HOST:PORT" (IPv6 as "[ADDR]:PORT") as (host, port); None for "off". ValueError
    says what is wrong."""
    if value == "off":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT (port 1-65535) or \"off\", got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"must be an IP address and a port (HOST:PORT) or \"off\", got {value!r}") from None
    return host, int(port)


def _metrics_address(d, source, default: str) -> str:
    v = d.get("metrics_address", default)
    if not isinstance(v, str):
        raise ConfigError("metrics_address", f"must be a string HOST:PORT or \"off\", got {v!r}", source)
    try:
        listen_address(v)
    except ValueError as e:
        raise ConfigError("metrics_address", str(e), source) from None
    return v


def _queue_count(d, source) -> int:
    n = _int(d, "queue_count", source, 1, 16, 4)
    if n & (n - 1):
        raise ConfigError("queue_count", f"must be a power of two (1, 2, 4, 8 or 16), got {n}", source)
    first = d.get("queue_num", 0)
    if isinstance(first, int) and first + n - 1 > 65535:
        raise ConfigError("queue_count", f"queues {first}..{first + n - 1} go past 65535", source)
    return n


def _migration_timeouts(d, source) -> tuple[tuple[str, float], ...]:
    """[migration_timeouts]: seconds a migration step may take, by state name (the
    defaults are clustercore.migration_messages.MigrationTimeouts'); for services whose
    steps are known to take longer."""
    from dataclasses import fields

    from .migration_messages import MigrationTimeouts

    known = {f.name for f in fields(MigrationTimeouts)}
    v = d.get("migration_timeouts", {})
    if not isinstance(v, dict):
        raise ConfigError("migration_timeouts", "must be a table of state = seconds", source)
    out = []
    for name, secs in sorted(v.items()):
        if name not in known:
            raise ConfigError(f"migration_timeouts.{name}", f"unknown step; known: {', '.join(sorted(known))}", source)
        if not isinstance(secs, (int, float)) or isinstance(secs, bool) or not 0 < secs < 3600:
            raise ConfigError(f"migration_timeouts.{name}", f"must be seconds in (0, 3600), got {secs!r}", source)
        out.append((name, float(secs)))
    return tuple(out)


# --- public parsers ------------------------------------------------------------------------


def parse_toml(data: bytes, source: str | None = None) -> dict:
    """A config file's bytes as a dict; ConfigError if they are not UTF-8 or not TOML."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("(file)", f"not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x})", source) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(file)", f"not valid TOML: {e}", source) from None
    except RecursionError:
        raise ConfigError("(file)", "not valid TOML: nested too deeply", source) from None


def gateway_config_from_dict(d: dict, source: str | None = None) -> GatewayConfig:
    if not isinstance(d, dict):
        raise ConfigError("<top>", "must be a table", source)
    _check_known(
        d,
        {"vip", "client_interface", "cluster_interface", "listen_address", "listen_port",
         "tls_ca", "tls_cert", "tls_key", "key_file", "control_socket", "state_dir", "nodes", "heartbeat_s", "node_timeout_s",
         "delivery", "vip6", "metrics_address", "metrics_tls", "migration_timeouts", "name", "gateways", "etcd_endpoints",
         "bpf_fast_path"},
        source,
    )
    client_if = _str(d, "client_interface", source, pattern=_IFNAME_RE, what="an interface name")
    cluster_if = _str(d, "cluster_interface", source, pattern=_IFNAME_RE, what="an interface name")
    if client_if == cluster_if:
        raise ConfigError("cluster_interface", "must differ from client_interface", source)
    vip, vip6 = _vip_pair(d, source)
    raw_nodes = _get(d, "nodes", source)
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ConfigError("nodes", "must be a non-empty list of [[nodes]] tables", source)
    nodes = []
    seen_names, seen_macs, seen_addrs = set(), set(), set()
    for i, n in enumerate(raw_nodes):
        p = f"nodes[{i}]."
        if not isinstance(n, dict):
            raise ConfigError(f"nodes[{i}]", "must be a table", source)
        _check_known(n, {"name", "address", "mac"}, source, p)
        name = _str(n, "name", source, p, pattern=_NAME_RE, what="a node name ([A-Za-z0-9_.-], max 32)")
        addr = _ipv4(n, "address", source, p)
        mac = _str(n, "mac", source, p, pattern=_MAC_RE, what="a lower-case MAC like 02:00:00:00:00:01")
        if int(mac[:2], 16) & 1:
            raise ConfigError(p + "mac", f"must be a unicast MAC, got {mac!r}", source)
        for value, seen, what in ((name, seen_names, "name"), (mac, seen_macs, "mac"), (addr, seen_addrs, "address")):
            if value in seen:
                raise ConfigError(p + what, f"duplicate {what} {value!r}", source)
            seen.add(value)
        nodes.append(NodeEntry(name, addr, mac))
    return GatewayConfig(
        vip=vip,
        client_interface=client_if,
        cluster_interface=cluster_if,
        listen_address=_ipv4(d, "listen_address", source),
        listen_port=_int(d, "listen_port", source, 1, 65535, DEFAULT_AGENT_PORT),
        **_tls_fields(d, source),
        control_socket=_str(d, "control_socket", source, default=DEFAULT_CONTROL_SOCKET, what="a path"),
        state_dir=_str(d, "state_dir", source, default=DEFAULT_STATE_DIR, what="a path"),
        nodes=tuple(nodes),
        heartbeat_s=_float(d, "heartbeat_s", source, 0.05, 60, 1.0),
        node_timeout_s=_float(d, "node_timeout_s", source, 0.2, 600, 5.0),
        delivery=_choice(d, "delivery", source, Delivery, Delivery.BROADCAST),
        vip6=vip6,
        metrics_address=_metrics_address(d, source, DEFAULT_GATEWAY_METRICS),
        metrics_tls=_boolean(d, "metrics_tls", source, False),
        **_gateways_fields(d, source),
        migration_timeouts=_migration_timeouts(d, source),
        bpf_fast_path=_boolean(d, "bpf_fast_path", source, True),
    )


_ENDPOINT_RE = re.compile(r"^([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:]{2,39}\]):[0-9]{1,5}$")


def _gateways_fields(d: dict, source) -> dict:
    """name, gateways, etcd_endpoints: more than one gateway needs etcd and a name among them."""
    name = _str(d, "name", source, default="gateway", pattern=_NAME_RE, what="a gateway name ([A-Za-z0-9_.-], max 32)")
    out = {"name": name}
    for key, pattern, what in (("gateways", _NAME_RE, "gateway names"), ("etcd_endpoints", _ENDPOINT_RE, '"host:port" strings')):
        v = d.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and pattern.match(x) for x in v):
            raise ConfigError(key, f"must be a list of {what}, got {v!r}", source)
        if len(set(v)) != len(v):
            raise ConfigError(key, f"has duplicates: {v!r}", source)
        out[key] = tuple(v)
    if len(out["gateways"]) > 1:
        if name not in out["gateways"]:
            raise ConfigError("name", f"must be one of gateways {list(out['gateways'])}, got {name!r}", source)
        if not out["etcd_endpoints"]:
            raise ConfigError("etcd_endpoints", "more than one gateway shares its registry in etcd: give its endpoints",
                              source)
    return out


def node_config_from_dict(d: dict, source: str | None = None) -> NodeConfig:
    if not isinstance(d, dict):
        raise ConfigError("<top>", "must be a table", source)
    _check_known(
        d,
        {"name", "vip", "gateway_address", "gateway_port", "tls_ca", "tls_cert", "tls_key", "key_file", "queue_num",
         "queue_maxlen", "queue_count", "state_dir", "cluster_interface", "datapath", "migration_lease_s",
         "metrics_address", "metrics_tls", "vip6", "conntrack", "bpf_fast_path"},
        source,
    )
    vip, vip6 = _vip_pair(d, source)
    return NodeConfig(
        name=_str(d, "name", source, pattern=_NAME_RE, what="a node name ([A-Za-z0-9_.-], max 32)"),
        vip=vip,
        vip6=vip6,
        gateway_address=_ipv4(d, "gateway_address", source),
        gateway_port=_int(d, "gateway_port", source, 1, 65535, DEFAULT_AGENT_PORT),
        **_tls_fields(d, source),
        queue_num=_int(d, "queue_num", source, 0, 65535, 0),
        queue_maxlen=_int(d, "queue_maxlen", source, 64, 1 << 20, 65536),
        queue_count=_queue_count(d, source),
        state_dir=_str(d, "state_dir", source, default=DEFAULT_STATE_DIR, what="a path"),
        cluster_interface=(_str(d, "cluster_interface", source, pattern=_IFNAME_RE, what="an interface name")
                           if "cluster_interface" in d else None),
        datapath=_choice(d, "datapath", source, Datapath, Datapath.FAST),
        migration_lease_s=_float(d, "migration_lease_s", source, 0.5, 3600, 10.0),
        metrics_address=_metrics_address(d, source, DEFAULT_NODE_METRICS),
        metrics_tls=_boolean(d, "metrics_tls", source, False),
        conntrack=_boolean(d, "conntrack", source, False),
        bpf_fast_path=_boolean(d, "bpf_fast_path", source, True),
    )
