"""A queue kept across an agent's death: the fd store (lab supervisor, vipwire.systemd), the
take-over of a kept queue (nodeshim.queue.AdoptedQueue) against an in-memory kernel, and
the one verdict for what the dead agent held (nodeshim.queuekeep.RoleRecord)."""

import os
import socket
import struct
import subprocess
import sys
import threading
import types

from clustercore.ownership import Verdict
from nodeshim import nfqraw
from nodeshim.queue import AdoptedQueue
from nodeshim.queuekeep import RoleRecord
from vipctl.supervise import FdStore
from vipwire import systemd


class FakeKernel(threading.Thread):
    """The kernel's end of a queue socket: acks the config message with `errno`, then
    records every verdict (decoded) until the socket closes."""

    def __init__(self, sock, errno=0):
        super().__init__(daemon=True)
        self.sock, self.errno, self.got = sock, errno, []

    def run(self):
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data)
            if kind == 3 << 8 | 2 and flags & nfqraw.NLM_F_ACK:
                self.sock.send(nfqraw.error_message(seq, self.errno))
                continue
            verdict, pid = struct.unpack_from("!II", data, 24)
            self.got.append(("batch" if kind == 3 << 8 | 3 else "one", pid,
                             {0: "drop", 1: "accept", 4: "repeat"}.get(verdict, verdict)))
            if pid == 0xDEAD:
                return


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def test_a_kept_queue_is_taken_over_held_packets_in_one_batch_then_each_unread_one_decided():
    ours, kernel_end = _pair()
    kernel = FakeKernel(kernel_end)
    # the dead agent had read (and held) ids up to 10; 11..13 wait unread in the socket
    for pid, payload in ((11, b"keep"), (12, b"drop"), (13, b"keep")):
        kernel_end.send(nfqraw.packet_message(7, pid, payload, b"\x02\0\0\0\0\x01"))
    kernel.start()
    seen = []

    def decide(data, epoch, handle, now):
        seen.append((data, epoch, handle.packet_id))
        return Verdict.ACCEPT if data == b"keep" else Verdict.DROP

    q = AdoptedQueue.take_over(7, ours, 65536, held="accept", decide=decide)
    assert q is not None and q.left_unread == 3
    ours.send(nfqraw.verdict(7, 0xDEAD, True))  # ends the fake kernel's loop
    kernel.join(5)
    assert kernel.got == [("batch", 10, "accept"), ("one", 11, "accept"), ("one", 12, "drop"),
                          ("one", 13, "accept"), ("one", 0xDEAD, "accept")]
    assert seen == [(b"keep", "02:00:00:00:00:01", 11), (b"drop", "02:00:00:00:00:01", 12),
                    (b"keep", "02:00:00:00:00:01", 13)]


def test_a_held_packet_of_a_taken_over_queue_gets_its_verdict_later_once():
    ours, kernel_end = _pair()
    kernel = FakeKernel(kernel_end)
    kernel_end.send(nfqraw.packet_message(7, 5, b"held"))
    kernel.start()
    held = []
    q = AdoptedQueue.take_over(7, ours, 1024, held="drop",
                               decide=lambda d, e, h, n: held.append(h) or Verdict.HOLD)
    assert q is not None and [h.get_payload() for h in held] == [b"held"]
    held[0].drop()
    held[0].accept()  # a second verdict is not sent
    ours.send(nfqraw.verdict(7, 0xDEAD, True))
    kernel.join(5)
    assert kernel.got == [("batch", 4, "drop"), ("one", 5, "drop"), ("one", 0xDEAD, "accept")]


def test_a_kept_socket_without_an_instance_is_not_taken_over():
    ours, kernel_end = _pair()
    kernel = FakeKernel(kernel_end, errno=19)  # ENODEV: unbound (an orderly stop)
    kernel.start()
    assert AdoptedQueue.take_over(7, ours, 1024, "drop", lambda *a: Verdict.ACCEPT) is None
    ours.close()
    kernel.join(5)
    assert kernel.got == []


def test_the_role_record_says_which_way_the_dead_agents_hold_goes(tmp_path):
    rec = RoleRecord(str(tmp_path / "roles.json"))
    assert rec.held_verdict() == "drop"  # nothing recorded: nothing was held

    class Role:
        def __init__(self, verdict, phase="p", ended=False):
            self.undecided_verdict, self.phase, self.ended = verdict, phase, ended

    class SourceCutover(Role): pass  # noqa: E701

    class DestCutover(Role): pass  # noqa: E701

    class BatchDest: pass  # noqa: E701  (says nothing)

    rec.write({"echo": SourceCutover(Verdict.ACCEPT, "frozen")})
    assert rec.read() == {"echo": {"kind": "SourceCutover", "phase": "frozen", "undecided": "accept",
                                   "ended": False}}
    assert rec.held_verdict() == "accept"
    rec.write({"echo": DestCutover(Verdict.DROP)})
    assert rec.held_verdict() == "drop"
    # a released destination in its grace and a source before its commit: both accept
    rec.write({"echo": SourceCutover(Verdict.ACCEPT), "kv": DestCutover(Verdict.ACCEPT)})
    assert rec.held_verdict() == "accept"
    # roles that disagree while one holds: dropped
    rec.write({"echo": SourceCutover(Verdict.ACCEPT), "kv": DestCutover(Verdict.DROP)})
    assert rec.held_verdict() == "drop"
    rec.write({"echo": SourceCutover(Verdict.DROP, ended=True), "kv": DestCutover(Verdict.ACCEPT)})
    assert rec.held_verdict() == "drop"
    # both over (a committed source of one, the released destination of the other): nothing
    # is held, what is there is decided again by its bytes
    rec.write({"echo": SourceCutover(Verdict.DROP, ended=True), "kv": DestCutover(Verdict.ACCEPT, ended=True)})
    assert rec.held_verdict() == "repeat"
    rec.write({"echo": DestCutover(None)})
    assert rec.read()["echo"]["undecided"] == "unknown" and rec.held_verdict() == "drop"
    rec.write({"echo": BatchDest(), "kv": DestCutover(Verdict.ACCEPT, ended=True)})
    assert rec.read()["echo"] == {"kind": "BatchDest", "phase": "", "undecided": "unknown", "ended": False}
    assert rec.held_verdict() == "drop"
    (tmp_path / "roles.json").write_text("{not json")
    assert rec.held_verdict() == "drop"
    (tmp_path / "roles.json").write_text('{"echo": ["odd"], "kv": {"undecided": 7, "ended": 1}}')
    assert rec.held_verdict() == "drop"


def test_a_role_record_of_the_older_form_reads_as_it_was_meant(tmp_path):
    """An agent before phases were recorded wrote {service: kind}: a source accepted."""
    path = tmp_path / "roles.json"
    rec = RoleRecord(str(path))
    path.write_text('{"echo": "SourceCutover"}')
    assert rec.held_verdict() == "accept"
    path.write_text('{"echo": "SourceCutover", "kv": "DestCutover"}')
    assert rec.held_verdict() == "drop"


def test_the_real_roles_record_their_phase(tmp_path):
    from clustercore.cutover import DestCutover, SourceCutover
    rec = RoleRecord(str(tmp_path / "roles.json"))
    src, dst = SourceCutover("02:00:00:00:00:0b"), DestCutover("02:00:00:00:00:0b")
    rec.write({"echo": src, "kv": dst})
    assert rec.read()["kv"] == {"kind": "DestCutover", "phase": "holding", "undecided": "drop", "ended": False}
    dst.release({}, 1.0)
    dst.settle()
    src.freeze(1.0)
    rec.write({"echo": src, "kv": dst})
    assert rec.read()["kv"]["undecided"] == "accept" and rec.read()["echo"]["phase"] == "frozen"
    assert rec.held_verdict() == "accept"
    src.commit()
    rec.write({"echo": src, "kv": dst})
    assert rec.read()["echo"]["ended"] and rec.read()["kv"]["ended"]
    assert rec.held_verdict() == "repeat"


def test_a_taken_over_queue_puts_what_was_read_through_the_rules_again(tmp_path):
    """"repeat": one NF_REPEAT batch verdict up to the first unread id, before the unread
    are decided (the kernel queues the repeated ones again behind them)."""
    ours, kernel_end = _pair()
    kernel = FakeKernel(kernel_end)
    kernel_end.send(nfqraw.packet_message(7, 21, b"unread"))
    kernel.start()
    q = AdoptedQueue.take_over(7, ours, 1024, held="repeat", decide=lambda d, e, h, n: Verdict.ACCEPT)
    assert q is not None
    ours.send(nfqraw.verdict(7, 0xDEAD, True))
    kernel.join(5)
    assert kernel.got == [("batch", 20, "repeat"), ("one", 21, "accept"), ("one", 0xDEAD, "accept")]
    import pytest
    with pytest.raises(ValueError):
        AdoptedQueue.take_over(7, ours, 1024, held="maybe", decide=lambda *a: Verdict.DROP)


def test_the_supervisor_keeps_what_its_daemon_stores_and_passes_it_to_the_next_one(tmp_path, monkeypatch):
    store = FdStore(str(tmp_path / "n1"))
    store.pid = os.getpid()  # we play the daemon
    monkeypatch.setenv("NOTIFY_SOCKET", store.path)
    r, w = os.pipe()
    assert systemd.store_fds("nfqueue-7", [r])
    os.close(r)
    store.drain()
    assert [n for n, _ in store.fds] == ["nfqueue-7"]
    # another process's message is not heard (NotifyAccess=main)
    code = subprocess.run([sys.executable, "-c", "import os, sys; sys.path.insert(0, os.getcwd());"
                           "from vipwire import systemd; systemd.remove_fds('nfqueue-7')"],
                          env=dict(os.environ, PYTHONPATH=os.getcwd())).returncode
    assert code == 0
    store.drain()
    assert [n for n, _ in store.fds] == ["nfqueue-7"]
    # the next instance gets it as fd 3, named, with LISTEN_PID its own
    env = {"PYTHONPATH": os.getcwd(), "PATH": os.environ.get("PATH", "")}
    probe = ("import os; from vipwire import systemd; fds = systemd.listen_fds();"
             "print(fds, os.read(fds[0][1], 5), 'LISTEN_FDS' in os.environ)")
    argv, copies = store.passed([sys.executable, "-c", probe], env)
    os.write(w, b"hello")
    out = subprocess.run(argv, env=env, pass_fds=copies, capture_output=True, text=True)
    for fd in copies:
        os.close(fd)
    assert out.stdout.strip() == "[('nfqueue-7', 3)] b'hello' False", out.stderr
    assert systemd.remove_fds("nfqueue-7")
    store.drain()
    assert store.fds == []
    store.close()
    os.close(w)


def test_listen_fds_are_not_taken_when_meant_for_another_process(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == [] and "LISTEN_FDS" not in os.environ


def test_queues_are_taken_over_where_kept_and_bound_afresh_elsewhere(monkeypatch):
    from nodeshim import queue as qmod

    bound = []

    class FakeFresh:
        def __init__(self, q, max_len, decide):
            self.queue_num = q
            bound.append(q)

    def take_over(q, sock, max_len, held, decide):
        assert held == "accept"
        # queue 2's socket holds no instance
        return None if q == 2 else types.SimpleNamespace(queue_num=("adopted", q))

    monkeypatch.setattr(qmod, "PacketQueue", FakeFresh)
    monkeypatch.setattr(qmod.AdoptedQueue, "take_over", staticmethod(take_over))
    socks = {q: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) for q in (1, 2, 9)}
    qs = qmod.PacketQueues(0, 4, 1024, lambda *a: Verdict.ACCEPT, socks, held="accept")
    assert [getattr(q, "queue_num", q) for q in qs.queues] == [0, ("adopted", 1), 2, 3]
    assert bound == [0, 2, 3] and [q.queue_num for q in qs.fresh] == [0, 2, 3]
    # queue 2's dead socket and queue 9's (not ours) are closed; queue 1's is the adopted queue's
    assert socks[2].fileno() == -1 and socks[9].fileno() == -1 and socks[1].fileno() != -1


def test_a_freezes_decision_of_what_waits_is_one_budgeted_drain_of_every_queue(monkeypatch):
    """DecideWaiting (a handoff's freeze) drains each queue as one wake-up of the loop does,
    DRAIN_BUDGET packets at most: never the unbounded flush a burst would empty into a
    stopped program's sockets."""
    from nodeshim import queue as qmod

    calls = []

    class FakeFresh:
        def __init__(self, q, max_len, decide):
            self.queue_num = q

        def _drain_some(self):
            calls.append(("some", self.queue_num))

        def flush(self):
            calls.append(("all", self.queue_num))

    monkeypatch.setattr(qmod, "PacketQueue", FakeFresh)
    qs = qmod.PacketQueues(0, 3, 1024, lambda *a: Verdict.ACCEPT, {}, held="accept")
    qs.drain_some()
    assert calls == [("some", 0), ("some", 1), ("some", 2)]
