"""A queued packet's decision is timed by its arrival, not by when the loop read it
(nodeshim.queue.ArrivalStamps, arrived_at): the kernel mechanism alone.

Two throw-away namespaces joined by a veth pair (192.0.2.1 and 192.0.2.2, nothing else),
a rule in the second sending UDP to 192.0.2.2:9998 to queue 8 (PREROUTING: the kernel
stamps what it receives, not what a socket of its own sends). A child there binds the queue
(netfilterqueue, nodeshim.queue.PacketQueue) with the kernel's receive timestamps on, has
one datagram sent from the first namespace, sleeps LATE_S without reading, then reads:
the decision's `now` must be the datagram's arrival, about LATE_S before the read, as a
destination's hold is while its loop restores thousands of connections. The same child
then turns the timestamps off and back on (the socket that asks for them is closed and
opened again) and a second datagram is still timed by its arrival. A third is read from
the queue's netlink socket as raw bytes (what an agent that took the queue over reads,
nodeshim.nfqraw): the kernel's timestamp attribute decodes to the send's wall clock time.
"""

import json
import os
import subprocess
import sys

from tests.lab.conftest import ROOT, unique_prefix

LATE_S = 0.3

CHILD = r"""
import json, subprocess, sys, time
from clustercore.ownership import Verdict
from nodeshim.queue import ArrivalStamps, PacketQueue
late, sender_ns = float(sys.argv[1]), sys.argv[2]
SEND = ("import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "print(time.monotonic(), flush=True); s.sendto(b'%s', ('192.0.2.2', 9998))")
seen = []
def decide(data, mac, handle, now):
    seen.append((data[28:].decode(), now, time.monotonic()))
    return Verdict.ACCEPT
stamps = ArrivalStamps()
stamps.want(True)
q = PacketQueue(8, 64, decide)
out = []
for name in ("first", "second"):
    time.sleep(0.2)  # the kernel turns stamping on from a work queue: not at once
    sent = float(subprocess.run(["ip", "netns", "exec", sender_ns, sys.executable, "-c", SEND % name],
                                capture_output=True, text=True, check=True).stdout)
    time.sleep(late)  # queued, not read
    q.flush()
    out.append({"sent": sent, "seen": seen[-1]})
    stamps.want(False)
    stamps.want(True)
# the third, read raw: the bytes the kernel sent, through our own decoder
import socket
from nodeshim import nfqraw
raw = socket.socket(fileno=__import__("os").dup(q.fileno()))
wall_sent = time.time()
subprocess.run(["ip", "netns", "exec", sender_ns, sys.executable, "-c", SEND % "third"], check=True,
               capture_output=True)
msgs = [m for m in nfqraw.decode(raw.recv(65536)) if isinstance(m, nfqraw.PacketMessage)]
raw.send(nfqraw.verdict(8, msgs[0].packet_id, accept=True))
raw.close()
q.close()
stamps.want(False)
print(json.dumps({"runs": out, "on_after": stamps.on, "raw": [msgs[0].payload[28:].decode(), wall_sent,
                  msgs[0].timestamp, time.time()]}), flush=True)
"""


def _ip(*args):
    subprocess.run(["ip", *args], check=True)


def test_a_packet_read_late_is_timed_by_its_arrival():
    prefix = unique_prefix("nt")
    sender, ns = f"{prefix}-a", f"{prefix}-b"
    for name in (sender, ns):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        _ip("netns", "add", name)
    try:
        _ip("-n", sender, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ns)
        for name, addr in ((sender, "192.0.2.1/24"), (ns, "192.0.2.2/24")):
            _ip("-n", name, "addr", "add", addr, "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", "-t", "mangle", "-A", "PREROUTING", "-i", "eth0",
                        "-p", "udp", "--dport", "9998", "-j", "NFQUEUE", "--queue-num", "8"], check=True)
        done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, str(LATE_S), sender],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["on_after"] is False
        payload, before, stamp, after = report["raw"]
        assert payload == "third" and before < stamp < after, report["raw"]
        for run, name in zip(report["runs"], ("first", "second")):
            payload, now, read_at = run["seen"]
            assert payload == name
            # timed by arrival: within a few ms after the send, LATE_S before the read
            assert run["sent"] - 0.001 <= now <= run["sent"] + 0.05, run
            assert read_at - now >= LATE_S - 0.05, run
    finally:
        for name in (sender, ns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
