"""The one adapter for iptables on the node: steer VIP packets into our queue.

Layout (mangle table, before routing and before any socket sees the packet):

    PREROUTING  -d VIP ! -i lo  -> VIPCLUSTER
    VIPCLUSTER  [fast-path rules (clustercore.fastpath): ACCEPT the ports of services this
                 node owns, DROP the others; migrating services -> NFQUEUE]
                -j NFQUEUE --queue-num N          (no --queue-bypass; what no rule decided)

With several queues (queue_count > 1) every "-j NFQUEUE" above is a jump to a fan-out
chain, VIPCLUSTER-Q (or VIPCLUSTER-QB, the same with --queue-bypass), which picks queue
N + (source port & (count - 1)) per flow (clustercore.fastpath.fanout_rules).

No `--queue-bypass`: if the shim dies, VIP packets are dropped (fail closed). A dead
shim must never mean "accept", because on a non-owner accepting means the stack answers
with an RST or ICMP unreachable and kills the client's connection. Clients retransmit
into silence until the shim is back. One exception (clustercore.fastpath.Rule.bypass):
the UDP ports of a migrating service this node owns carry --queue-bypass, since its own
process holds the socket (a dead agent's datagrams are accepted, not dropped).

Traffic on `lo` (the node talking to its own VIP, UDP datagrams re-injected during a
migration) skips the queue.

Rules are written with `iptables-restore --noflush`, one atomic batch per change.
"""

from __future__ import annotations

import subprocess

from clustercore import fastpath
from clustercore.errors import KernelError

CHAIN = "VIPCLUSTER"


def _run(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, input=stdin.encode() if stdin else None, capture_output=True)
    if check and proc.returncode != 0:
        raise KernelError(" ".join(args[:3]), None, proc.stderr.decode(errors="replace").strip())
    return proc


def _jump_rule(vip: str) -> list[str]:
    return ["-d", f"{vip}/32", "!", "-i", "lo", "-j", CHAIN]


FANOUT_CHAINS = {fastpath.FANOUT_CHAIN: False, fastpath.FANOUT_BYPASS_CHAIN: True}  # chain: bypass


def install(vip: str, queue_num: int, fast_rules: list[str] | None = None, queue_count: int = 1) -> None:
    """Create (or replace) our chains and the jump to them, atomically."""
    heads = [f":{CHAIN} - [0:0]"]
    body = [f"-A {CHAIN} {r}" for r in (fast_rules or [])]
    body.append(f"-A {CHAIN} -j {fastpath.queue_target(queue_num, queue_count, False)}")
    if queue_count > 1:
        for chain, bypass in FANOUT_CHAINS.items():
            heads.append(f":{chain} - [0:0]")
            body += [f"-A {chain} {r}" for r in fastpath.fanout_rules(queue_num, queue_count, bypass)]
    script = "\n".join(["*mangle", *heads, *body, "COMMIT", ""])
    _run(["iptables-restore", "-w", "--noflush"], script)
    if _run(["iptables", "-w", "-t", "mangle", "-C", "PREROUTING", *_jump_rule(vip)], check=False).returncode != 0:
        _run(["iptables", "-w", "-t", "mangle", "-I", "PREROUTING", "1", *_jump_rule(vip)])


def chain_exists() -> bool:
    return _run(["iptables", "-w", "-t", "mangle", "-S", CHAIN], check=False).returncode == 0


def remove(vip: str) -> None:
    """Remove the jump and our chain (idempotent)."""
    while _run(["iptables", "-w", "-t", "mangle", "-D", "PREROUTING", *_jump_rule(vip)], check=False).returncode == 0:
        pass
    _run(["iptables", "-w", "-t", "mangle", "-F", CHAIN], check=False)
    _run(["iptables", "-w", "-t", "mangle", "-X", CHAIN], check=False)
    for chain in FANOUT_CHAINS:  # only referenced from CHAIN, gone now
        _run(["iptables", "-w", "-t", "mangle", "-F", chain], check=False)
        _run(["iptables", "-w", "-t", "mangle", "-X", chain], check=False)


def read_counters() -> dict[str, dict[str, int]]:
    """Per-service packet counters of our chain's rules, from the kernel:
    {service: {"accepted": n, "dropped": n}} (rules tagged `vip:NAME`)."""
    import re

    proc = _run(["iptables-save", "-c", "-t", "mangle"], check=False)
    out: dict[str, dict[str, int]] = {}
    pat = re.compile(r'^\[(\d+):\d+\] -A ' + CHAIN + r' .*--comment "?vip:([^" ]+)"? -j (ACCEPT|DROP)')
    for line in proc.stdout.decode(errors="replace").splitlines():
        m = pat.match(line)
        if m:
            pkts, name, target = int(m.group(1)), m.group(2), m.group(3)
            c = out.setdefault(name, {"accepted": 0, "dropped": 0})
            c["accepted" if target == "ACCEPT" else "dropped"] += pkts
    return out
