"""`vipctl demo`: the main job on built-in defaults, from nothing to nothing.

Builds the lab, adds `echo` (tcp:7, udp:7) on n1 and `kv` (tcp:6379) on n2, talks to
them through the VIP with real clients from vip-client (nc over TCP and UDP, a kv
session), prints the status table, and takes the lab down again (always).
"""

from __future__ import annotations

import subprocess

import click

from . import lab as labmod
from .cli import render_status
from .client import call


def _client(lab: labmod.Lab, argv: list[str], data: bytes, timeout: float = 10.0) -> bytes:
    r = labmod.exec_in(lab.client_ns, argv, input=data, capture_output=True, timeout=timeout)
    return r.stdout


def run_demo(nodes: int = 3, keep: bool = False) -> None:
    lab = labmod.Lab("vip", nodes)
    click.echo(f"== vipctl lab up --nodes {nodes}")
    labmod.up(lab, log=click.echo)
    sock = lab.control_socket
    try:
        click.echo("\n== vipctl service add echo --node n1 --port tcp:7 --port udp:7 --exec builtin:echo")
        call("service.add", sock, name="echo", node="n1", ports=["tcp:7", "udp:7"], exec="builtin:echo")
        click.echo("== vipctl service add kv --node n2 --port tcp:6379 --exec builtin:kv")
        call("service.add", sock, name="kv", node="n2", ports=["tcp:6379"], exec="builtin:kv")
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

        click.echo("\n== vipctl status")
        render_status(call("status", sock))
    finally:
        if keep:
            click.echo("\n(lab left up: `vipctl lab down` removes it)")
        else:
            click.echo("\n== vipctl lab down")
            labmod.down(lab, log=click.echo)
