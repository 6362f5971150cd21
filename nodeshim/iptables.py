"""The one adapter for iptables on the node: steer VIP packets into our queue.

Layout (mangle table, before routing and before any socket sees the packet):

    PREROUTING  -d VIP ! -i lo, not marked FAST_MARK  -> VIPCLUSTER
                (FAST_MARK: accepted by the node's verdict map, nodeshim.nftnode, which
                 answers the plain ACCEPT/DROP ports in one lookup before this chain)
    VIPCLUSTER  [fast-path rules (clustercore.fastpath): ACCEPT the ports of services this
                 node owns, DROP the others; migrating services -> NFQUEUE]
                -j NFQUEUE --queue-num N          (no --queue-bypass; what no rule decided)
    OUTPUT      -s VIP, marked MUTE_MARK -> DROP   (a dumped connection's socket, kept in
                repair mode by the source until the move ends: its timers still send;
                clustercore.fastpath.MUTE_MARK)

No `--queue-bypass`: if the shim dies, VIP packets are dropped (fail closed). A dead
shim must never mean "accept", because on a non-owner accepting means the stack answers
with an RST or ICMP unreachable and kills the client's connection. Clients retransmit
into silence until the shim is back. One exception (clustercore.fastpath.Rule.bypass):
the UDP ports of a migrating service this node owns carry --queue-bypass, since its own
process holds the socket (a dead agent's datagrams are accepted, not dropped).

Traffic on `lo` (the node talking to its own VIP, UDP datagrams re-injected during a
migration) skips the queue.

    raw PREROUTING -d VIP ! -i lo -> VIPCLUSTER-RAW, raw OUTPUT -s VIP ! -o lo ->
                 VIPCLUSTER-RAWOUT: the queued services' packets, both ways,
                 -j CT --notrack (clustercore.fastpath.to_notrack says why); only on a
                 node that keeps conntrack on (`conntrack = true`): elsewhere there is
                 nothing to untrack, and the two empty hooks cost every packet

Rules are written with `iptables-restore --noflush`, one atomic batch per change.

IPv6: the same layout in ip6tables' mangle table, for an IPv6 VIP (`-d VIP6/128`), with
the same queue number (one shim reads both families) and the same fast-path rules but
for ICMP, which is ICMPv6 there (clustercore.fastpath.to_iptables renders per family).
Every function takes one VIP or several (dual-stack) and uses each one's own tool.
"""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Iterable

from clustercore import fastpath
from clustercore.errors import KernelError

CHAIN = "VIPCLUSTER"
RAW_CHAIN = "VIPCLUSTER-RAW"  # raw table: queued services' packets untracked (fastpath.to_notrack)
RAW_OUT_CHAIN = "VIPCLUSTER-RAWOUT"  # the same flows' packets from the VIP
_installed: set[int] = set()  # the families install() set up in this process (read_counters' default)
_TOOLS = {4: ("iptables", "iptables-restore", "iptables-save", 32),
          6: ("ip6tables", "ip6tables-restore", "ip6tables-save", 128)}


def _families(vips: str | Iterable[str]) -> dict[int, str]:
    """{version: vip} for one VIP or several (at most one per family)."""
    if isinstance(vips, str):
        vips = (vips,)
    return {ipaddress.ip_address(v).version: v for v in vips}


def _run(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, input=stdin.encode() if stdin else None, capture_output=True)
    if check and proc.returncode != 0:
        raise KernelError(" ".join(args[:3]), None, proc.stderr.decode(errors="replace").strip())
    return proc


def _jump_rule(vip: str, version: int = 4, chain: str = CHAIN) -> list[str]:
    if chain == CHAIN:  # what the verdict map accepted (nodeshim.nftnode) skips the list
        mark = f"{fastpath.FAST_MARK:#x}/{fastpath.FAST_MARK:#x}"
        return ["-d", f"{vip}/{_TOOLS[version][3]}", "!", "-i", "lo", "-m", "mark", "!", "--mark", mark, "-j", chain]
    return ["-d", f"{vip}/{_TOOLS[version][3]}", "!", "-i", "lo", "-j", chain]


def _old_jump_rule(vip: str, version: int = 4) -> list[str]:
    """The jump of agents older than the verdict map (no mark test): removed when seen."""
    return ["-d", f"{vip}/{_TOOLS[version][3]}", "!", "-i", "lo", "-j", CHAIN]


def _mute_rule(vip: str, version: int = 4) -> list[str]:
    """mangle OUTPUT: what a dumped connection's socket sends (muted: fastpath.MUTE_MARK)
    does not leave the node."""
    mark = f"{fastpath.MUTE_MARK:#x}/{fastpath.MUTE_MARK:#x}"
    return ["-s", f"{vip}/{_TOOLS[version][3]}", "-m", "mark", "--mark", mark,
            "-m", "comment", "--comment", "vipcluster-mute", "-j", "DROP"]


def _out_jump_rule(vip: str, version: int = 4) -> list[str]:
    return ["-s", f"{vip}/{_TOOLS[version][3]}", "!", "-o", "lo", "-j", RAW_OUT_CHAIN]


# several queues (queue_count > 1, IPv4): "-j NFQUEUE" becomes a jump to a fan-out chain that
# picks queue N + (source port & (count - 1)) per flow (clustercore.fastpath.fanout_rules)
FANOUT_CHAINS = {fastpath.FANOUT_CHAIN: False, fastpath.FANOUT_BYPASS_CHAIN: True}  # chain: bypass


def install(vips: str | Iterable[str], queue_num: int,
            fast_rules: list[str] | dict[int, list[str]] | None = None, queue_count: int = 1,
            notrack: dict[int, tuple[list[str], list[str]]] | None = None) -> None:
    """Create (or replace) our chain and the jump to it, atomically, for each VIP's family.
    `fast_rules`: one list for every family, or {version: list} (fastpath.to_iptables).
    `notrack`: {version: (incoming, outgoing)} for the raw table's chains (fastpath.to_notrack);
    None: no raw chains at all (a node with conntrack off: two hooks fewer per packet).
    IPv6 uses the first queue only (the fan-out's u32 match reads an IPv4 header)."""
    for version, vip in sorted(_families(vips).items()):
        tool, restore, _, _ = _TOOLS[version]
        count = queue_count if version == 4 else 1
        rules = fast_rules.get(version, []) if isinstance(fast_rules, dict) else fast_rules
        heads = [f":{CHAIN} - [0:0]"]
        body = [f"-A {CHAIN} {r}" for r in (rules or [])]
        body.append(f"-A {CHAIN} -j {fastpath.queue_target(queue_num, count, False)}")
        if count > 1:
            for chain, bypass in FANOUT_CHAINS.items():
                heads.append(f":{chain} - [0:0]")
                body += [f"-A {chain} {r}" for r in fastpath.fanout_rules(queue_num, count, bypass)]
        script = ["*mangle", *heads, *body, "COMMIT", ""]
        hooks = [("mangle", "PREROUTING", _jump_rule(vip, version))]
        if version not in _installed:  # static: looked for once per agent
            hooks.append(("mangle", "OUTPUT", _mute_rule(vip, version)))
        if notrack is not None:
            incoming, outgoing = notrack.get(version, ([], []))
            script[:0] = ["*raw", f":{RAW_CHAIN} - [0:0]", f":{RAW_OUT_CHAIN} - [0:0]",
                          *(f"-A {RAW_CHAIN} {r}" for r in incoming), *(f"-A {RAW_OUT_CHAIN} {r}" for r in outgoing),
                          "COMMIT"]
            hooks[:0] = [("raw", "PREROUTING", _jump_rule(vip, version, RAW_CHAIN)),
                         ("raw", "OUTPUT", _out_jump_rule(vip, version))]
        elif version not in _installed:  # an agent with conntrack on ran here before
            _remove_raw(tool, vip, version)
        # which jumps are missing is asked before the restore: from the restore's commit on,
        # a migrating service's packets wait in the queue for the agent's loop, which
        # this call blocks (one `-C` subprocess fewer in that window, for every sync)
        missing = [(table, hook, jump) for table, hook, jump in hooks
                   if _run([tool, "-w", "-t", table, "-C", hook, *jump], check=False).returncode != 0]
        _run([restore, "-w", "--noflush"], "\n".join(script))
        for table, hook, jump in missing:  # the chains exist now
            _run([tool, "-w", "-t", table, "-I", hook, "1", *jump])
        if version not in _installed:  # an older agent's jump would read the list again
            _run([tool, "-w", "-t", "mangle", "-D", "PREROUTING", *_old_jump_rule(vip, version)], check=False)
        _installed.add(version)


def _remove_raw(tool: str, vip: str, version: int) -> None:
    for hook, jump in (("PREROUTING", _jump_rule(vip, version, RAW_CHAIN)),
                       ("OUTPUT", _out_jump_rule(vip, version))):
        while _run([tool, "-w", "-t", "raw", "-D", hook, *jump], check=False).returncode == 0:
            pass
    for chain in (RAW_CHAIN, RAW_OUT_CHAIN):
        _run([tool, "-w", "-t", "raw", "-F", chain], check=False)
        _run([tool, "-w", "-t", "raw", "-X", chain], check=False)


def chain_exists(version: int = 4) -> bool:
    return _run([_TOOLS[version][0], "-w", "-t", "mangle", "-S", CHAIN], check=False).returncode == 0


def remove(vips: str | Iterable[str]) -> None:
    """Remove the jump and our chain of each VIP's family (idempotent)."""
    for version, vip in sorted(_families(vips).items()):
        tool = _TOOLS[version][0]
        for hook, jump in (("PREROUTING", _jump_rule(vip, version)), ("PREROUTING", _old_jump_rule(vip, version)),
                           ("OUTPUT", _mute_rule(vip, version))):
            while _run([tool, "-w", "-t", "mangle", "-D", hook, *jump], check=False).returncode == 0:
                pass
        _run([tool, "-w", "-t", "mangle", "-F", CHAIN], check=False)
        _run([tool, "-w", "-t", "mangle", "-X", CHAIN], check=False)
        _remove_raw(tool, vip, version)
        for chain in FANOUT_CHAINS:  # only referenced from CHAIN, gone now
            _run([tool, "-w", "-t", "mangle", "-F", chain], check=False)
            _run([tool, "-w", "-t", "mangle", "-X", chain], check=False)
        _installed.discard(version)


def read_counters(versions: Iterable[int] | None = None) -> dict[str, dict[str, int]]:
    """Per-service packet counters of our chain's rules, from the kernel, summed over the
    families asked (default: those this process installed, else IPv4):
    {service: {"accepted": n, "dropped": n}} (rules tagged `vip:NAME`)."""
    if versions is None:
        versions = sorted(_installed) or (4,)
    import re

    out: dict[str, dict[str, int]] = {}
    pat = re.compile(r'^\[(\d+):\d+\] -A ' + CHAIN + r' .*--comment "?vip:([^" ]+)"? -j (ACCEPT|DROP)')
    for version in sorted(set(versions)):
        proc = _run([_TOOLS[version][2], "-c", "-t", "mangle"], check=False)
        for line in proc.stdout.decode(errors="replace").splitlines():
            m = pat.match(line)
            if m:
                pkts, name, target = int(m.group(1)), m.group(2), m.group(3)
                c = out.setdefault(name, {"accepted": 0, "dropped": 0})
                c["accepted" if target == "ACCEPT" else "dropped"] += pkts
    return out


def versions(vips: str | Iterable[str]) -> tuple[int, ...]:
    """The IP versions of one VIP or several: which tables this node uses."""
    return tuple(sorted(_families(vips)))
