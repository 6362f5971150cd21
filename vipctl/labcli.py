"""vipctl's commands for the lab and what runs in it: `bench`, `lab up|down|status|fault`,
`demo` and `replay`. Moved out of vipctl.cli (the operator's commands, the daemons and the
one-line error handling of `main`), on whose `cli` group they are registered when
vipctl.cli imports this module.
"""

from __future__ import annotations

import os
import sys

import click

from clustercore.errors import ConfigError
from clustercore.kinds import Datapath, Delivery

from . import render as out
from .cli import _LOG_FORMAT, _emit, _need_root, cli


# --- benchmark ---------------------------------------------------------------------------


@cli.command()
@click.option("--quick", is_flag=True, help="One short run of each figure (CI smoke test, < 2 minutes).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", "plot_path", default=None, help="Draw freeze time against connections to this PNG.")
def bench(quick, as_json, plot_path):
    """Measure throughput, copies per packet, freeze times and memory in the lab."""
    from . import bench as benchmod

    log = (lambda m: click.echo(m, err=True)) if as_json else (lambda m: click.echo(f"... {m}"))
    result = benchmod.run_bench(quick, log)
    if plot_path:
        benchmod.plot(result, plot_path)
    _emit(result, as_json, out.render_bench)


# --- the lab ---------------------------------------------------------------------------


@cli.group()
def lab():
    """A whole cluster in network namespaces on this machine."""


@lab.command("up")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 32))
@click.option("--prefix", default="vip", show_default=True, help="Namespace name prefix.")
@click.option("--delivery", type=click.Choice([d.value for d in Delivery]), default=Delivery.BROADCAST.value,
              show_default=True,
              help="Gateway: copy VIP packets to every node, or a service's packets to its owner only.")
@click.option("--datapath", type=click.Choice([d.value for d in Datapath]), default=Datapath.FAST.value,
              show_default=True,
              help="Nodes: steady-state verdicts in the kernel, or every packet through the queue.")
@click.option("--ipv6", is_flag=True,
              help="Dual-stack: add 2001:db8:1::/64 (clients), 2001:db8:2::/64 (cluster) and the VIP 2001:db8::10.")
@click.option("--ipv6-only", is_flag=True, help="The VIP is 2001:db8::10 alone (no IPv4 VIP; control plane IPv4).")
@click.option("--gateways", default=1, show_default=True, type=click.IntRange(1, 2),
              help="2: two gateways behind a floating next hop (keepalived), the registry in etcd.")
@click.option("--conntrack", is_flag=True,
              help="Nodes keep conntrack on for the VIP's flows (graceful drains need it; migrations pay for it).")
@_LOG_FORMAT
@click.option("--json", "as_json", is_flag=True)
def lab_up(nodes, prefix, delivery, datapath, ipv6, ipv6_only, gateways, conntrack, log_format, as_json):
    """Build the lab and start the gateway and node agents."""
    from . import lab as labmod

    spec = labmod.Lab(prefix, nodes, Delivery(delivery), Datapath(datapath), log_format=log_format,
                      gateways=gateways, ipv6=ipv6, ipv6_only=ipv6_only, conntrack=conntrack)
    st = labmod.up(spec, log=(lambda *a: None) if as_json else click.echo)
    _emit(st, as_json, lambda s: out.render_status(s["cluster"]))


@lab.command("down")
@click.option("--prefix", default="vip", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lab_down(prefix, as_json):
    """Stop every daemon and service and remove every namespace of the lab."""
    from . import lab as labmod

    r = labmod.down(labmod.Lab(prefix), log=(lambda *a: None) if as_json else click.echo)
    if as_json:
        _emit(r, True, None)


@lab.command("status")
@click.option("--prefix", default="vip", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lab_status(prefix, as_json):
    """Namespaces, daemons and the cluster's status."""
    from . import lab as labmod

    _need_root()
    _emit(labmod.status(labmod.Lab(prefix)), as_json, out.render_lab_status)


@lab.command("fault")
@click.argument("name")
@click.argument("action", type=click.Choice(["down", "up"]))
@click.option("--prefix", default="vip", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lab_fault(name, action, prefix, as_json):
    """Take lab gateway (gw1, gw2) or node NAME off its networks (links down) or back."""
    from . import lab as labmod
    from . import labha

    _need_root()
    r = labha.fault(labmod.Lab(prefix), name, action)
    _emit(r, as_json, lambda r: f"{r['name']}: links {', '.join(r['links'])} {r['state']}")


@cli.command()
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(2, 32))
@click.option("--keep", is_flag=True, help="Leave the lab up at the end.")
def demo(nodes, keep):
    """The main job on built-in defaults: lab, services, real clients, status, teardown."""
    from .demo import run_demo

    run_demo(nodes=nodes, keep=keep)


# --- replaying captures ----------------------------------------------------------------


@cli.command()
@click.argument("pcap")
@click.option("--mode", type=click.Choice(["pure", "packets", "sessions"]), default="pure", show_default=True,
              help="pure: the in-memory cluster (no root); packets / sessions: the running lab.")
@click.option("--nodes", type=click.IntRange(1, 32), default=None, help="Pure mode: nodes (default: the sidecar's, or 3).")
@click.option("--service", "services", multiple=True, metavar="NAME=PROTO:PORT[,PROTO:PORT]@NODE",
              help="Pure mode: a service and its first owner (repeatable; default: the sidecar's).")
@click.option("--migrate", "migrations", multiple=True, metavar="SERVICE:NODE@INDEX",
              help="Migrate SERVICE to NODE before the capture's frame INDEX (0-based; repeatable).")
@click.option("--vip", default=None, help="The VIP in the capture (default: the sidecar's, or 203.0.113.10).")
@click.option("--step-gap", default=3, show_default=True, type=click.IntRange(0, 100000),
              help="Pure mode: packets that pass between one migration step and the next.")
@click.option("--lag", "lags", multiple=True, metavar="NODE=PACKETS",
              help="Pure mode: NODE decides each packet this many packets late (repeatable).")
@click.option("--prefix", default="vip", show_default=True, help="Lab modes: the lab's namespace prefix.")
@click.option("--max-gap", default=0.25, show_default=True, type=click.FloatRange(0, 10),
              help="Lab modes: the longest pause (s) kept from the capture's timing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay(ctx, pcap, mode, nodes, services, migrations, vip, step_gap, lags, prefix, max_gap, as_json):
    """Replay capture PCAP through the cluster and judge it with the oracle (exit 1 if it fails)."""
    from . import replay as rp

    loaded = rp.load(pcap, vip)
    plan = rp.parse_migrations(migrations)
    if mode == "pure":
        names, svcs = rp.setup(loaded, services, nodes)
        result = rp.run_pure(loaded, names, svcs, plan, step_gap=step_gap, lag=rp.parse_lags(lags, names),
                             sidecar_services=not services)
    else:
        if services or nodes:
            raise ConfigError("--service/--nodes", "the lab modes use the running lab's nodes and services")
        _need_root()
        from . import lab as labmod
        from . import replaylab

        the_lab = labmod.Lab(prefix)
        given = ctx.find_root().params.get("socket_path") or os.environ.get("VIPCTL_SOCKET")
        sock = given or the_lab.control_socket
        run = replaylab.run_packets if mode == "packets" else replaylab.run_sessions
        result = run(loaded, the_lab, sock, plan, max_gap)
        rp.check_expectations(result, loaded.sidecar, per_node=False)
    _emit(result, as_json, out.render_replay)
    if not result.get("ok"):
        sys.exit(1)
