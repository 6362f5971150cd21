"""vipctl: the one command for operators, the lab and the daemons.

Every project error (VipError) becomes one line on stderr and exit status 1; usage
errors are one line too and exit 2; anything else is a bug and keeps its traceback.
Human output is rendered by vipctl.render; `--json` prints the full values. The lab's
commands (bench, lab, demo, replay) are in vipctl.labcli, registered on the same group.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from clustercore.config import gateway_config_from_dict, node_config_from_dict, parse_toml
from clustercore.errors import ConfigError, LocalControlError, VipError
from clustercore.kinds import BUILTINS, builtin_spec
from clustercore.packet import parse_port_spec

from . import render as out
from .client import call, default_socket

MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; refuse to read a disk image


def read_config_file(path: str, option: str = "--config") -> dict:
    """A TOML config file as a dict; every way it can be unreadable is one ConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(option, f"file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(option, f"{path} is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(option, f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(option, f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not a config file")
    return parse_toml(data, path)


def _need_root() -> None:
    if os.geteuid() != 0:
        raise LocalControlError("must be run as root")


def _setup_logging(level: str, fmt: str = "human", daemon: str = "vipctl") -> None:
    from vipwire import logs

    logs.setup(level, fmt, daemon)  # one line per event (vipwire.logs)


_LOG_FORMAT = click.option("--log-format", type=click.Choice(["human", "json"]), default="human", show_default=True,
                           envvar="VIPCLUSTER_LOG_FORMAT",
                           help="human lines, or one JSON object per line (ts, level, daemon, event, fields).")


def _emit(obj, as_json: bool, render) -> None:
    """`--json`: the full values; otherwise `render(obj)`, the human text (vipctl.render)."""
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True))
    else:
        click.echo(render(obj))


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
@_LOG_FORMAT
def gateway_run(config_path, log_level, log_format):
    """Run the gateway daemon (VIP delivery, registry, control API)."""
    cfg = gateway_config_from_dict(read_config_file(config_path), config_path)
    _need_root()
    _setup_logging(log_level, log_format, "gateway")
    from gateway.daemon import run

    run(cfg)


@gateway.command("cleanup")
@click.option("--config", "config_path", required=True, help="Gateway TOML config.")
def gateway_cleanup(config_path):
    """Take the VIP off the wire: remove the delivery table and the VIP route a gateway
    leaves behind when it exits (run with the gateway stopped)."""
    cfg = gateway_config_from_dict(read_config_file(config_path), config_path)
    _need_root()
    from gateway.daemon import remove_data_plane

    remove_data_plane(cfg)
    click.echo(f"gateway: delivery table and VIP route for {' and '.join(cfg.vips)} removed")


@cli.group()
def node():
    """Node agents."""


@node.command("cleanup")
@click.option("--config", "config_path", required=True, help="Node TOML config.")
def node_cleanup(config_path):
    """Stop the services an agent left running, remove its kernel rules and the VIP
    (run with the agent stopped: an agent that exits leaves them serving)."""
    cfg = node_config_from_dict(read_config_file(config_path), config_path)
    _need_root()
    from nodeshim.agent import cleanup

    done = cleanup(cfg)
    click.echo(f"node {done['node']}: stopped {', '.join(done['stopped']) or 'no service'}; "
               f"rules and VIP {done['vip_removed']} removed")


@node.command("run")
@click.option("--config", "config_path", required=True, help="Node TOML config.")
@click.option("--log-level", default="info")
@_LOG_FORMAT
def node_run(config_path, log_level, log_format):
    """Run a node shim daemon (queue filter, services)."""
    cfg = node_config_from_dict(read_config_file(config_path), config_path)
    _need_root()
    _setup_logging(log_level, log_format, f"node:{cfg.name}")
    from nodeshim.agent import run

    run(cfg)


@cli.group()
def pki():
    """The cluster PKI: a CA and one certificate per gateway, node and admin."""


@pki.command("init")
@click.argument("directory")
@click.option("--node", "nodes", multiple=True, help="A node to issue a certificate for (repeat).")
@click.option("--admin", "admins", multiple=True, help="An operator to issue a certificate for (repeat).")
@click.option("--collector", "collectors", multiple=True,
              help="A metrics collector (Prometheus) to issue a certificate for (repeat): metrics_tls = true.")
@click.option("--gateway", "regateway", is_flag=True, help="With --force: issue the gateway's identity again too.")
@click.option("--force", is_flag=True, help="Issue the listed identities again (rotation); the CA is kept.")
def pki_init(directory, nodes, admins, collectors, regateway, force):
    """Create the cluster CA in DIRECTORY (kept if there) and the gateway's, each --node's,
    each --admin's and each --collector's key and certificate (keys 0600, directory 0700)."""
    _need_root()
    from vipwire import pki as vpki

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise LocalControlError(f"{directory} is not a directory")
    try:
        for n in (*nodes, *admins, *collectors):
            vpki.identity_name("node", n)
        if force:
            vpki.create_ca(directory)
            if regateway:
                vpki.issue(directory, "gateway", overwrite=True)
            for n in nodes:
                vpki.issue(directory, "node", n, overwrite=True)
            for a in admins:
                vpki.issue(directory, "admin", a, overwrite=True)
            for c in collectors:
                vpki.issue(directory, "collector", c, overwrite=True)
        written = vpki.init(directory, list(nodes), list(admins), list(collectors))
    except OSError as e:
        raise LocalControlError(f"cannot write the PKI in {directory}: {e.strerror or e}") from None
    for who, path in written.items():
        click.echo(f"{who}: {path}")


@pki.command("revoke")
@click.argument("directory")
@click.argument("name")
@click.option("--admin", "is_admin", is_flag=True, help="NAME is an operator, not a node.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pki_revoke(directory, name, is_admin, as_json):
    """Revoke NAME's certificate: it goes on the CA's revocation list (DIRECTORY/crl.pem,
    an X.509 CRL signed by the CA), which the gateway reads at every login: that
    certificate is refused from now on (its live session ends at its next login).
    Copy crl.pem beside the gateway's tls_ca. `pki init --force --node NAME` issues a new one."""
    _need_root()
    from vipwire import pki as vpki

    if not os.path.isdir(directory):
        raise LocalControlError(f"{directory} is not a PKI directory")
    try:
        result = vpki.revoke(directory, "admin" if is_admin else "node", name)
    except OSError as e:
        raise LocalControlError(f"cannot write the revocation list in {directory}: {e.strerror or e}") from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"revoked {result['revoked']} (serial {result['serial']}); {result['crl']} "
                   f"lists {result['entries']} certificate(s)")


@cli.group()
def key():
    """Removed: the shared cluster key (use `vipctl pki init`)."""


@key.command("generate", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def key_generate():
    """Removed: agents and gateway now use certificates from the cluster CA."""
    raise LocalControlError("the shared cluster key is gone: create the cluster PKI with "
                            "'vipctl pki init DIR --node n1 --node n2 ...' and set tls_ca, tls_cert "
                            "and tls_key in each config (docs/deploy.md)")


# --- services and status ---------------------------------------------------------------


@cli.group()
def service():
    """Add, remove and list services."""


@service.command("add")
@click.argument("name")
@click.option("--node", "node_name", required=True, help="Node that runs the service.")
@click.option("--port", "ports", multiple=True, required=True, help="PROTO:PORT, repeatable (tcp or udp).")
@click.option("--exec", "exec_spec", default=None,
              help=f"{', '.join(builtin_spec(b) for b in BUILTINS)}, external (you run it) or a command "
                   "line (split like a shell would).")
@click.option("--pid", type=int, default=None,
              help="Adopt this running process on NODE instead (it binds the VIP itself and must run in "
                   "its own PID namespace and session: unshare --pid --fork setsid CMD).")
@click.option("--migrate", type=click.Choice(["auto", "process", "handoff", "batched"]), default="auto",
              show_default=True,
              help="How it moves: handoff (programs that speak it: the builtins), process (criu), "
                   "auto (handoff if it can, else process), batched (the handoff with the connections moved "
                   "in batches; programs that announced X_VIP_BATCH=1, as the echo builtin does).")
@click.option("--sockets", type=click.Choice(["activation", "self"]), default="activation", show_default=True,
              help="activation: the agent binds the ports and passes LISTEN_FDS; self: the program binds "
                   "the VIP itself (nginx, redis-server, dnsmasq).")
@click.option("--check", default=None, help="Health check run by the owner's agent against the VIP: tcp, "
              "http:PATH, dns:NAME or exec:CMD (a stopped process always fails).")
@click.option("--check-interval", type=float, default=None, help="Seconds between two checks (default 2).")
@click.option("--check-failures", type=int, default=None, help="Failed checks in a row that make it unhealthy (default 3).")
@click.option("--failover", type=click.Choice(["restart"]), default=None,
              help="restart: start it on another healthy node when it is unhealthy or its node is down.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def service_add(obj, name, node_name, ports, exec_spec, pid, migrate, sockets, check, check_interval,
                check_failures, failover, as_json):
    """Start service NAME on NODE with its sockets on the VIP."""
    for p in ports:
        try:
            parse_port_spec(p)
        except ValueError as e:
            raise LocalControlError(str(e)) from None
    if (exec_spec is None) == (pid is None):
        raise LocalControlError("give --exec CMD, or --pid PID to adopt a running process")
    extra = {"pid": pid} if pid is not None else {"exec": exec_spec}
    health = _health_option(check, check_interval, check_failures, failover)
    if health is not None:
        extra["check"] = health
    result = call("service.add", obj["socket"], name=name, node=node_name, ports=list(ports),
                  migrate=migrate, sockets=sockets, **extra)
    _emit(result, as_json, out.render_service_added)


def _health_option(check, interval, failures, failover) -> dict | None:
    from clustercore.health import DEFAULT_FAILURES, DEFAULT_INTERVAL_S, HealthSpec

    if check is None:
        if interval is not None or failures is not None or failover is not None:
            raise click.UsageError("--check-interval, --check-failures and --failover need --check")
        return None
    spec = HealthSpec(check=check, interval_s=DEFAULT_INTERVAL_S if interval is None else interval,
                      failures=DEFAULT_FAILURES if failures is None else failures, failover=failover or "")
    return spec.to_dict()


@service.command("remove")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def service_remove(obj, name, as_json):
    """Stop service NAME and release its ports."""
    result = call("service.remove", obj["socket"], name=name)
    _emit(result, as_json, out.render_service_removed)


@service.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def service_list(obj, as_json):
    """List services and their owners."""
    _emit(call("service.list", obj["socket"]), as_json, out.render_services)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="A live view (nodes, services, health, packet rates, migrations); "
              "Ctrl-C ends it.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="--watch: seconds between two refreshes.")
@click.option("--count", type=click.IntRange(1, 10_000_000), default=None,
              help="--watch: stop after this many refreshes (default: until Ctrl-C).")
@click.pass_obj
def status(obj, as_json, watch, interval, count):
    """Nodes (up/down), services, owners and per-node counters."""
    if watch:
        if as_json:
            raise click.UsageError("--watch draws a live view for people; for scripts use --json alone")
        from .watch import watch as live_view

        live_view(lambda: call("status", obj["socket"], timeout=5.0), interval, count)
        return
    if count is not None:
        raise click.UsageError("--count goes with --watch")
    _emit(call("status", obj["socket"]), as_json, out.render_status)


# --- live migration --------------------------------------------------------------------


def _progress(as_json: bool):
    """Progress lines (never with --json); on a terminal, big transfers as a bar."""
    if as_json:
        return None
    t0 = time.monotonic()

    def line(m: dict) -> str:
        return out.progress_line((time.monotonic() - t0) * 1000, m)
    if sys.stdout.isatty():
        from .watch import MigrateProgress

        return MigrateProgress(line)
    return lambda m: click.echo(line(m))


def _call_with_progress(progress, *args, **kw):
    try:
        return call(*args, on_progress=progress, **kw)
    finally:
        if hasattr(progress, "finish"):
            progress.finish()


@cli.command()
@click.argument("name")
@click.option("--to", "destination", required=True, help="Destination node.")
@click.option("--graceful", is_flag=True, help="Move no state: new connections and UDP flows go to --to at once, "
              "established ones stay on the old node until they close or --timeout.")
@click.option("--timeout", "drain_timeout", type=float, default=None, help="With --graceful: seconds before what is "
              "left on the old node is cut (default 60).")
@click.option("--batched", is_flag=True, help="Move the connections in batches (idle first), each frozen only "
              "while it moves; the program must have announced the batch channel (docs/handoff.md).")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=None,
              help="With --batched: this many connections per batch, fixed (default: 32, growing when "
                   "batches are quick).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def migrate(obj, name, destination, graceful, drain_timeout, batched, batch_size, as_json):
    """Move service NAME live to node --to (sockets, queued data, ownership)."""
    if batched and graceful:
        raise click.UsageError("--batched moves the connections, --graceful moves none: choose one")
    if batch_size is not None and not batched:
        raise click.UsageError("--batch-size is for --batched migrations")
    extra = _graceful_option(graceful, drain_timeout)
    if batched:
        extra["batched"] = True
    if batch_size is not None:
        extra["batch_size"] = batch_size
    report = _call_with_progress(_progress(as_json), "migrate", obj["socket"], timeout=_graceful_wait(extra, 120.0),
                                 name=name, to=destination, **extra)
    _emit(report, as_json, out.render_report)
    if report.get("service_down"):
        # past the point of no return the move commits, but nothing serves on --to
        click.echo(f"vipctl: migration of '{name}' committed but the service is down on {report.get('to')}: "
                   f"{report['service_down']}", err=True)
        sys.exit(1)
    if report.get("outcome") != "committed":
        sys.exit(1)


@node.command("drain")
@click.argument("node_name")
@click.option("--to", "destination", default=None, help="Move everything to this node (default: spread).")
@click.option("--graceful", is_flag=True, help="Move no state: new flows go to the other nodes at once, "
              "established ones finish here (or are cut at --timeout).")
@click.option("--timeout", "drain_timeout", type=float, default=None, help="With --graceful: seconds (default 60).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def node_drain(obj, node_name, destination, graceful, drain_timeout, as_json):
    """Migrate every service off NODE (for maintenance)."""
    extra = _graceful_option(graceful, drain_timeout)
    result = _call_with_progress(_progress(as_json), "node.drain", obj["socket"], timeout=_graceful_wait(extra, 600.0),
                                 node=node_name, to=destination, **extra)
    _emit(result, as_json, out.render_drain)
    down = [f"{r.get('service')} on {r.get('to')}" for r in result["migrations"] if r.get("service_down")]
    if down:
        click.echo(f"vipctl: drain of {node_name} committed but these services are down: {', '.join(down)} "
                   "(their new instance did not start; see each report)", err=True)
        sys.exit(1)
    if any(r.get("outcome") != "committed" for r in result["migrations"]):
        sys.exit(1)


def _graceful_option(graceful: bool, timeout: float | None) -> dict:
    if timeout is not None and not graceful:
        raise click.UsageError("--timeout is for --graceful")
    if not graceful:
        return {}
    from clustercore.drain import check_timeout

    return {"graceful": True, "timeout_s": check_timeout(timeout)}


def _graceful_wait(extra: dict, default: float) -> float:
    """How long vipctl waits for the answer: a graceful drain takes up to its timeout."""
    return max(default, extra.get("timeout_s", 0) + 60.0)


# bench, lab, demo and replay: registered on `cli` by importing them
from . import labcli  # noqa: E402,F401


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv=None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="vipctl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vipctl: aborted", err=True)
        sys.exit(1)
    except click.UsageError as e:  # a wrong option or argument: one line, exit 2
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"vipctl: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"vipctl: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except VipError as e:
        click.echo(f"vipctl: {e}", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
