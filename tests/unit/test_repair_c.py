"""nodeshim._repair's record parser (no root, no sockets): total on any bytes, and it
accepts exactly what clustercore.sockwire's checked decoder accepts.

The C restore parses records that came from another node. Here random, truncated and
mutated records go through it: every one must either pass or raise ValueError, before a
syscall (restore_many is given fd -1: a record that parses reaches the kernel and fails
there with EBADF, a clean RepairError). The lab tests (tests/lab/test_repair_c.py) check the
C and Python paths against each other on real sockets.
"""

from __future__ import annotations

import errno
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore import sockwire
from clustercore.sockstate import TcpConnState, TcpWindow
from nodeshim import repairc

try:
    from nodeshim import _repair
except ImportError:  # pragma: no cover - scripts/build-repair not run
    _repair = None

needs_ext = pytest.mark.skipif(_repair is None, reason="nodeshim._repair not built (scripts/build-repair)")

HEADS = {4: struct.Struct("!4sH4sHHBBBIIIIIIIIIIIB"), 6: struct.Struct("!16sH16sHHBBBIIIIIIIIIIIB")}


def test_ci_builds_the_extension():
    """CI runs scripts/setup, which builds it: a missing module there is a broken build,
    not a reason to test only the fallback."""
    if os.environ.get("CI") and _repair is None:
        pytest.fail("nodeshim._repair is not built although scripts/setup ran (scripts/build-repair)")


def _state(**kw) -> TcpConnState:
    base = dict(local=("198.51.100.2", 8080), remote=("198.51.100.1", 40000), family=4, mss=1448,
                window_scaling=True, snd_wscale=7, rcv_wscale=7, timestamps=True, tsval=0xDEADBEEF,
                sack=True, window=TcpWindow(snd_wl1=100, snd_wnd=5000, max_window=6000, rcv_wnd=7000,
                                            rcv_wup=90),
                send_seq=0xFFFFFFF0, recv_seq=100, recv_queue=b"hello", send_queue=b"0123456789",
                unsent_len=4, name="conn-8080")
    base.update(kw)
    return TcpConnState(**base)


def _python_accepts(rec: bytes, family: int) -> bool:
    try:
        return len(sockwire._unpack_python(rec, family)) == 1
    except (ValueError, UnicodeDecodeError):
        return False


def _c_accepts(rec: bytes, family: int) -> bool:
    try:
        _repair.check_record(rec, family)
        return True
    except ValueError:
        return False


@needs_ext
def test_records_packed_by_python_pass_and_decode_back_exactly():
    six = _state(local=("2001:db8::2", 8080), remote=("2001:db8::1", 40000), family=6, name=None)
    for s in (_state(), _state(recv_queue=b"", send_queue=b"", unsent_len=0), six,
              _state(window_scaling=False, snd_wscale=0, rcv_wscale=0, timestamps=False, sack=False)):
        rec = sockwire.pack_connection(s)
        _repair.check_record(rec, s.family)
        # the trusted decoder (used for this node's own dumps) gives the checked one's result
        assert sockwire.from_local_record(rec, s.family) == s == sockwire.unpack_connections(rec, s.family)[0]


@needs_ext
@pytest.mark.parametrize("mutate, problem", [
    (lambda h: h.update(flags=h["flags"] | 8), "unknown flag bits"),
    (lambda h: h.update(sws=15), "window scale"),
    (lambda h: h.update(flags=0, sws=1, rws=0), "window_scaling is false"),
    (lambda h: h.update(unsent=11), "unsent_len"),
    (lambda h: h.update(maxw=1), "max_window"),
    (lambda h: h.update(rwup=101), "rcv_wup"),
    (lambda h: h.update(wl1=100 + 7000 + 1), "snd_wl1"),
    (lambda h: h.update(mss=0), "mss 0"),
    (lambda h: h.update(lport=0), "port 0"),
    (lambda h: h.update(rlen=6), "record length"),
    (lambda h: h.update(slen=0xFFFFFFFF), "record length"),
    (lambda h: h.update(nlen=255), "record length"),
])
def test_each_bad_field_is_refused_by_name(mutate, problem):
    names = ["lip", "lport", "rip", "rport", "mss", "sws", "rws", "flags", "tsval", "wl1", "swnd",
             "maxw", "rwnd", "rwup", "sseq", "rseq", "rlen", "slen", "unsent", "nlen"]
    s = _state()
    rec = sockwire.pack_connection(s)
    head = dict(zip(names, HEADS[4].unpack_from(rec)))
    mutate(head)
    bad = HEADS[4].pack(*head.values()) + rec[HEADS[4].size:]
    with pytest.raises(ValueError, match=problem):
        _repair.check_record(bad, 4)
    with pytest.raises(ValueError, match=problem):  # restore refuses it before any syscall
        _repair.restore_many([(-1, 4, bad)])


@needs_ext
def test_a_bad_name_and_a_bad_family_are_refused():
    rec = sockwire.pack_connection(_state(name="ab"))
    with pytest.raises(ValueError, match="bad name"):
        _repair.check_record(rec.replace(b"ab", b"a:"), 4)
    with pytest.raises(ValueError, match="family"):
        _repair.check_record(rec, 5)


@needs_ext
def test_truncated_and_extended_records_give_a_clean_error():
    for family, s in ((4, _state()), (6, _state(local=("2001:db8::2", 1), remote=("2001:db8::1", 2), family=6))):
        rec = sockwire.pack_connection(s)
        for cut in range(len(rec)):
            with pytest.raises(ValueError):
                _repair.check_record(rec[:cut], family)
        with pytest.raises(ValueError, match="record length"):
            _repair.check_record(rec + b"x", family)
        with pytest.raises(ValueError):  # the other family's layout
            _repair.check_record(rec, 10 - family)


@needs_ext
def test_random_blobs_never_crash_the_parser_or_restore():
    rnd = random.Random(1313)
    passed = 0
    for i in range(20_000):
        family = rnd.choice((4, 6))
        blob = rnd.randbytes(rnd.randrange(0, 200))
        if i % 2:  # make the lengths plausible so the parser goes past its first check
            head = HEADS[family]
            blob = blob.ljust(head.size, b"\0")
            extra = rnd.randrange(0, 40)
            blob = blob[:head.size - 13] + struct.pack("!IIIB", extra, 0, 0, 0) + rnd.randbytes(extra)
        assert _c_accepts(blob, family) == (_python_accepts(blob, family) and _flags_clean(blob, family))
        try:
            _repair.restore_many([(-1, family, blob)])
        except ValueError:
            continue
        except _repair.RepairError as exc:  # parsed: the first syscall meets fd -1
            passed += 1
            assert exc.args[1:3] == ("TCP_REPAIR on", errno.EBADF)
            continue
        pytest.fail("restore_many on fd -1 succeeded")
    assert passed > 100  # the plausible half really reached the kernel


def _flags_clean(blob: bytes, family: int) -> bool:
    """The C parser also refuses flag bits the format does not define; sockwire ignores them."""
    head = HEADS[family]
    return len(blob) < head.size or head.unpack_from(blob)[7] & ~7 == 0


_u32 = st.integers(0, 0xFFFFFFFF)


@needs_ext
@settings(max_examples=400, deadline=None)
@given(family=st.sampled_from((4, 6)), port=st.integers(0, 3), mss=st.integers(0, 3000),
       sws=st.integers(0, 15), rws=st.integers(0, 15), flags=st.integers(0, 7),
       ts=_u32, wnd=st.tuples(_u32, _u32, _u32), near=st.tuples(st.integers(-3, 3), st.integers(-3, 3)),
       sseq=_u32, rseq=_u32, rq=st.binary(max_size=20), sq=st.binary(max_size=20),
       unsent=st.integers(0, 25), name=st.sampled_from((b"", b"conn-80", b"a b", b"x:y", b"\xff")))
def test_c_parser_accepts_exactly_what_sockwire_accepts(family, port, mss, sws, rws, flags, ts, wnd,
                                                       near, sseq, rseq, rq, sq, unsent, name):
    """Fields drawn near each check's edge (rcv_wup and snd_wl1 around the limits the
    kernel's own checks put on them), so that records fail on one check at a time."""
    ip = b"\xc6\x33\x64\x02" if family == 4 else bytes.fromhex("20010db8" + "0" * 23 + "2")
    swnd, maxw, rwnd = wnd
    rwup = (rseq + near[0]) & 0xFFFFFFFF
    wl1 = (rseq + rwnd + near[1]) & 0xFFFFFFFF
    rec = HEADS[family].pack(ip, port, ip, 80, mss, sws, rws, flags, ts, wl1, swnd, maxw, rwnd, rwup,
                             sseq, rseq, len(rq), len(sq), unsent, len(name)) + name + rq + sq
    assert _c_accepts(rec, family) == _python_accepts(rec, family)
    _c_reads_what_python_reads(rec, family)


def _c_reads_what_python_reads(data: bytes, family: int) -> None:
    """unpack_many (a peer's records in C) gives the Python reader's states, `packed` too,
    or refuses; and sockwire.unpack_connections, which tries C first, always gives the
    Python reader's answer."""
    try:
        want = sockwire._unpack_python(data, family)
    except ValueError:
        want = None
    try:
        got = tuple(_repair.unpack_many(data, family, repairc._BUILD))
    except ValueError:
        got = None
    if got is not None:
        assert want is not None, "C accepted records the Python reader refuses"
        assert got == want and [s.packed for s in got] == [s.packed for s in want]
    try:
        assert sockwire.unpack_connections(data, family) == want
    except ValueError:
        assert want is None


@needs_ext
def test_c_reads_several_records_as_python_does_and_refuses_any_cut():
    six = _state(local=("2001:db8::2", 8080), remote=("2001:db8::1", 40000), family=6, name=None)
    for family, states in ((4, [_state(), _state(recv_queue=b"", send_queue=b"", unsent_len=0, name=None),
                                _state(send_queue=b"x" * 5000, unsent_len=0)]), (6, [six, six])):
        data = sockwire.pack_connections(states)
        assert tuple(_repair.unpack_many(data, family, repairc._BUILD)) == tuple(states)
        _c_reads_what_python_reads(data, family)
        ends = {sum(len(sockwire.pack_connection(s)) for s in states[:k]) for k in range(len(states) + 1)}
        for cut in range(0, len(data), 7):
            if cut not in ends:  # a record cut short
                with pytest.raises(ValueError, match="truncated"):
                    _repair.unpack_many(data[:cut], family, repairc._BUILD)
            _c_reads_what_python_reads(data[:cut], family)
    assert sockwire._native_unpack is not None  # the node's reader of peers' records is C's


@needs_ext
def test_c_reader_is_total_on_random_and_mutated_buffers():
    rnd = random.Random(1414)
    base = sockwire.pack_connections([_state(), _state(name=None), _state(recv_queue=b"q" * 40)])
    for i in range(5_000):
        family = rnd.choice((4, 6))
        if i % 2:
            blob = bytearray(base)
            for _ in range(rnd.randrange(1, 4)):
                blob[rnd.randrange(len(blob))] = rnd.randrange(256)
            blob = bytes(blob[:rnd.randrange(len(blob) + 1)])
        else:
            blob = rnd.randbytes(rnd.randrange(0, 300))
        _c_reads_what_python_reads(blob, family)


def test_the_path_in_use_is_named():
    assert repairc.IMPLEMENTATION in ("c", "python")
    assert (repairc.ext is None) == (repairc.IMPLEMENTATION == "python")


def test_a_state_read_from_a_record_packs_to_that_record_and_replace_forgets_it():
    import dataclasses

    s = _state()
    rec = sockwire.pack_connection(s)
    assert s.packed is None
    for back in (sockwire.unpack_connections(rec)[0], sockwire.from_local_record(rec, 4)):
        assert back.packed == rec and sockwire.pack_connection(back) == rec and back == s
        renamed = dataclasses.replace(back, name="other")
        assert renamed.packed is None  # a changed state is packed from its fields
        assert sockwire.unpack_connections(sockwire.pack_connection(renamed))[0].name == "other"
    big = _state(recv_queue=b"x" * sockwire.KEEP_RECORD_MAX)
    assert sockwire.unpack_connections(sockwire.pack_connection(big))[0].packed is None


def _reloaded(monkeypatch, fake=None, env=None):
    import importlib
    import sys
    import types

    import nodeshim

    if fake is not None:  # `from nodeshim import _repair` reads the package's attribute first
        fake = types.SimpleNamespace(**fake)
        monkeypatch.setitem(sys.modules, "nodeshim._repair", fake)
        monkeypatch.setattr(nodeshim, "_repair", fake, raising=False)
    if env is not None:
        monkeypatch.setenv("VIPCLUSTER_TCPREPAIR", env)
    return importlib.reload(repairc)


@pytest.fixture
def reload_back(monkeypatch):
    import importlib

    yield monkeypatch
    monkeypatch.undo()
    importlib.reload(repairc)  # as the rest of the suite found it


def test_a_stale_or_unwanted_build_is_not_used_and_the_log_says_why(reload_back, caplog):
    mod = _reloaded(reload_back, fake={"ABI": repairc.ABI - 1, "RepairError": Exception})
    assert mod.ext is None and mod.IMPLEMENTATION == "python"
    with caplog.at_level("INFO", logger="vipcluster.tcprepair"):
        mod.announce()
        mod.announce()
    lines = [r.getMessage() for r in caplog.records if r.name == "vipcluster.tcprepair"]
    assert len(lines) == 1 and "python path" in lines[0] and "scripts/build-repair" in lines[0]
    if _repair is not None:
        import nodeshim

        reload_back.setitem(__import__("sys").modules, "nodeshim._repair", _repair)
        reload_back.setattr(nodeshim, "_repair", _repair)
        mod = _reloaded(reload_back, env="python")
        assert mod.ext is None and "VIPCLUSTER_TCPREPAIR=python" in mod._WHY
        reload_back.delenv("VIPCLUSTER_TCPREPAIR")
        mod = _reloaded(reload_back)
        assert mod.ext is _repair and mod.IMPLEMENTATION == "c"


def test_in_halves_runs_a_long_list_as_two_halves_and_undoes_the_half_that_worked():
    short = list(range(repairc.PARALLEL_MIN - 1))
    assert repairc.in_halves(short, lambda part: list(part)) == (short,)
    items = list(range(100))
    assert repairc.in_halves(items, lambda part: list(part)) == (items[:50], items[50:])

    for bad in (7, 77):  # in the first half, in the worker's
        undone = []

        def run(part, bad=bad):
            if bad in part:
                raise OSError(bad, "planted")
            return list(part)

        with pytest.raises(OSError) as e:
            repairc.in_halves(items, run, undo=undone.append)
        assert e.value.errno == bad
        assert undone == [items[50:] if bad < 50 else items[:50]]  # the other half, given back

    undone = []
    with pytest.raises(OSError) as e:  # both fail: the first half's error, nothing to undo
        repairc.in_halves(items, lambda part: (_ for _ in ()).throw(OSError(part[0], "planted")), undo=undone.append)
    assert e.value.errno == 0 and undone == []


def _policy_of_a_background_thread(may_renice: bool, monkeypatch) -> tuple[int, int, int, int]:
    """(our policy, the thread's while it runs, after hurry(), after end()): scheduling
    policies read by thread id, as the kernel keeps them."""
    import threading
    monkeypatch.setattr(repairc, "_may_renice", lambda: may_renice)
    bg = repairc.Background()
    started, hurried, ended, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def run() -> None:
        bg.start()
        started.set()
        hurried.wait(5)
        seen["after hurry"] = os.sched_getscheduler(0)
        bg.end()
        seen["after end"] = os.sched_getscheduler(0)
        ended.set()
    t = threading.Thread(target=run)
    t.start()
    started.wait(5)
    running = os.sched_getscheduler(t.native_id)
    bg.hurry()
    hurried.set()
    ended.wait(5)
    t.join(5)
    return os.sched_getscheduler(0), running, seen["after hurry"], seen["after end"]


@pytest.mark.skipif(not repairc._may_renice(), reason="needs CAP_SYS_NICE")
def test_a_background_thread_runs_idle_until_someone_waits_for_it(monkeypatch):
    ours, running, hurried, ended = _policy_of_a_background_thread(True, monkeypatch)
    assert running == os.SCHED_IDLE != ours
    assert hurried == ended == ours  # the caller's own policy back


def test_without_the_right_to_raise_it_again_a_background_thread_is_left_alone(monkeypatch):
    ours, running, hurried, ended = _policy_of_a_background_thread(False, monkeypatch)
    assert running == hurried == ended == ours


@pytest.mark.skipif(not repairc._may_renice(), reason="needs CAP_SYS_NICE (without it no thread is changed)")
def test_a_background_thread_hurried_before_it_started_is_never_idle():
    import threading
    bg = repairc.Background()
    bg.hurry()  # the path waited for it before its thread ran a line
    seen = []

    def run() -> None:
        bg.start()
        seen.append(os.sched_getscheduler(0))
        bg.end()
    t = threading.Thread(target=run)
    t.start()
    t.join(5)
    assert seen == [os.sched_getscheduler(0)]


@needs_ext
def test_warming_a_process_descriptors_opens_each_entry_and_changes_none():
    """warm_fds (the take's /proc entries made before the freeze): one per descriptor of
    the process, its descriptors and their flags untouched; a gone process is OSError, a
    bad pid ValueError."""
    import socket
    socks = [socket.socket() for _ in range(50)]
    try:
        socks[0].set_inheritable(True)
        before = {int(n): os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{n}")}
        flags = [(s.get_inheritable(), s.getblocking()) for s in socks]
        n = _repair.warm_fds(os.getpid())
        assert n >= len(socks) and n <= len(before) + 2  # + the directories it opened itself
        after = {int(n): os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{n}")}
        assert {k: v for k, v in after.items() if k in before} == before
        assert [(s.get_inheritable(), s.getblocking()) for s in socks] == flags
    finally:
        for s in socks:
            s.close()
    with pytest.raises(OSError) as gone:
        _repair.warm_fds(2 ** 22 + 1)  # above pid_max's largest value: no such process
    assert gone.value.errno == errno.ENOENT
    with pytest.raises(ValueError):
        _repair.warm_fds(0)
