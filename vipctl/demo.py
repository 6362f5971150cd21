"""`vipctl demo`: the main job on built-in defaults, from nothing to nothing.

Builds the lab, adds `echo` (tcp:7, udp:7) on n1 and `kv` (tcp:6379) on n2, talks to
them through the VIP with real clients from vip-client (nc over TCP and UDP, a kv
session, ping), then puts live load on both (50 TCP connections of numbered messages, a
UDP stream of numbered datagrams, a kv session) and migrates echo n1 -> n2 -> n3 and kv
n2 -> n1 while it runs, prints each migration report and the clients' own accounting
(lost, duplicated, resets, retransmissions), then moves a real nginx and a real redis
under load with the process strategy (vipctl/demoreal.py; or says why it cannot), the
status table, and takes the lab down again (always).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import click

from clustercore.errors import LocalControlError
from clustercore.kinds import builtin_spec

from . import lab as labmod
from .client import call
from .demoreal import run_real_programs
from .render import progress_line, render_client_accounting, render_report, render_status


def _client(lab: labmod.Lab, argv: list[str], data: bytes, timeout: float = 10.0) -> bytes:
    r = labmod.exec_in(lab.client_ns, argv, input=data, capture_output=True, timeout=timeout)
    return r.stdout


def run_demo(nodes: int = 3, keep: bool = False) -> None:
    lab = labmod.Lab("vip", nodes)
    if labmod.is_up(lab):
        raise LocalControlError("a lab is already up; the demo builds its own: run 'vipctl lab down' first")
    click.echo(f"== vipctl lab up --nodes {nodes}")
    labmod.up(lab, log=click.echo)
    sock = lab.control_socket
    try:
        echo, kv = builtin_spec("echo"), builtin_spec("kv")
        click.echo(f"\n== vipctl service add echo --node n1 --port tcp:7 --port udp:7 --exec {echo}")
        call("service.add", sock, name="echo", node="n1", ports=["tcp:7", "udp:7"], exec=echo)
        click.echo(f"== vipctl service add kv --node n2 --port tcp:6379 --exec {kv}")
        call("service.add", sock, name="kv", node="n2", ports=["tcp:6379"], exec=kv)
        vip = labmod.VIP

        click.echo(f"\n== (vip-client) printf 'hello over tcp\\n' | nc -q1 {vip} 7")
        out = _client(lab, ["nc", "-q", "1", "-w", "3", vip, "7"], b"hello over tcp\n")
        click.echo(out.decode(errors="replace").rstrip() or "(no answer!)")

        click.echo(f"== (vip-client) printf 'hello over udp\\n' | nc -u -w1 {vip} 7")
        out = _client(lab, ["nc", "-u", "-w", "1", vip, "7"], b"hello over udp\n")
        click.echo(out.decode(errors="replace").rstrip() or "(no answer!)")

        click.echo(f"== (vip-client) kv session: SET color blue / GET color / GET nothing | nc -q1 {vip} 6379")
        out = _client(lab, ["nc", "-q", "1", "-w", "3", vip, "6379"], b"SET color blue\nGET color\nGET nothing\n")
        click.echo(out.decode(errors="replace").rstrip() or "(no answer!)")

        click.echo(f"== (vip-client) ping -c 2 {vip}")
        r = labmod.exec_in(lab.client_ns, ["ping", "-c", "2", "-W", "1", vip], capture_output=True, timeout=10)
        click.echo((r.stdout.decode().strip().splitlines() or ["(ping not installed)"])[-2])

        click.echo("\n== live load from vip-client: 50 TCP connections (numbered messages), a UDP stream,"
                   " a kv session; migrations while it runs")
        tmp = tempfile.mkdtemp(prefix="vipctl-demo-")
        stop = os.path.join(tmp, "stop")
        ready = os.path.join(tmp, "ready")
        load = labmod.popen_in(lab.client_ns, [sys.executable, "-m", "vipctl.loadgen", vip, "--conns", "50",
                                               "--udp-port", "7", "--kv-port", "6379", "--duration", "60",
                                               "--ready-file", ready, "--stop-file", stop],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 20
            while not os.path.exists(ready) and load.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            for name, destination in (("echo", "n2"), ("kv", "n1"), ("echo", "n3")):
                time.sleep(1.0)
                click.echo(f"\n== vipctl migrate {name} --to {destination}")
                t0 = time.monotonic()
                report = call("migrate", sock, timeout=120.0, name=name, to=destination,
                              on_progress=lambda m: click.echo(progress_line((time.monotonic() - t0) * 1000, m)))
                click.echo(render_report(report))
            time.sleep(1.0)
        finally:
            open(stop, "w").close()
            out, err = load.communicate(timeout=60)
            shutil.rmtree(tmp, ignore_errors=True)
        r = json.loads(out) if out.strip() else {"error": err.decode()[-500:]}
        click.echo("\n== what the clients saw (their own accounting)")
        click.echo(render_client_accounting(r))

        run_real_programs(lab, click.echo)  # nginx and redis moved whole, or why not

        click.echo("\n== vipctl status")
        click.echo(render_status(call("status", sock)))
    finally:
        if keep:
            click.echo("\n(lab left up: `vipctl lab down` removes it)")
        else:
            click.echo("\n== vipctl lab down")
            labmod.down(lab, log=click.echo)
