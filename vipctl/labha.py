"""The lab with two gateways (`vipctl lab up --gateways 2`, issue 11).

    <prefix>-client  198.51.100.2/24, default via 198.51.100.1 (the floating next hop)
    <prefix>-sw      the switch: bridges brc (client network), brk (cluster network) and
                     brg (the gateways' own network), nothing else
    <prefix>-gw1     client0 198.51.100.11/24 (brc), cluster0 192.0.2.2/24 (brk),
                     sync0 2001:db8:11::2/64 (brg); keepalived and the gateway daemon
    <prefix>-gw2     the same with .12, .3 and ::3
    <prefix>-etcd    sync0 2001:db8:11::4/64 (brg): one etcd member
    <prefix>-nK      192.0.2.(10+K)/24 (brk), default via 192.0.2.1 (floating)

keepalived (VRRPv3, advert 0.3 s, both BACKUP with nopreempt, gw1 the higher priority)
keeps two floating addresses in one sync group on the master: 198.51.100.1 (the
clients' next hop) and 192.0.2.1 (the nodes' next hop for replies and the address their
agents connect to); a track script takes a gateway whose daemon died out of the election.

With `--ipv6` the lab is dual-stack as the one-gateway lab is (vipctl.lab6): the client
2001:db8:1::2, the gateways 2001:db8:1::1x (client side) and 2001:db8:2::2/::3 (cluster
side), the nodes 2001:db8:2::1K; keepalived keeps two more floating next hops,
2001:db8:1::1 and 2001:db8:2::1, in their own VRRP instances (keepalived does not mix
families in one instance) of the same sync group; the VIP6 2001:db8::10 serves beside the
VIP. The control plane stays IPv4.

etcd sits on a network of its own that only the gateways reach: it speaks plain HTTP with
no authentication, so the nodes (and the clients) must not reach it. One member: in the
lab both gateways and etcd share one machine, so three members would fail together and
only cost CPU; a member that restarts keeps its data directory (the test restarts it under
load). A deployment puts three members on three machines (docs/deploy.md).

Both gateways run the same daemon with the same identity material (the one gateway
certificate of the lab's PKI, so the agents trust both) and configs that differ only in
what two processes on one machine must not share: the name, the control socket and the
state directory. `vipctl` is given both control sockets (comma-separated) and talks to
the gateway that serves the agents (vipwire.client).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

from pyroute2 import NetNS, netns

from clustercore.errors import LocalControlError, VipError
from vipwire import pki

from .client import call

GATEWAYS = ("gw1", "gw2")
CLIENT_NET, CLUSTER_NET = "198.51.100", "192.0.2"
SYNC_NET = "2001:db8:11:"
CLIENT_NEXT_HOP = f"{CLIENT_NET}.1"
CLUSTER_NEXT_HOP = f"{CLUSTER_NET}.1"
CLIENT_NEXT_HOP6, CLUSTER_NEXT_HOP6 = "2001:db8:1::1", "2001:db8:2::1"  # --ipv6 (vipctl.lab6's nets)
ETCD_ADDR = f"{SYNC_NET}:4"
ETCD_PORT = 2379
ADVERT_S = 0.3
IFA_F_NODAD = 0x02


def gw_ns(lab, g: str) -> str:
    return f"{lab.prefix}-{g}"


def sw_ns(lab) -> str:
    return f"{lab.prefix}-sw"


def etcd_ns(lab) -> str:
    return f"{lab.prefix}-etcd"


def extra_namespaces(prefix: str) -> list[str]:
    return [f"{prefix}-sw", f"{prefix}-gw1", f"{prefix}-gw2", f"{prefix}-etcd"]


def is_ha(prefix: str) -> bool:
    return f"{prefix}-gw1" in netns.listnetns()


def control_socket(state_dir: str, g: str) -> str:
    return os.path.join(state_dir, f"{g}.sock")


def control_sockets(lab) -> str:
    return ",".join(control_socket(lab.state_dir, g) for g in GATEWAYS)


# --- topology ------------------------------------------------------------------------


def build_links(lab) -> None:
    from . import lab6

    namespaces = [lab.client_ns, sw_ns(lab), etcd_ns(lab)] + [gw_ns(lab, g) for g in GATEWAYS] \
        + [lab.node_ns(k) for k in range(1, lab.nodes + 1)]
    for ns in namespaces:
        netns.create(ns)
        if lab.ipv6:  # no DAD, no router advertisements, before any link exists
            lab6._sysctls(ns, gateway=ns in [gw_ns(lab, g) for g in GATEWAYS])
    with NetNS(sw_ns(lab)) as sw:
        bridges = {}
        for br in ("brc", "brk", "brg"):
            sw.link("add", ifname=br, kind="bridge")
            bridges[br] = sw.link_lookup(ifname=br)[0]
            sw.link("set", index=bridges[br], state="up")

        def port(name: str, br: str, peer_ns: str, peer_if: str) -> None:
            sw.link("add", ifname=name, kind="veth", peer={"ifname": peer_if, "net_ns_fd": peer_ns})
            sw.link("set", index=sw.link_lookup(ifname=name)[0], master=bridges[br], state="up")
        port("client", "brc", lab.client_ns, "eth0")
        port("etcd", "brg", etcd_ns(lab), "sync0")
        for i, g in enumerate(GATEWAYS, 1):
            port(f"{g}c", "brc", gw_ns(lab, g), "client0")
            port(f"{g}k", "brk", gw_ns(lab, g), "cluster0")
            port(f"{g}s", "brg", gw_ns(lab, g), "sync0")
        for k in range(1, lab.nodes + 1):
            port(f"n{k}", "brk", lab.node_ns(k), "eth0")
    for ns in [gw_ns(lab, g) for g in GATEWAYS] + [etcd_ns(lab)]:
        # a link taken down (lab fault) must not take the IPv6 address of sync0 with it
        _sysctl(ns, "net/ipv6/conf/all/keep_addr_on_down", "1")
        _sysctl(ns, "net/ipv6/conf/sync0/keep_addr_on_down", "1")
    for i, g in enumerate(GATEWAYS, 1):
        _sysctl(gw_ns(lab, g), "net/ipv4/ip_forward", "1")
        with NetNS(gw_ns(lab, g)) as ns:
            _addr(ns, "client0", f"{CLIENT_NET}.{10 + i}", 24)
            _addr(ns, "cluster0", f"{CLUSTER_NET}.{1 + i}", 24)
            _addr(ns, "sync0", f"{SYNC_NET}:{1 + i}", 64)
            if lab.ipv6:
                _addr(ns, "client0", f"{lab6.CLIENT_NET6}{10 + i}", 64)
                _addr(ns, "cluster0", f"{lab6.CLUSTER_NET6}{1 + i}", 64)
            _up(ns, "lo")
    with NetNS(etcd_ns(lab)) as ns:
        _addr(ns, "sync0", ETCD_ADDR, 64)
        _up(ns, "lo")
    with NetNS(lab.client_ns) as ns:
        _addr(ns, "eth0", lab.client_addr, 24)
        _up(ns, "lo")
        ns.route("add", dst="default", gateway=CLIENT_NEXT_HOP)
        if lab.ipv6:
            _addr(ns, "eth0", lab6.client_addr6(), 64)
            ns.route("add", dst="::/0", gateway=CLIENT_NEXT_HOP6, family=10)
    for k in range(1, lab.nodes + 1):
        with NetNS(lab.node_ns(k)) as ns:
            ns.link("set", index=ns.link_lookup(ifname="eth0")[0], address=lab.node_mac(k))
            _addr(ns, "eth0", lab.node_addr(k), 24)
            _up(ns, "lo")
            ns.route("add", dst="default", gateway=CLUSTER_NEXT_HOP)
            if lab.ipv6:
                _addr(ns, "eth0", lab6.node_addr6(k), 64)
                ns.route("add", dst="::/0", gateway=CLUSTER_NEXT_HOP6, family=10)


def _addr(ns, ifname: str, address: str, prefixlen: int) -> None:
    idx = ns.link_lookup(ifname=ifname)[0]
    kw = {"flags": IFA_F_NODAD} if ":" in address else {}  # usable at once, no DAD wait
    ns.addr("add", index=idx, address=address, prefixlen=prefixlen, **kw)
    ns.link("set", index=idx, state="up")


def _up(ns, ifname: str) -> None:
    ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")


def _sysctl(ns: str, key: str, value: str) -> None:
    from . import lab as labmod

    labmod.exec_in(ns, ["sh", "-c", f"echo {value} > /proc/sys/{key}"], check=True)


# --- configuration -------------------------------------------------------------------


def write_configs(lab) -> list[dict]:
    """Every config file, and the supervisor's plan: etcd, then per gateway keepalived and
    the daemon, then the agents."""
    from . import lab as labmod
    from . import lab6

    sd = lab.state_dir
    os.makedirs(sd, mode=0o700, exist_ok=True)
    pki.init(lab.pki_dir, [lab.node_name(k) for k in range(1, lab.nodes + 1)])
    gw_tls = pki.paths(lab.pki_dir, "gateway")
    nodes = "".join(
        f'\n[[nodes]]\nname = "{lab.node_name(k)}"\naddress = "{lab.node_addr(k)}"\nmac = "{lab.node_mac(k)}"\n'
        for k in range(1, lab.nodes + 1))
    etcd_dir = os.path.join(sd, "etcd")
    url = f"http://[{ETCD_ADDR}]"
    plan = [{"name": "etcd", "ns": etcd_ns(lab), "argv": [
        shutil.which("etcd") or "etcd", "--name", "lab", "--data-dir", etcd_dir,
        "--listen-client-urls", f"{url}:{ETCD_PORT}", "--advertise-client-urls", f"{url}:{ETCD_PORT}",
        "--listen-peer-urls", f"{url}:2380", "--initial-advertise-peer-urls", f"{url}:2380",
        "--initial-cluster", f"lab={url}:2380", "--heartbeat-interval", "100", "--election-timeout", "500",
        "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h"]}]
    for i, g in enumerate(GATEWAYS, 1):
        text = (
            f'# written by `vipctl lab up --gateways 2` for the lab "{lab.prefix}": gw1 and gw2 differ only in\n'
            f'# name, control_socket and state_dir (two processes on one machine)\n'
            f'name = "{g}"\ngateways = {json.dumps(list(GATEWAYS))}\n'
            f'etcd_endpoints = ["[{ETCD_ADDR}]:{ETCD_PORT}"]\n'
            f'{lab6.vip_lines(lab, lab_vip())}client_interface = "client0"\ncluster_interface = "cluster0"\n'
            f'listen_address = "0.0.0.0"\nlisten_port = 7400\n'
            f'tls_ca = "{gw_tls.ca_cert}"\ntls_cert = "{gw_tls.cert}"\ntls_key = "{gw_tls.key}"\n'
            f'control_socket = "{control_socket(sd, g)}"\nstate_dir = "{sd}/{g}"\n'
            f'delivery = "{lab.delivery}"\nmetrics_address = "{gateway_metrics()}"\n{nodes}')
        path = os.path.join(sd, f"{g}.toml")
        with open(path, "w") as f:
            f.write(text)
        plan.append({"name": f"keepalived-{g}", "ns": gw_ns(lab, g), "argv": keepalived_argv(lab, sd, g, i)})
        plan.append({"name": g, "ns": gw_ns(lab, g),
                     "args": ["gateway", "run", "--config", path, "--log-format", lab.log_format]})
    for k in range(1, lab.nodes + 1):
        name = lab.node_name(k)
        text = labmod.node_config_text(lab, name, "`vipctl lab up --gateways 2`", lab6.vip_lines(lab, lab_vip()),
                                       CLUSTER_NEXT_HOP, node_metrics())
        path = os.path.join(sd, f"{name}.toml")
        with open(path, "w") as f:
            f.write(text)
        plan.append({"name": name, "ns": lab.node_ns(k),
                     "args": ["node", "run", "--config", path, "--log-format", lab.log_format]})
    return plan


def lab_vip() -> str:
    from .lab import VIP

    return VIP


def gateway_metrics() -> str:
    from .lab import GATEWAY_METRICS  # inside each gateway's own namespace

    return GATEWAY_METRICS


def node_metrics() -> str:
    from .lab import NODE_METRICS

    return NODE_METRICS


def keepalived_argv(lab, state_dir: str, g: str, i: int) -> list[str]:
    conf = os.path.join(state_dir, f"keepalived-{g}.conf")
    check = os.path.join(state_dir, f"{g}-alive.sh")
    with open(check, "w") as f:
        # the gateway daemon of this box is alive (its pid from the supervisor's record)
        f.write("#!/bin/sh\n"
                f"pid=$(tr -d ' {{}}\"' < {state_dir}/pids.json | tr ',' '\\n' | sed -n 's/^{g}://p')\n"
                '[ -n "$pid" ] && [ -d /proc/$pid ] && ! grep -q "^State:.*Z" /proc/$pid/status\n')
    os.chmod(check, 0o700)
    with open(conf, "w") as f:
        f.write(keepalived_conf(g, priority=200 - 50 * i, check=check, ipv6=lab.ipv6))
    return [shutil.which("keepalived") or "/usr/sbin/keepalived", "-n", "-l", "--no-syslog", "-D",
            "-f", conf, "-p", os.path.join(state_dir, f"keepalived-{g}.pid"),
            "-r", os.path.join(state_dir, f"vrrp-{g}.pid")]


def keepalived_conf(g: str, priority: int, check: str, ipv6: bool = False) -> str:
    """VRRPv3, adverts every 0.3 s (KERNEL-NOTES: 0.95 s failover); both start BACKUP with
    nopreempt, so a gateway that comes back does not take the address back (one move per
    failure, not two). `ipv6`: the IPv6 next hops in two more instances of the sync group."""
    def instance(name: str, ifname: str, vrid: int, address: str) -> str:
        return (f"vrrp_instance {name} {{\n    state BACKUP\n    nopreempt\n    interface {ifname}\n"
                f"    virtual_router_id {vrid}\n    priority {priority}\n    advert_int {ADVERT_S}\n"
                f"    virtual_ipaddress {{\n        {address} dev {ifname}\n    }}\n"
                f"    track_script {{\n        gateway_alive\n    }}\n}}\n")
    groups = "\n        ".join(["clients", "cluster"] + (["clients6", "cluster6"] if ipv6 else []))
    return (f"# vipcluster gateway {g}\nglobal_defs {{\n    router_id {g}\n    vrrp_version 3\n"
            f"    script_user root\n    enable_script_security\n}}\n"
            f"vrrp_script gateway_alive {{\n    script \"{check}\"\n    interval 1\n    fall 1\n    rise 2\n}}\n"
            f"vrrp_sync_group vipcluster {{\n    group {{\n        {groups}\n    }}\n}}\n"
            + instance("clients", "client0", 51, f"{CLIENT_NEXT_HOP}/24")
            + instance("cluster", "cluster0", 52, f"{CLUSTER_NEXT_HOP}/24")
            + (instance("clients6", "client0", 53, f"{CLIENT_NEXT_HOP6}/64")
               + instance("cluster6", "cluster0", 54, f"{CLUSTER_NEXT_HOP6}/64") if ipv6 else ""))


# --- state ---------------------------------------------------------------------------


def vrrp_role(lab, g: str) -> str:
    """master when the box holds the clients' next hop, backup otherwise."""
    try:
        with NetNS(gw_ns(lab, g)) as ns:
            idx = ns.link_lookup(ifname="client0")
            addrs = [a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=idx[0])] if idx else []
    except OSError:
        return "backup"
    return "master" if CLIENT_NEXT_HOP in addrs else "backup"


def gateways_status(lab, pids: dict[str, int], alive) -> list[dict]:
    return [{"name": g, "pid": pids.get(g), "alive": bool(pids.get(g)) and alive(pids[g]),
             "vrrp": vrrp_role(lab, g), "keepalived_alive": bool(pids.get(f"keepalived-{g}"))
             and alive(pids[f"keepalived-{g}"])} for g in GATEWAYS]


def wait_master(lab, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for g in GATEWAYS:
            if vrrp_role(lab, g) == "master":
                return g
        time.sleep(0.05)
    raise LocalControlError(f"no gateway took the floating address within {timeout:g}s; "
                            f"see {lab.state_dir}/logs/keepalived-*.log")


def wait_etcd(lab, timeout: float) -> None:
    from gateway.etcdregistry import EtcdRegistry
    from gateway.registry import RegistryError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            probe = _in_ns(gw_ns(lab, "gw1"), lambda: EtcdRegistry((f"[{ETCD_ADDR}]:{ETCD_PORT}",), "lab"))
            probe.close()
            return
        except RegistryError:
            time.sleep(0.1)
    raise LocalControlError(f"etcd did not start within {timeout:g}s; see {lab.state_dir}/logs/etcd.log")


def _in_ns(ns: str, fn):
    """Run fn in a thread that entered namespace `ns` (the caller's thread stays where it is)."""
    import threading

    from . import nsutil

    out: dict = {}

    def run():
        try:
            nsutil.enter(ns)
            out["value"] = fn()
        except BaseException as e:  # handed to the caller
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# --- faults --------------------------------------------------------------------------


def fault(lab, name: str, action: str) -> dict:
    """Take a lab gateway (gw1, gw2) or node (n1...) off its networks (links down) or
    back (up). The links are the box's own side of each veth, as a pulled cable."""
    if action not in ("down", "up"):
        raise LocalControlError(f"fault action must be down or up, got {action!r}")
    if re.fullmatch(r"gw[12]", name) and is_ha(lab.prefix):
        ns = gw_ns(lab, name)
    elif re.fullmatch(r"n[0-9]+", name) and lab.node_ns(int(name[1:])) in netns.listnetns():
        ns = lab.node_ns(int(name[1:]))
    else:
        raise LocalControlError(f"no lab gateway or node named {name!r} in lab '{lab.prefix}'")
    changed = []
    with NetNS(ns) as n:
        for link in n.get_links():
            ifname = link.get_attr("IFLA_IFNAME")
            if ifname == "lo":
                continue
            n.link("set", index=link["index"], state=action)
            changed.append(ifname)
        if action == "up" and ns != gw_ns(lab, name):
            # a link that went down took the node's routes with it: the lab's route back
            n.route("replace", dst="default", gateway=CLUSTER_NEXT_HOP)
    return {"name": name, "namespace": ns, "links": changed, "state": action}


# --- up ------------------------------------------------------------------------------


def up(lab, timeout: float, log) -> dict:
    """Like `lab.up`, with two gateways, keepalived and etcd (the caller has checked root
    and that no lab of this prefix exists; on failure it takes the lab down)."""
    from . import lab as labmod

    shutil.rmtree(lab.state_dir, ignore_errors=True)
    build_links(lab)
    labmod.wire_like_client(lab)
    log(f"namespaces: {', '.join([lab.client_ns] + extra_namespaces(lab.prefix) + lab.namespaces[2:])}")
    plan = write_configs(lab)
    with open(os.path.join(lab.state_dir, "supervise.json"), "w") as f:
        json.dump({"daemons": plan}, f)
    supervisor = labmod._spawn_supervisor(lab)
    labmod._wait_pids(lab, supervisor, timeout)
    wait_etcd(lab, timeout)
    master = wait_master(lab, timeout)
    labmod._wait_socket(lab, timeout)
    labmod._wait_nodes(lab, timeout)
    pids = labmod.daemon_pids(lab)
    log(f"gateways gw1 (pid {pids['gw1']}) and gw2 (pid {pids['gw2']}), {master} holds the next hops "
        f"{CLIENT_NEXT_HOP} and {CLUSTER_NEXT_HOP} (keepalived, VRRPv3); etcd (pid {pids['etcd']}) on "
        f"[{ETCD_ADDR}]; {lab.nodes} node agents; supervisor pid {pids['supervisor']}")
    log(f"vipctl: --socket {control_sockets(lab)}")
    return labmod.status(lab)
