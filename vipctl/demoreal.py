"""The demo's real programs: a real nginx and a real redis-server moved whole (the
`process` strategy) under load from real clients, or one line saying why not.

nginx: 50 keep-alive connections (vipctl.realload http-hold) and a rate-limited 30 MB
curl download in flight, moved n1 -> n2 -> n3; the download's checksum is compared.
redis: 10 MB of data and SET/GET loops on 4 connections, moved n2 -> n3; every key counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import lab as labmod
from . import programs
from .client import call
from .render import render_report


REDIS_PORT = 6380


def availability(sock: str) -> str | None:
    """Why the process strategy cannot run here, or None."""
    ok, why = programs.criu_here()
    if not ok:
        return why
    return programs.wait_process_strategy(lambda: call("status", sock))


def _vipctl(sock: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vipctl", "--socket", sock, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _client(lab: labmod.Lab, argv: list, **kw) -> subprocess.Popen:
    return labmod.popen_in(lab.client_ns, [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _json(p: subprocess.Popen, timeout: float = 120.0) -> dict:
    out, err = p.communicate(timeout=timeout)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return {"error": err.decode(errors="replace")[-300:]}


def _wait(path: str, p: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def _migrate(sock: str, name: str, to: str, echo) -> None:
    echo(f"\n== vipctl migrate {name} --to {to}")
    r = _vipctl(sock, "migrate", name, "--to", to, "--json")
    echo(render_report(json.loads(r.stdout)) if r.stdout.strip().startswith("{") else r.stderr.strip())


def run_real_programs(lab: labmod.Lab, echo) -> None:
    sock = lab.control_socket
    why = availability(sock)
    if why:
        echo(f"\n== real programs (nginx, redis-server) moved whole: skipped: {why}")
        return
    tmp = tempfile.mkdtemp(prefix="vipctl-demo-real-")
    os.chmod(tmp, 0o777)
    try:
        _run_in(lab, echo, sock, tmp)
    finally:  # the programs' files (site, configs, redis dir): nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)


def _run_in(lab: labmod.Lab, echo, sock: str, tmp: str) -> None:
    vip = labmod.VIP
    web = programs.nginx_program(os.path.join(tmp, "nginx"))
    args = programs.service_add_args("web", "n1", web, "process")
    echo("\n== vipctl " + " ".join(args[:-6]) + f" --exec '{web.exec_line}' --migrate process --sockets self")
    r = _vipctl(sock, *args)
    if r.returncode != 0:
        echo(f"(not started: {r.stderr.strip()})")
        return
    try:
        time.sleep(1.0)
        paths = ",".join(f"{p}={sz}" for p, (sz, _) in sorted(web.files.items()) if sz < 1 << 20)
        ready, stop, dest = (os.path.join(tmp, n) for n in ("web.ready", "web.stop", "big.out"))
        echo(f"== (vip-client) 50 keep-alive HTTP connections; curl --limit-rate 5M http://{vip}/big.bin")
        hold = _client(lab, [sys.executable, "-m", "vipctl.realload", "http-hold", vip, 80, "--conns", 50,
                             "--rate", 10, "--duration", 60, "--paths", paths, "--ready-file", ready, "--stop-file", stop])
        _wait(ready, hold)
        dl = _client(lab, ["curl", "-sS", "--max-time", "60", "--limit-rate", "5M", "-o", dest, f"http://{vip}/big.bin"])
        try:
            for to in ("n2", "n3"):
                time.sleep(1.5)
                _migrate(sock, "web", to, echo)
            dl.communicate(timeout=90)
        finally:
            open(stop, "w").close()
            h = _json(hold)
        with open(dest, "rb") as f:
            same = hashlib.sha256(f.read()).hexdigest() == web.files["/big.bin"][1]
        echo(f"== what the clients saw: {h.get('ok')}/{h.get('requests')} requests answered, {h.get('failed')} failed, "
             f"{h.get('resets')} resets, longest wait {h.get('longest_wait_ms')} ms; the 30 MB download is "
             + ("byte-identical" if same else "DIFFERENT"))
    finally:
        _vipctl(sock, "service", "remove", "web")

    # the demo's kv builtin has tcp:6379: this redis listens on the next port
    red = programs.redis_program(os.path.join(tmp, "redis"), port=REDIS_PORT)
    args = programs.service_add_args("redis", "n2", red, "process")
    echo("\n== vipctl " + " ".join(args[:-6]) + f" --exec '{red.exec_line}' --migrate process --sockets self")
    r = _vipctl(sock, *args)
    if r.returncode != 0:
        echo(f"(not started: {r.stderr.strip()})")
        return
    try:
        time.sleep(1.0)
        fill = _json(_client(lab, [sys.executable, "-m", "vipctl.realload", "redis-fill", vip, REDIS_PORT, "--mb", 10]))
        ready, stop = os.path.join(tmp, "redis.ready"), os.path.join(tmp, "redis.stop")
        loop = _client(lab, [sys.executable, "-m", "vipctl.realload", "redis-loop", vip, REDIS_PORT, "--conns", 4,
                             "--rate", 50, "--duration", 60, "--ready-file", ready, "--stop-file", stop])
        _wait(ready, loop)
        try:
            time.sleep(1.0)
            _migrate(sock, "redis", "n3", echo)
            time.sleep(1.0)
        finally:
            open(stop, "w").close()
            r = _json(loop)
        got = labmod.exec_in(lab.client_ns, ["redis-cli", "-h", vip, "-p", str(REDIS_PORT), "DBSIZE"], capture_output=True, text=True,
                             timeout=30)
        want = fill.get("keys", 0) + r.get("keys_written", 0)
        echo(f"== what the clients saw: {r.get('set_ok')} SET and {r.get('get_ok')} GET replies right, {r.get('bad')} "
             f"wrong, {r.get('resets')} resets; redis-cli DBSIZE {got.stdout.strip()} (want {want})")
    finally:
        _vipctl(sock, "service", "remove", "redis")
