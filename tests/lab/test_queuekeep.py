"""A queue outlives its listener when the fd store keeps its socket, and the successor gives
every packet in it a verdict: the kernel mechanism under nodeshim.queuekeep, alone.

One throw-away namespace (loopback only), a rule sending UDP to 127.0.0.1:9999 to queue 7.
A listener binds the queue (netfilterqueue, nodeshim.queue.PacketQueue), stores its socket
in an fd store (vipctl.supervise.FdStore, the lab supervisor's), HOLDs the first 4
datagrams it reads and then reads nothing; 6 more arrive unread; it is SIGKILLed. A
successor started from the store (LISTEN_FDS) takes the queue over (AdoptedQueue): the 4
held get one batch verdict (accept or drop, as the dead agent's roles say; or repeat: the
kernel queues them again, bytes and all, behind the unread, and the successor decides them
as it reads them), the 6 unread are decided one by one (accepted). The receiver counts
what the kernel delivered, in order.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.lab.conftest import ROOT, unique_prefix
from vipctl.supervise import FdStore

LISTENER = r"""
import asyncio
from clustercore.ownership import Verdict
from nodeshim.queue import PacketQueue
from vipwire import systemd
held = []
def decide(data, mac, handle, now):
    held.append(handle)
    if len(held) == 4:
        loop.remove_reader(q.fileno())  # from now on nothing is read: the rest waits unread
    return Verdict.HOLD
loop = asyncio.new_event_loop()
q = PacketQueue(7, 1024, decide)
assert systemd.store_fds("nfqueue-7", [q.fileno()])
q.attach(loop)
print("ready", flush=True)
loop.run_forever()
"""

SUCCESSOR = r"""
import sys
from clustercore.ownership import Verdict
from nodeshim.queue import AdoptedQueue
from nodeshim.queuekeep import take_fd_store
from types import SimpleNamespace
socks, _ = take_fd_store(SimpleNamespace(queue_nums=range(7, 8)))
q = AdoptedQueue.take_over(7, socks[7], 1024, sys.argv[1], lambda *a: Verdict.ACCEPT)
print("taken", q.left_held, q.left_unread, flush=True)
# what comes back to the queue ("repeat": the held ones, queued again) is decided as it is read
import asyncio
loop = asyncio.new_event_loop()
q.attach(loop)
loop.run_until_complete(asyncio.sleep(1.0))
"""

RECEIVER = r"""
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 9999)); r.settimeout(4)
print("listening", flush=True)
got = []
try:
    while True:
        got.append(r.recv(100).decode())
except socket.timeout:
    pass
print(" ".join(got), flush=True)
"""

SENDER = r"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(10):
    s.sendto(b"d%d" % i, ("127.0.0.1", 9999))
    if i == 3:
        time.sleep(0.5)  # the listener has read and held 4; the 6 others stay unread
"""


def _in_ns(ns, script, *args, **kw):
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
                            cwd=ROOT, env=kw.pop("env", None) or dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("held", ["accept", "drop", "repeat"])
def test_a_killed_listeners_queue_is_taken_over_with_what_it_held_and_never_read(tmp_path, held):
    ns = unique_prefix("nq")
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    procs = []
    store = FdStore(str(tmp_path / "store"))
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", "-t", "mangle", "-A", "OUTPUT", "-o", "lo",
                        "-p", "udp", "--dport", "9999", "-j", "NFQUEUE", "--queue-num", "7"], check=True)
        receiver = _in_ns(ns, RECEIVER)
        procs.append(receiver)
        assert receiver.stdout.readline().strip() == "listening"
        listener = _in_ns(ns, LISTENER, env=dict(os.environ, PYTHONPATH=ROOT, NOTIFY_SOCKET=store.path))
        procs.append(listener)
        store.pid = listener.pid  # `ip netns exec` execs python: same pid
        assert listener.stdout.readline().strip() == "ready"
        store.drain()
        assert [n for n, _ in store.fds] == ["nfqueue-7"]
        sender = _in_ns(ns, SENDER)
        procs.append(sender)
        sender.wait(10)
        time.sleep(0.3)
        os.kill(listener.pid, signal.SIGKILL)
        listener.wait(10)
        stats = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/netfilter/nfnetlink_queue"],
                               capture_output=True, text=True).stdout.split()
        assert stats[:1] == ["7"] and stats[2] == "10", stats  # kept: 10 packets still queued
        env = dict(os.environ, PYTHONPATH=ROOT)
        argv, copies = store.passed([sys.executable, "-c", SUCCESSOR, held], env)
        successor = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=ROOT, env=env, pass_fds=copies,
                                     stdout=subprocess.PIPE, text=True)
        procs.append(successor)
        for fd in copies:
            os.close(fd)
        out, _ = successor.communicate(timeout=20)
        got, _ = receiver.communicate(timeout=20)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        store.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print(f"held {held}: successor {out.strip()!r}; receiver got {got.strip()!r}")
    assert out.split() == ["taken", "4", "6"], out
    want = {"accept": [f"d{i}" for i in range(10)],
            "drop": [f"d{i}" for i in range(4, 10)],
            # each once; the held ones behind the unread (decided first, queued first)
            "repeat": [f"d{i}" for i in range(4, 10)] + [f"d{i}" for i in range(4)]}[held]
    assert got.split() == want
