"""Real programs (nginx, redis-server, dnsmasq, iperf3) as lab services on the VIP, and
real clients (curl, redis-cli, dig, iperf3) against them from vip-client, bounded, with
exact accounting.

The programs' configurations live in vipctl/programs.py (the bench uses them too): each
`*_program(workdir)` returns a `Program`: the exact argv (`--exec "CMD"` is
`program.exec_line`), the ports for `--port`, and what a client should find.

How a program is run as a service is one switch, `RealService(strategy=...)`:

    external   the test starts the program in the node's namespace itself and registers
               `--exec external` (vipcluster delivers and filters; the program binds the
               VIP). Works today; the service cannot move.
    process    `--exec CMD --migrate process --sockets self`: the agent starts the program
               and moves it whole with criu. HOOK: `vipctl.programs.service_add_args` is
               the one place that spells this; `process_strategy_available` decides the skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Self

from vipctl import lab as labmod
from vipctl.lab import VIP
from vipctl.programs import (  # noqa: F401
    BIG_FILE_MB,
    DNS_RECORDS,
    Program,
    dnsmasq_program,
    iperf3_program,
    nginx_program,
    criu_here,
    process_strategy_refusal,
    redis_program,
    service_add_args,
    wait_process_strategy,
)


def process_strategy_available(h=None) -> tuple[bool, str]:
    """(available, why not): criu >= 4.2 works on this machine and, given a running lab
    `h`, every node says so too (status `process_strategy`)."""
    ok, why = criu_here()
    if ok and h is not None:
        why = wait_process_strategy(h.status) or ""
        ok = not why
    return ok, why


def _node_index(node: str) -> int:
    return int(node.lstrip("n"))


class RealService:
    """One real program as a lab service on `node`; always stopped and removed on exit."""

    def __init__(self, h, name: str, node: str, program: Program, strategy: str = "external") -> None:
        self.h, self.name, self.node, self.program, self.strategy = h, name, node, program, strategy
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(program.workdir, f"{name}.log")

    def __enter__(self) -> Self:
        self.h.vipctl(*service_add_args(self.name, self.node, self.program, self.strategy))
        if self.strategy == "external":
            log = open(self.log_path, "ab")
            self.proc = labmod.popen_in(self.h.lab.node_ns(_node_index(self.node)), list(self.program.argv),
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            log.close()
        self.wait_listening()
        self.bound = self.listening()
        stray = [a for a in self.bound if not a.split()[1].startswith(f"{VIP}:")]
        assert self.bound and not stray, f"{self.name} must listen on the VIP only: {self.bound}"
        return self

    def listening(self) -> list[str]:
        """"PROTO ADDR:PORT" of the program's listening TCP and bound UDP sockets on its node
        (from `ss`, by the program's process name)."""
        comm = os.path.basename(self.program.argv[0])[:15]
        r = labmod.exec_in(self.h.lab.node_ns(_node_index(self.node)), ["ss", "-Hlntup"], capture_output=True,
                           text=True, timeout=10, check=True)
        return sorted({f"{f[0]} {f[4]}" for f in (line.split() for line in r.stdout.splitlines())
                       if f'(("{comm}"' in f[-1]})

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Until every TCP port accepts a connection from vip-client (UDP-only: its TCP twin
        or a short wait)."""
        deadline = time.time() + timeout
        for port in [int(p.split(":")[1]) for p in self.program.ports if p.startswith("tcp:")]:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited ({self.proc.returncode}): {self.log()}")
                r = self.h.client(["nc", "-z", "-w", "1", VIP, str(port)], timeout=10)
                if r.returncode == 0:
                    break
                assert time.time() < deadline, f"{self.name} is not listening on {VIP}:{port}: {self.log()}"
                time.sleep(0.2)

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nginx's master takes its workers with it
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.h.vipctl("service", "remove", self.name, check=False)


# --- clients ----------------------------------------------------------------------------


def realload(h, cmd: str, port: int, *args, ready=None, stop=None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vipctl.realload", cmd, VIP, str(port), *map(str, args)]
    if ready:
        argv += ["--ready-file", str(ready)]
    if stop:
        argv += ["--stop-file", str(stop)]
    return h.client_popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_file(p: subprocess.Popen, path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if p.poll() is not None:
            raise AssertionError(f"client exited before it was ready: {p.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, f"{path}: the client did not get ready"
        time.sleep(0.05)


def finish(p: subprocess.Popen, timeout: float = 60.0) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err.decode()[-2000:]
    return json.loads(out)


class ClientLoop:
    """Runs a real client (one argv per round, built by `make_argv(round)`) in vip-client
    again and again until stopped or `max_rounds`, on a thread; `parse(round, stdout,
    returncode)` accumulates into `self.result`."""

    def __init__(self, h, make_argv, parse, max_rounds: int = 200, timeout: float = 60.0, pause: float = 0.0) -> None:
        self.h, self.make_argv, self.parse = h, make_argv, parse
        self.max_rounds, self.timeout, self.pause = max_rounds, timeout, pause
        self.result: dict = {"rounds": 0, "client_errors": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ClientLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        for rnd in range(self.max_rounds):
            if self._stop.is_set():
                return
            r = self.h.client(self.make_argv(rnd), timeout=self.timeout)
            self.result["rounds"] += 1
            try:
                self.parse(rnd, r.stdout.decode(errors="replace"), r.returncode, self.result)
            except (ValueError, KeyError, IndexError) as e:  # unparsable output fails the test
                self.result["client_errors"].append(repr(e))
            self._stop.wait(self.pause)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "client loop did not stop"
        return self.result


def curl_keepalive_loop(h, files: dict, urls_per_round: int = 100, max_rounds: int = 200) -> ClientLoop:
    """curl fetching `urls_per_round` small files on ONE reused connection per invocation;
    counts 200s, failures (curl's 000 or a non-200, a short body), and extra connects (a
    reconnect inside an invocation means the server closed or reset the connection)."""
    small = sorted(p for p, (size, _) in files.items() if size < 1 << 20)

    def make_argv(rnd: int) -> list[str]:
        argv = ["curl", "-sS", "--max-time", "30", "-w", "%{http_code} %{num_connects} %{size_download} %{url}\\n"]
        for i in range(urls_per_round):
            argv += ["-o", "/dev/null", f"http://{VIP}{small[(rnd + i) % len(small)]}"]
        return argv

    def parse(rnd: int, out: str, rc: int, res: dict) -> None:
        lines = [l for l in out.splitlines() if l.strip()]
        res.setdefault("requests", 0)
        res.setdefault("ok", 0)
        res.setdefault("failed", 0)
        res.setdefault("connects", 0)
        res.setdefault("invocations_failed", 0)
        res.setdefault("invocations", 0)
        res["invocations"] += 1
        res["invocations_failed"] += rc != 0
        res["requests"] += urls_per_round
        res["failed"] += urls_per_round - len(lines)  # a missing line is a failed transfer too
        for line in lines:
            code, connects, size, url = line.split(" ", 3)
            res["connects"] += int(connects)
            path = url.split(VIP, 1)[1]
            if code == "200" and int(size) == files[path][0]:
                res["ok"] += 1
            else:
                res["failed"] += 1
                if len(res["client_errors"]) < 20:
                    res["client_errors"].append(line)
    return ClientLoop(h, make_argv, parse, max_rounds)


def curl_download(h, dest: str, path: str = "/big.bin", limit_rate: str = "3M", timeout: float = 120.0) -> subprocess.Popen:
    """A rate-limited download (in vip-client, to a file the test reads)."""
    return h.client_popen(["curl", "-sS", "--max-time", str(int(timeout)), "--limit-rate", limit_rate,
                           "-o", dest, "-w", "%{http_code} %{size_download} %{num_connects}", f"http://{VIP}{path}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def redis_cli(h, *args, input: bytes | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return h.client(["redis-cli", "-h", VIP, "-p", "6379", *args], input=input, timeout=timeout)


def redis_pipe_set(h, prefix: str, n: int) -> dict:
    """`redis-cli --pipe` (the real client's mass-insert mode) SETs prefix<i> = value<i>."""
    from vipctl.realload import resp_command
    data = b"".join(resp_command("SET", f"{prefix}{i}", f"value-{prefix}{i}") for i in range(n))
    r = redis_cli(h, "--pipe", input=data)
    out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    # "All data transferred. Waiting for the last reply...\nerrors: 0, replies: 5000"
    tail = [l for l in out.splitlines() if l.startswith("errors:")]
    errors, replies = (int(x.split(":")[1]) for x in tail[-1].split(",")) if tail else (-1, -1)
    return {"rc": r.returncode, "errors": errors, "replies": replies, "sent": n}


def redis_check_keys(h, expected: dict[str, bytes], chunk: int = 500) -> dict:
    """Every expected key read back with `redis-cli MGET` (raw output, one value a line)."""
    keys = sorted(expected)
    missing, wrong = 0, []
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        r = redis_cli(h, "--raw", "MGET", *part)
        assert r.returncode == 0, r.stderr
        values = r.stdout.split(b"\n")[:len(part)]
        for k, v in zip(part, values):
            if v == b"":
                missing += 1
            elif v != expected[k]:
                wrong.append((k, v[:40]))
    dbsize = int(redis_cli(h, "DBSIZE").stdout.strip() or -1)
    return {"checked": len(keys), "missing": missing, "wrong": wrong[:10], "wrong_count": len(wrong), "dbsize": dbsize}


def dig_loop(h, tcp: bool, queries_per_round: int = 50, max_rounds: int = 400, records: dict | None = None,
             pause: float = 0.05) -> ClientLoop:
    """`dig -f batch` (one process, `queries_per_round` queries, +tries=1 so nothing is
    retried behind our back): each query must be answered with its record. dig reads one
    reply per query; duplicates are counted by `vipctl.realload dns-udp`."""
    records = records or DNS_RECORDS
    names = sorted(records)

    def make_argv(rnd: int) -> list[str]:
        argv = ["dig", f"@{VIP}", "-p", "53", "+tries=1", "+time=3", "+noall", "+answer"] + (["+tcp"] if tcp else [])
        for i in range(queries_per_round):
            argv += [names[(rnd + i) % len(names)], "A"]
        return argv

    def parse(rnd: int, out: str, rc: int, res: dict) -> None:
        for k in ("queries", "answered", "failed"):
            res.setdefault(k, 0)
        res["queries"] += queries_per_round
        got = [l.split() for l in out.splitlines() if l.strip() and not l.startswith(";")]
        want = [names[(rnd + i) % len(names)] for i in range(queries_per_round)]
        answered = 0
        for fields, name in zip(got, want):
            if fields[0].rstrip(".") == name and fields[-1] == records[name]:
                answered += 1
            elif len(res["client_errors"]) < 20:
                res["client_errors"].append(" ".join(fields))
        res["answered"] += answered
        res["failed"] += queries_per_round - answered
        if len(got) != queries_per_round and len(res["client_errors"]) < 20:
            res["client_errors"].append(f"round {rnd}: {len(got)} answers to {queries_per_round} queries: "
                                        + " | ".join(l for l in out.splitlines() if l.startswith(";;"))[:300])
    return ClientLoop(h, make_argv, parse, max_rounds, pause=pause)


def iperf3_client(h, seconds: int, udp_bandwidth: str | None = None, port: int = 5201,
                  tcp_bandwidth: str | None = None) -> subprocess.Popen:
    """iperf3 -J in vip-client: TCP (unlimited unless `tcp_bandwidth`), or UDP at `udp_bandwidth`."""
    argv = ["iperf3", "-c", VIP, "-p", str(port), "-J", "-t", str(seconds)]
    if udp_bandwidth:
        argv += ["-u", "-b", udp_bandwidth, "-l", "1200"]
    elif tcp_bandwidth:
        argv += ["-b", tcp_bandwidth]
    return h.client_popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def iperf3_result(p: subprocess.Popen, timeout: float) -> dict:
    out, _ = p.communicate(timeout=timeout)
    j = json.loads(out)
    assert "error" not in j, j["error"]
    return j
