"""vipctl: the one command for operators, the lab and the daemons.

Every project error (VipError) becomes one line on stderr and exit status 1; usage
errors exit 2 (click); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import tomllib

import click

from clustercore.config import gateway_config_from_dict, node_config_from_dict
from clustercore.errors import ConfigError, LocalControlError, VipError
from clustercore.packet import parse_port_spec

from .client import call, default_socket


def _load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None


def _need_root() -> None:
    if os.geteuid() != 0:
        raise LocalControlError("must be run as root")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def _emit(obj, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True))
    else:
        render(obj)


@click.group()
@click.option("--socket", "socket_path", default=None, envvar="VIPCTL_SOCKET",
              help="Gateway control socket (default /run/vipcluster/control.sock).")
@click.pass_context
def cli(ctx, socket_path):
    """vipcluster: one VIP in front of a cluster, services moved live between nodes."""
    ctx.obj = {"socket": socket_path or default_socket()}


# --- daemons -------------------------------------------------------------------------


@cli.group()
def gateway():
    """The router box daemon."""


@gateway.command("run")
@click.option("--config", "config_path", required=True, help="Gateway TOML config.")
@click.option("--log-level", default="info")
def gateway_run(config_path, log_level):
    """Run the gateway daemon (VIP delivery, registry, control API)."""
    _need_root()
    cfg = gateway_config_from_dict(_load_toml(config_path), config_path)
    _setup_logging(log_level)
    from gateway.daemon import run

    run(cfg)


@cli.group()
def node():
    """Node agents."""


@node.command("run")
@click.option("--config", "config_path", required=True, help="Node TOML config.")
@click.option("--log-level", default="info")
def node_run(config_path, log_level):
    """Run a node shim daemon (queue filter, services)."""
    _need_root()
    cfg = node_config_from_dict(_load_toml(config_path), config_path)
    _setup_logging(log_level)
    from nodeshim.agent import run

    run(cfg)


@cli.group()
def key():
    """The cluster key."""


@key.command("generate")
@click.argument("path")
@click.option("--force", is_flag=True, help="Overwrite an existing key.")
def key_generate(path, force):
    """Create a random cluster key at PATH (mode 0600)."""
    _need_root()
    from gateway.keys import generate_key

    if os.path.exists(path) and not force:
        raise LocalControlError(f"{path} already exists (use --force to replace it)")
    generate_key(path, overwrite=force)
    click.echo(f"wrote {path} (mode 0600)")


# --- services and status ---------------------------------------------------------------


@cli.group()
def service():
    """Add, remove and list services."""


@service.command("add")
@click.argument("name")
@click.option("--node", "node_name", required=True, help="Node that runs the service.")
@click.option("--port", "ports", multiple=True, required=True, help="PROTO:PORT, repeatable (tcp or udp).")
@click.option("--exec", "exec_spec", required=True, help="builtin:echo, builtin:kv or a command line.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def service_add(obj, name, node_name, ports, exec_spec, as_json):
    """Start service NAME on NODE with its sockets on the VIP."""
    for p in ports:
        try:
            parse_port_spec(p)
        except ValueError as e:
            raise LocalControlError(str(e)) from None
    result = call("service.add", obj["socket"], name=name, node=node_name, ports=list(ports), exec=exec_spec)
    _emit(result, as_json, lambda r: click.echo(
        f"service {r['name']} added on {r['owner']} ({', '.join(r['ports'])})"))


@service.command("remove")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def service_remove(obj, name, as_json):
    """Stop service NAME and release its ports."""
    result = call("service.remove", obj["socket"], name=name)
    _emit(result, as_json, lambda r: click.echo(f"service {r['name']} removed from {r['owner']}"))


@service.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def service_list(obj, as_json):
    """List services and their owners."""
    result = call("service.list", obj["socket"])

    def render(rows):
        click.echo(f"{'SERVICE':<12} {'OWNER':<8} {'PORTS':<24} EXEC")
        for s in rows:
            click.echo(f"{s['name']:<12} {s['owner']:<8} {','.join(s['ports']):<24} {s['exec']}")
    _emit(result, as_json, render)


def render_status(st: dict) -> None:
    click.echo(f"VIP {st['vip']}")
    click.echo(f"{'NODE':<8} {'STATE':<6} {'ADDRESS':<15} {'MAC':<18} ANCHOR")
    for n in st["nodes"]:
        click.echo(f"{n['name']:<8} {n['state']:<6} {n['address']:<15} {n['mac']:<18} {'*' if n['anchor'] else ''}")
    click.echo("")
    click.echo(f"{'SERVICE':<12} {'OWNER':<8} {'PORTS':<20} {'NODE':<6} {'ACCEPTED':>9} {'DROPPED':>9} {'HELD':>6}")
    for s in st["services"]:
        first = True
        rows = sorted(s["counters"].items()) or [("-", {})]
        for node_name, c in rows:
            lead = f"{s['name']:<12} {s['owner']:<8} {','.join(s['ports']):<20}" if first else " " * 42
            click.echo(f"{lead} {node_name:<6} {c.get('accepted', 0):>9} {c.get('dropped', 0):>9} {c.get('held', 0):>6}")
            first = False


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(obj, as_json):
    """Nodes (up/down), services, owners and per-node counters."""
    _emit(call("status", obj["socket"]), as_json, render_status)


# --- live migration --------------------------------------------------------------------

REPORT_FIELDS = ["service", "from", "to", "outcome", "reason", "tcp_established", "tcp_listening",
                 "udp_sockets", "bytes_moved", "freeze_ms", "total_ms", "held", "released",
                 "duplicates_suppressed", "lost"]


def render_report(r: dict) -> None:
    click.echo(f"migration of {r['service']}: {r['from']} -> {r['to']}: {r.get('outcome')}"
               + (f" ({r['reason']})" if r.get("reason") else ""))
    click.echo(f"  connections moved: {r.get('tcp_established', 0)} tcp established, "
               f"{r.get('tcp_listening', 0)} tcp listening, {r.get('udp_sockets', 0)} udp sockets; "
               f"{r.get('bytes_moved', 0)} bytes of queued data")
    click.echo(f"  freeze {r.get('freeze_ms')} ms, total {r.get('total_ms')} ms; held {r.get('held', 0)}, "
               f"released {r.get('released', 0)}, duplicates suppressed {r.get('duplicates_suppressed', 0)}, "
               f"lost {r.get('lost')}")


def _progress(as_json: bool):
    if as_json:
        return None
    t0 = time.monotonic()
    return lambda m: click.echo(f"  [{(time.monotonic() - t0) * 1000:8.1f} ms] {m.get('step')}: {m.get('detail')}")


@cli.command()
@click.argument("name")
@click.option("--to", "dest", required=True, help="Destination node.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def migrate(obj, name, dest, as_json):
    """Move service NAME live to node --to (sockets, queued data, ownership)."""
    report = call("migrate", obj["socket"], timeout=120.0, on_progress=_progress(as_json), name=name, to=dest)
    _emit(report, as_json, render_report)
    if report.get("outcome") != "committed":
        sys.exit(1)


@node.command("drain")
@click.argument("node_name")
@click.option("--to", "dest", default=None, help="Move everything to this node (default: spread).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def node_drain(obj, node_name, dest, as_json):
    """Migrate every service off NODE (for maintenance)."""
    result = call("node.drain", obj["socket"], timeout=600.0, on_progress=_progress(as_json), node=node_name, to=dest)

    def render(r):
        if not r["migrations"]:
            click.echo(f"node {r['node']} runs no service")
        for rep in r["migrations"]:
            render_report(rep)
    _emit(result, as_json, render)
    if any(r.get("outcome") != "committed" for r in result["migrations"]):
        sys.exit(1)


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
    _emit(result, as_json, lambda r: benchmod.render(r, click.echo))


# --- the lab ---------------------------------------------------------------------------


@cli.group()
def lab():
    """A whole cluster in network namespaces on this machine."""


@lab.command("up")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 32))
@click.option("--prefix", default="vip", show_default=True, help="Namespace name prefix.")
@click.option("--delivery", type=click.Choice(["broadcast", "selective"]), default="broadcast", show_default=True,
              help="Gateway: copy VIP packets to every node, or a service's packets to its owner only.")
@click.option("--datapath", type=click.Choice(["fast", "queue"]), default="fast", show_default=True,
              help="Nodes: steady-state verdicts in the kernel, or every packet through the queue.")
@click.option("--json", "as_json", is_flag=True)
def lab_up(nodes, prefix, delivery, datapath, as_json):
    """Build the lab and start the gateway and node agents."""
    from . import lab as labmod

    st = labmod.up(labmod.Lab(prefix, nodes, delivery, datapath), log=(lambda *a: None) if as_json else click.echo)
    _emit(st, as_json, lambda s: render_status(s["cluster"]))


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
    st = labmod.status(labmod.Lab(prefix))

    def render(s):
        click.echo(f"lab '{s['prefix']}': {'up' if s['up'] else 'down'}"
                   f"{' (healthy)' if s['healthy'] else (' (NOT healthy)' if s['up'] else '')}")
        if s["up"]:
            click.echo(f"namespaces: {', '.join(s['namespaces'])}")
            for name, d in sorted(s["daemons"].items()):
                click.echo(f"  {name:<8} pid {d['pid']:<8} {'alive' if d['alive'] else 'DEAD'}")
            if "error" in s["cluster"]:
                click.echo(f"cluster: {s['cluster']['error']}")
            else:
                render_status(s["cluster"])
    _emit(st, as_json, render)


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
    _emit(result, as_json, lambda r: click.echo(rp.render(r)))
    if not result.get("ok"):
        sys.exit(1)


def main(argv=None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="vipctl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vipctl: aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except VipError as e:
        click.echo(f"vipctl: {e}", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
