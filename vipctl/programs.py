"""Real programs (nginx, redis-server, dnsmasq, iperf3) as services on the VIP: each
`*_program(workdir)` writes its configuration into `workdir` and returns a `Program`
with the exact argv (`--exec "CMD"` is `program.exec_line`), the ports for `--port`, and
what a client should find (the site's files and their checksums; the DNS records).

Used by the lab tests (tests/lab/realprograms.py) and by `vipctl bench`'s process-strategy
rows. `service_add_args` is the one place that says how a program becomes a service for
a strategy (the hook for `--migrate process --sockets self`).
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass, field

from .lab import VIP

BIG_FILE_MB = 30

# DNS records served by dnsmasq (documentation addresses only)
DNS_RECORDS = {"www.lab.test": "203.0.113.20", "api.lab.test": "203.0.113.21",
               "db.lab.test": "198.51.100.50", "mail.lab.test": "192.0.2.25"}


@dataclass(frozen=True)
class Program:
    name: str
    argv: tuple[str, ...]
    ports: tuple[str, ...]          # "tcp:80", ...
    workdir: str
    files: dict = field(default_factory=dict)  # url path -> (size, sha256) for nginx

    @property
    def exec_line(self) -> str:
        """What `vipctl service add ... --exec` takes (split like a shell would)."""
        return shlex.join(self.argv)


# --- configurations ---------------------------------------------------------------------


def _write_site(root: str) -> dict:
    """A static site: a few small pages and a ~30 MB file; url path -> (size, sha256)."""
    os.makedirs(root, exist_ok=True)
    files = {}
    for i, size in enumerate((120, 1500, 4096, 16000, 65536)):
        body = (f"page {i} " * (size // 7 + 1)).encode()[:size]
        files[f"/page{i}.html"] = body
    files["/index.html"] = b"<html><body>vipcluster lab</body></html>\n"
    out = {}
    for path, body in files.items():
        with open(os.path.join(root, path.lstrip("/")), "wb") as f:
            f.write(body)
        out[path] = (len(body), hashlib.sha256(body).hexdigest())
    # the big file: deterministic, not compressible by accident, written in chunks
    h = hashlib.sha256()
    size = 0
    with open(os.path.join(root, "big.bin"), "wb") as f:
        block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB
        for i in range(BIG_FILE_MB):
            chunk = bytes([i]) + block[1:]
            f.write(chunk)
            h.update(chunk)
            size += len(chunk)
    out["/big.bin"] = (size, h.hexdigest())
    return out


def _listen6(vip6: str | None, port: int) -> str:
    """nginx's second listen line for a dual-stack lab (empty without a VIP6)."""
    return f"\n        listen [{vip6}]:{port} backlog=4096;" if vip6 else ""


def nginx_program(workdir: str, vip: str = VIP, port: int = 80, connections: int = 4096,
                  vip6: str | None = None) -> Program:
    os.makedirs(workdir, exist_ok=True)
    root = os.path.join(workdir, "site")
    files = _write_site(root)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(workdir, "tmp", d), exist_ok=True)
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""# vipcluster lab: a static site on the VIP
user root;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {connections * 2 + 64};
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {connections}; }}
http {{
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path {workdir}/tmp/client_body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    server {{
        listen {vip}:{port} backlog=4096;{_listen6(vip6, port)}
        root {root};
    }}
}}
""")
    argv = ("nginx", "-p", workdir, "-c", conf, "-e", "stderr")
    return Program("nginx", argv, (f"tcp:{port}",), workdir, files)


def redis_program(workdir: str, vip: str = VIP, port: int = 6379) -> Program:
    os.makedirs(workdir, exist_ok=True)
    argv = ("redis-server", "--bind", vip, "--port", str(port), "--daemonize", "no", "--save", "",
            "--appendonly", "no", "--dir", workdir, "--protected-mode", "no", "--maxclients", "10000",
            "--logfile", "", "--loglevel", "warning")
    return Program("redis", argv, (f"tcp:{port}",), workdir)


def dnsmasq_program(workdir: str, vip: str = VIP, port: int = 53, records: dict | None = None,
                    vip6: str | None = None) -> Program:
    os.makedirs(workdir, exist_ok=True)
    records = records or DNS_RECORDS
    argv = ["dnsmasq", "--keep-in-foreground", "--user=root", "--group=root", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", f"--listen-address={vip}" + (f",{vip6}" if vip6 else ""), "--bind-interfaces", f"--port={port}",
            "--pid-file=", "--log-facility=-", "--local=/lab.test/"]
    argv += [f"--host-record={name},{addr}" for name, addr in sorted(records.items())]
    return Program("dnsmasq", tuple(argv), (f"udp:{port}", f"tcp:{port}"), workdir)


def iperf3_program(workdir: str, vip: str = VIP, port: int = 5201) -> Program:
    os.makedirs(workdir, exist_ok=True)
    argv = ("iperf3", "-s", "-B", vip, "-p", str(port))
    return Program("iperf3", argv, (f"tcp:{port}", f"udp:{port}"), workdir)


# --- running one as a service -----------------------------------------------------------


def service_add_args(name: str, node: str, program: Program, strategy: str) -> list[str]:
    """`vipctl service add` arguments for `program` on `node`.

    HOOK for the process strategy: once `--migrate process --sockets self` lands, the
    "process" branch is what the agent runs; nothing else in the harness changes."""
    args = ["service", "add", name, "--node", node]
    for p in program.ports:
        args += ["--port", p]
    if strategy == "external":
        return args + ["--exec", "external"]
    if strategy == "process":
        return args + ["--exec", program.exec_line, "--migrate", "process", "--sockets", "self"]
    raise ValueError(f"unknown strategy {strategy!r}")


# --- is the process strategy here? ------------------------------------------------------


def criu_here() -> tuple[bool, str]:
    """Can this machine run the process strategy at all (criu >= 4.2 that passes its
    check)? The lab's nodes share the machine, so this is their answer too, before any
    lab is up; `wait_process_strategy` then asks the running agents."""
    from nodeshim import criu

    ok, why = criu.available()
    return ok, "" if ok else why


def process_strategy_refusal(status: dict) -> str | None:
    """Why a running cluster cannot use the process strategy, from `status` (each node's
    `process_strategy`: a bool, or {"ok"/"available": bool, "why"/"reason": str}), or None.
    A node that does not report the field at all counts as unable."""
    for node in status.get("nodes", []):
        if node.get("state", "up") != "up":
            continue
        ps = node.get("process_strategy")
        if ps is None:
            return f"node {node.get('name')} does not report process_strategy"
        ok = ps.get("ok", ps.get("available")) if isinstance(ps, dict) else bool(ps)
        if not ok:
            why = (ps.get("why") or ps.get("reason") or "") if isinstance(ps, dict) else ""
            return f"node {node.get('name')} cannot run the process strategy: {why or 'unavailable'}"
    return None


def wait_process_strategy(get_status, timeout: float = 20.0, sleep=None) -> str | None:
    """process_strategy_refusal of a cluster that just came up: a node checks criu once at
    start (`criu check`, a second or so) and says "checking ..." meanwhile; wait that out."""
    import time

    sleep = sleep or time.sleep
    deadline = time.monotonic() + timeout
    while True:
        why = process_strategy_refusal(get_status())
        if not why or "checking" not in why or time.monotonic() >= deadline:
            return why
        sleep(0.5)
