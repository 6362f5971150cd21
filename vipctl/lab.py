"""The lab: a whole cluster in network namespaces on one machine.

    <prefix>-client   198.51.100.2/24 on eth0, default route via the gateway
    <prefix>-gw       198.51.100.1/24 on `client0`; 192.0.2.1/24 on bridge `br0`,
                      one veth per node enslaved to br0 (the "switch")
    <prefix>-nK       192.0.2.(10+K)/24 on eth0 (MAC 02:00:00:00:01:KK), default via
                      192.0.2.1; the node agent puts the VIP 203.0.113.10 on lo

The lab only builds links and writes config files, then starts the real daemons
(`vipctl gateway run`, `vipctl node run`) inside the namespaces: nothing in gateway/ or
nodeshim/ knows it runs in a lab. Nothing is connected to the root namespace.

State lives in /run/vipcluster/<prefix>/ (configs, the PKI in pki/, registry, logs, pids).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pyroute2 import NetNS, netns

from clustercore.config import DEFAULT_CONTROL_SOCKET
from clustercore.errors import LocalControlError, VipError
from clustercore.kinds import Datapath, Delivery
from nodeshim import criu
from vipwire import pki

from . import lab6, labha, nsutil
from .client import call

VIP = "203.0.113.10"
CLIENT_NET = "198.51.100"
CLUSTER_NET = "192.0.2"
RUN_ROOT = "/run/vipcluster"
GATEWAY_METRICS = "127.0.0.1:9470"  # inside the gateway's namespace (docs/metrics.md)
NODE_METRICS = "127.0.0.1:9471"  # inside each node's namespace


@dataclass(frozen=True)
class Lab:
    prefix: str = "vip"
    nodes: int = 3
    delivery: Delivery = Delivery.BROADCAST  # the gateway's
    datapath: Datapath = Datapath.FAST  # every node's
    ipv6: bool = False  # dual-stack: vipctl.lab6 adds the IPv6 side and the VIP6
    ipv6_only: bool = False  # the IPv6 side only serves: the VIP is the VIP6 (implies ipv6)
    log_format: str = "human"  # the daemons' --log-format (vipwire.logs)
    gateways: int = 1  # 2: two gateways, keepalived and etcd (vipctl.labha)
    # the gateway's [migration_timeouts] ((state, seconds), ...): tests that stretch a step
    migration_timeouts: tuple = ()
    conntrack: bool = False  # every node's `conntrack` (graceful drains need it)
    bpf_fast_path: bool = True  # the gateway's (gateway.bpf); False: its nft table alone (before)
    node_bpf: bool = True  # every node's verdict map in a tcx program (nodeshim.bpfnode); False: nft's

    def __post_init__(self) -> None:
        object.__setattr__(self, "delivery", Delivery(self.delivery))
        object.__setattr__(self, "datapath", Datapath(self.datapath))
        object.__setattr__(self, "ipv6", self.ipv6 or self.ipv6_only)

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-client"

    @property
    def gw_ns(self) -> str:
        return f"{self.prefix}-gw"

    def node_name(self, k: int) -> str:
        return f"n{k}"

    def node_ns(self, k: int) -> str:
        return f"{self.prefix}-n{k}"

    def node_mac(self, k: int) -> str:
        return f"02:00:00:00:01:{k:02x}"

    def node_addr(self, k: int) -> str:
        return f"{CLUSTER_NET}.{10 + k}"

    @property
    def namespaces(self) -> list[str]:
        return [self.client_ns, self.gw_ns] + [self.node_ns(k) for k in range(1, self.nodes + 1)]

    @property
    def state_dir(self) -> str:
        return os.path.join(RUN_ROOT, self.prefix)

    @property
    def control_socket(self) -> str:
        if self.gateways > 1:
            return labha.control_sockets(self)  # both; vipctl picks the one serving
        if self.prefix == "vip":
            return DEFAULT_CONTROL_SOCKET
        return os.path.join(self.state_dir, "control.sock")

    @property
    def pki_dir(self) -> str:
        return os.path.join(self.state_dir, "pki")

    @property
    def client_addr(self) -> str:
        return f"{CLIENT_NET}.2"


# --- topology ------------------------------------------------------------------------


def build_links(lab: Lab) -> None:
    """The lab's namespaces, links, addresses and routes; no daemon, no config (the bench
    builds its plain-routing baseline on this)."""
    for ns in lab.namespaces:
        netns.create(ns)
    if lab.ipv6:
        lab6.prepare(lab)  # no DAD on the links about to be made
    with NetNS(lab.gw_ns) as gw:
        gw.link("add", ifname="client0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": lab.client_ns})
        gw.link("add", ifname="br0", kind="bridge")
        br = gw.link_lookup(ifname="br0")[0]
        for k in range(1, lab.nodes + 1):
            gw.link("add", ifname=f"n{k}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": lab.node_ns(k)})
            port = gw.link_lookup(ifname=f"n{k}")[0]
            gw.link("set", index=port, master=br, state="up")
        c0 = gw.link_lookup(ifname="client0")[0]
        gw.addr("add", index=c0, address=f"{CLIENT_NET}.1", prefixlen=24)
        gw.addr("add", index=br, address=f"{CLUSTER_NET}.1", prefixlen=24)
        for idx in (c0, br, gw.link_lookup(ifname="lo")[0]):
            gw.link("set", index=idx, state="up")
    with NetNS(lab.client_ns) as c:
        eth = c.link_lookup(ifname="eth0")[0]
        c.addr("add", index=eth, address=lab.client_addr, prefixlen=24)
        for idx in (eth, c.link_lookup(ifname="lo")[0]):
            c.link("set", index=idx, state="up")
        c.route("add", dst="default", gateway=f"{CLIENT_NET}.1")
    for k in range(1, lab.nodes + 1):
        with NetNS(lab.node_ns(k)) as n:
            eth = n.link_lookup(ifname="eth0")[0]
            n.link("set", index=eth, address=lab.node_mac(k))
            n.addr("add", index=eth, address=lab.node_addr(k), prefixlen=24)
            for idx in (eth, n.link_lookup(ifname="lo")[0]):
                n.link("set", index=idx, state="up")
            n.route("add", dst="default", gateway=f"{CLUSTER_NET}.1")


def wire_like_client(lab: Lab) -> None:
    """A veth hands the client's TSO super-packets along unsegmented; a real wire carries
    MTU-sized frames. Turn segmentation offload off on the client's side so the lab's
    gateway sees what a real one sees. And let the client reuse its TIME_WAIT ports, as a
    busy client host does (below)."""
    exec_in(lab.client_ns, ["ethtool", "-K", "eth0", "tso", "off", "gso", "off"], capture_output=True, check=False)
    # A load of 10,000 connections closed by the client leaves 10,000 in TIME_WAIT there for
    # a minute, and the next load's connects searched past them for a free port: 20-30 s of
    # a core for 10,000 connects (4 s in a fresh namespace). Reusing a TIME_WAIT port for a
    # new connection (timestamps tell the segments apart) is what a busy client host does.
    exec_in(lab.client_ns, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], capture_output=True, check=False)


def _write_configs(lab: Lab) -> dict[str, str]:
    os.makedirs(lab.state_dir, mode=0o700, exist_ok=True)
    pki.init(lab.pki_dir, [lab.node_name(k) for k in range(1, lab.nodes + 1)])
    gw_tls = pki.paths(lab.pki_dir, "gateway")
    paths = {}
    nodes = "".join(
        f'\n[[nodes]]\nname = "{lab.node_name(k)}"\naddress = "{lab.node_addr(k)}"\nmac = "{lab.node_mac(k)}"\n'
        for k in range(1, lab.nodes + 1)
    )
    gw = (
        f'# written by `vipctl lab up` for the lab "{lab.prefix}"\n'
        f'{lab6.vip_lines(lab, VIP)}client_interface = "client0"\ncluster_interface = "br0"\n'
        f'listen_address = "{CLUSTER_NET}.1"\nlisten_port = 7400\n'
        f'tls_ca = "{gw_tls.ca_cert}"\ntls_cert = "{gw_tls.cert}"\ntls_key = "{gw_tls.key}"\n'
        f'control_socket = "{lab.control_socket}"\nstate_dir = "{lab.state_dir}/gateway"\n'
        f'delivery = "{lab.delivery}"\nmetrics_address = "{GATEWAY_METRICS}"\n'
        f'{"" if lab.bpf_fast_path else "bpf_fast_path = false"+chr(10)}{nodes}'
    )
    if lab.migration_timeouts:
        gw += "\n[migration_timeouts]\n" + "".join(f"{k} = {float(v)}\n" for k, v in lab.migration_timeouts)
    paths["gateway"] = os.path.join(lab.state_dir, "gateway.toml")
    with open(paths["gateway"], "w") as f:
        f.write(gw)
    for k in range(1, lab.nodes + 1):
        name = lab.node_name(k)
        paths[name] = os.path.join(lab.state_dir, f"{name}.toml")
        with open(paths[name], "w") as f:
            f.write(node_config_text(lab, name, "`vipctl lab up`", lab6.vip_lines(lab, VIP), f"{CLUSTER_NET}.1",
                                     NODE_METRICS))
    return paths


def node_config_text(lab: Lab, name: str, writer: str, vip_lines: str, gateway_address: str,
                     metrics_address: str) -> str:
    """A lab node's agent configuration (TOML); `vip_lines` the vip (and vip6) lines."""
    node_tls = pki.paths(lab.pki_dir, "node", name)
    return (
        f'# written by {writer} for the lab "{lab.prefix}"\n'
        f'name = "{name}"\n{vip_lines}gateway_address = "{gateway_address}"\n'
        f'gateway_port = 7400\nqueue_num = 0\n'
        f'tls_ca = "{node_tls.ca_cert}"\ntls_cert = "{node_tls.cert}"\ntls_key = "{node_tls.key}"\n'
        f'state_dir = "{lab.state_dir}/{name}"\ncluster_interface = "eth0"\n'
        f'datapath = "{lab.datapath}"\nmetrics_address = "{metrics_address}"\n'
        f'conntrack = {"true" if lab.conntrack else "false"}\n'
        f'bpf_fast_path = {"true" if lab.node_bpf else "false"}\n'
    )


def _spawn_supervisor(lab: Lab) -> int:
    """The lab's Restart=always (vipctl.supervise): it starts the daemons and restarts them."""
    log_dir = os.path.join(lab.state_dir, "logs")
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with open(os.path.join(log_dir, "supervisor.log"), "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "vipctl.supervise", lab.state_dir],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, env=env)
    return proc.pid


def _wait_pids(lab: Lab, supervisor: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while daemon_pids(lab).get("supervisor") != supervisor:
        if time.monotonic() > deadline or not _alive(supervisor):
            raise LocalControlError(f"the lab's supervisor did not start; see {lab.state_dir}/logs/supervisor.log")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def restarts(lab: Lab) -> dict[str, dict]:
    """The supervisor's record: {daemon: {"pid", "restarts", "last_exit"}}."""
    try:
        with open(os.path.join(lab.state_dir, "supervisor.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _pids_file(lab: Lab) -> str:
    return os.path.join(lab.state_dir, "pids.json")


def daemon_pids(lab: Lab) -> dict[str, int]:
    """{"gateway": pid, "n1": pid, ...} of the lab's daemons ({} when it is down)."""
    try:
        with open(_pids_file(lab)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def is_up(lab: Lab) -> bool:
    return any(ns in netns.listnetns() for ns in lab.namespaces[:2])


def up(lab: Lab, timeout: float = 30.0, log=print) -> dict:
    if os.geteuid() != 0:
        raise LocalControlError("must be run as root")
    if is_up(lab):
        st = status(lab)
        if st["nodes_configured"] == lab.nodes and st["healthy"] and ("gateways" in st) == (lab.gateways > 1):
            log(f"lab '{lab.prefix}' is already up with {lab.nodes} nodes")
            return st
        raise LocalControlError(
            f"lab '{lab.prefix}' exists but is not what was asked (or not healthy): run 'vipctl lab down' first")
    if not 1 <= lab.nodes <= 32:
        raise LocalControlError("--nodes must be from 1 to 32")
    if lab.gateways not in (1, 2):
        raise LocalControlError("--gateways must be 1 or 2")
    if lab.gateways == 2 and lab.ipv6_only:
        raise LocalControlError("--ipv6-only is not built for the two-gateway lab yet (--ipv6 is: dual-stack)")
    if lab.gateways == 2:
        try:
            return labha.up(lab, timeout, log)
        except BaseException:
            down(lab, log=lambda *a: None)
            raise
    # fresh state, except nothing of an older lab survives
    shutil.rmtree(lab.state_dir, ignore_errors=True)
    try:
        build_links(lab)
        if lab.ipv6:
            lab6.build_links6(lab)
        wire_like_client(lab)
        log(f"namespaces: {', '.join(lab.namespaces)}")
        paths = _write_configs(lab)
        logfmt = ["--log-format", lab.log_format]
        plan = [{"name": "gateway", "ns": lab.gw_ns, "args": ["gateway", "run", "--config", paths["gateway"], *logfmt]}]
        plan += [{"name": lab.node_name(k), "ns": lab.node_ns(k),
                  "args": ["node", "run", "--config", paths[lab.node_name(k)], *logfmt]}
                 for k in range(1, lab.nodes + 1)]
        with open(os.path.join(lab.state_dir, "supervise.json"), "w") as f:
            json.dump({"daemons": plan}, f)
        supervisor = _spawn_supervisor(lab)
        _wait_pids(lab, supervisor, timeout)
        _wait_socket(lab, timeout)
        _wait_nodes(lab, timeout)
    except BaseException:
        down(lab, log=lambda *a: None)
        raise
    pids = daemon_pids(lab)
    log(f"gateway (pid {pids['gateway']}) and {lab.nodes} node agents are up under a supervisor "
        f"(pid {pids['supervisor']}, restarts any that dies); VIP {' and '.join(lab6.vips(lab, VIP))}")
    for name, ps in _process_strategy(lab, timeout).items():
        log(f"{name}: process strategy (criu) " + ("available: " if ps.get("available") else "unavailable: ")
            + str(ps.get("reason")))
    return status(lab)


def _process_strategy(lab: Lab, timeout: float) -> dict[str, dict]:
    """Each node's answer to "can you run the process strategy" (its agent runs `criu
    check` once at start, in about a second)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = call("status", lab.control_socket, timeout=5.0)["nodes"]
        got = {n["name"]: n.get("process_strategy") or {} for n in nodes}
        if time.monotonic() > deadline or all(p.get("reason") not in (None, "checking criu") for p in got.values()):
            return got
        time.sleep(0.1)


def _wait_socket(lab: Lab, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            call("ping", lab.control_socket, timeout=2.0)
            return
        except VipError:
            _check_alive(lab)
            time.sleep(0.1)
    raise LocalControlError(f"the gateway did not come up within {timeout:g}s; see {lab.state_dir}/logs/gateway.log")


def _check_alive(lab: Lab) -> None:
    """During `up`: a daemon that keeps exiting (the supervisor restarted it 3 times) or a
    dead supervisor is a failed start, said at once rather than at the timeout."""
    pids = daemon_pids(lab)
    if "supervisor" in pids and not _alive(pids["supervisor"]):
        raise LocalControlError(f"the lab's supervisor exited; see {lab.state_dir}/logs/supervisor.log")
    for name, rec in restarts(lab).items():
        if rec.get("restarts", 0) >= 3:
            raise LocalControlError(
                f"the {name} daemon keeps exiting during start; see {lab.state_dir}/logs/{name}.log")


def _wait_nodes(lab: Lab, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = call("status", lab.control_socket, timeout=5.0)
        if all(n["state"] == "up" for n in st["nodes"]):
            return
        _check_alive(lab)
        time.sleep(0.1)
    raise LocalControlError(f"not every node agent came up within {timeout:g}s; see {lab.state_dir}/logs/")


def restart_node(lab: Lab, k: int, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
    """End node k's agent with `sig` (e.g. after a crash test); the supervisor starts it
    again. Returns its new PID once the gateway sees the node up."""
    return restart_daemon(lab, lab.node_name(k), timeout, sig)


def restart_daemon(lab: Lab, name: str, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
    old = daemon_pids(lab)[name]
    try:
        os.kill(old, sig)
    except ProcessLookupError:
        pass
    new = wait_restarted(lab, name, old, timeout)
    if name == "gateway":
        _wait_socket(lab, timeout)
    _wait_nodes(lab, timeout)
    return new


def hold_daemon(lab: Lab, name: str, timeout: float = 10.0) -> None:
    """Stop daemon `name` (SIGTERM) and keep the supervisor from restarting it, e.g. to use
    a node's credentials by hand; `release_daemon` lets it start again."""
    held = os.path.join(lab.state_dir, "held")
    os.makedirs(held, mode=0o700, exist_ok=True)
    open(os.path.join(held, name), "w").close()
    pid = daemon_pids(lab)[name]
    _stop_pid(pid, timeout)


def release_daemon(lab: Lab, name: str) -> None:
    try:
        os.unlink(os.path.join(lab.state_dir, "held", name))
    except FileNotFoundError:
        pass


def wait_restarted(lab: Lab, name: str, old: int, timeout: float = 10.0) -> int:
    """The new PID of daemon `name` once the supervisor has replaced `old`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = daemon_pids(lab).get(name)
        if pid and pid != old:
            return pid
        time.sleep(0.02)
    raise LocalControlError(f"the supervisor did not restart {name} within {timeout:g}s")


def _stop_pid(pid: int, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def down(lab: Lab, log=print) -> dict:
    if os.geteuid() != 0:
        raise LocalControlError("must be run as root")
    stopped = []
    pids = daemon_pids(lab)
    # the supervisor first (it stops the agents, then the gateway, and restarts nothing
    # more); then anything of ours it did not end
    if "supervisor" in pids:
        _stop_pid(pids["supervisor"], 20.0)
    for name in sorted(pids, key=lambda n: (n != "supervisor", n == "gateway")):
        _stop_pid(pids[name])
        stopped.append(name)
    # agents leave their services (and their connections) running when they exit; all
    # that lives in our namespaces was started by this lab: SIGTERM, then SIGKILL, by PID
    existing = set(netns.listnetns())
    leftovers = []
    for ns in _lab_namespaces(lab, existing):
        leftovers += nsutil.pids_in(ns)
    _end_all(leftovers)
    removed = []
    for ns in _lab_namespaces(lab, existing):
        netns.remove(ns)
        removed.append(ns)
    if os.path.exists(lab.control_socket) and lab.control_socket != os.path.join(lab.state_dir, "control.sock"):
        try:
            os.unlink(lab.control_socket)
        except OSError:
            pass
    for k in range(1, 33):  # the agents' criu images: on tmpfs, outside the state dir
        shutil.rmtree(criu.node_images_parent(os.path.join(lab.state_dir, f"n{k}")), ignore_errors=True)
    if lab.prefix == "vip" or os.environ.get("VIPCLUSTER_KEEP_LOGS"):
        # the operator's lab keeps its logs for a post-mortem (removed by the next `lab up`)
        for entry in ("gateway", "pids.json", "supervisor.json", "pki") + tuple(f"n{k}" for k in range(1, 33)):
            p = os.path.join(lab.state_dir, entry)
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.unlink(p)
    else:
        shutil.rmtree(lab.state_dir, ignore_errors=True)
    log(f"lab '{lab.prefix}' is down: stopped {', '.join(stopped) or 'nothing'}; "
        f"removed namespaces {', '.join(removed) or 'none'}" + (f"; ended {len(leftovers)} stray processes" if leftovers else ""))
    return {"stopped": stopped, "namespaces_removed": removed, "stray_processes": leftovers}


def _end_all(pids: list[int], timeout: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.02)


def _lab_namespaces(lab: Lab, existing: set[str]) -> list[str]:
    """Every namespace of this lab, whatever node count it was built with."""
    names = [lab.client_ns, lab.gw_ns] + labha.extra_namespaces(lab.prefix)
    names += sorted(n for n in existing if n.startswith(f"{lab.prefix}-n") and n[len(lab.prefix) + 2:].isdigit())
    return [n for n in names if n in existing]


def status(lab: Lab) -> dict:
    if lab.gateways == 1 and labha.is_ha(lab.prefix):
        lab = Lab(lab.prefix, lab.nodes, lab.delivery, lab.datapath, gateways=2)
    existing = set(netns.listnetns())
    namespaces = _lab_namespaces(lab, existing)
    nodes_configured = len([n for n in namespaces if n.startswith(f"{lab.prefix}-n")])
    pids = daemon_pids(lab)
    daemons = {}
    for name, pid in pids.items():
        daemons[name] = {"pid": pid, "alive": _alive(pid)}
    for name, rec in restarts(lab).items():
        if name in daemons:
            daemons[name]["restarts"] = rec.get("restarts", 0)
    cluster = None
    try:
        cluster = call("status", lab.control_socket, timeout=5.0)
    except VipError as e:
        cluster = {"error": str(e)}
    healthy = bool(namespaces) and all(d["alive"] for d in daemons.values()) and "error" not in cluster \
        and all(n["state"] == "up" for n in cluster.get("nodes", []))
    out = {"prefix": lab.prefix, "up": bool(namespaces), "healthy": healthy, "namespaces": namespaces,
           "nodes_configured": nodes_configured, "daemons": daemons, "vip": cluster.get("vip", VIP),
           "vips": cluster.get("vips", [VIP]),
           "control_socket": lab.control_socket, "state_dir": lab.state_dir, "cluster": cluster,
           "metrics": metrics_endpoints(lab, namespaces)}
    if lab.gateways > 1:
        out["gateways"] = labha.gateways_status(lab, pids, _alive)
    return out


def metrics_endpoints(lab: Lab, namespaces: list[str] | None = None) -> dict[str, dict]:
    """Where each daemon's Prometheus endpoint listens: {daemon: {namespace, address, url}}
    (loopback inside the daemon's namespace: scrape it with `ip netns exec NS curl URL`)."""
    if namespaces is None:
        namespaces = _lab_namespaces(lab, set(netns.listnetns()))
    out = {}
    for ns in namespaces:
        if ns == lab.gw_ns:
            name, address = "gateway", GATEWAY_METRICS
        elif ns in (labha.gw_ns(lab, g) for g in labha.GATEWAYS):
            name, address = ns[len(lab.prefix) + 1:], GATEWAY_METRICS
        elif ns.startswith(f"{lab.prefix}-n"):
            name, address = ns[len(lab.prefix) + 1:], NODE_METRICS
        else:
            continue
        out[name] = {"namespace": ns, "address": address, "url": f"http://{address}/metrics"}
    return out


def exec_in(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a client program inside a lab namespace (used by the demo and tests)."""
    return subprocess.run(argv, preexec_fn=lambda: nsutil.enter(ns), **kw)


def popen_in(ns: str, argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, preexec_fn=lambda: nsutil.enter(ns), **kw)
