"""Connections out of a frozen program kept where they outlive the agent
(nodeshim.hiddenkeep): the source's keep/forget against the lab supervisor's fd store (a
real unix socket, vipctl.supervise.FdStore), and a successor's match of what the store
passes back to the record. Putting them back into a stopped program is the lab's
(tests/lab/test_process_survival.py)."""

import json
import os
import socket

import pytest

from nodeshim import fdmove, hiddenkeep
from vipctl.supervise import FdStore


@pytest.fixture
def store(tmp_path, monkeypatch):
    s = FdStore(str(tmp_path / "notify"))
    s.pid = os.getpid()  # the only sender it hears: us, as the daemon
    monkeypatch.setenv("NOTIFY_SOCKET", s.path)
    monkeypatch.setenv("FDSTORE", "600")
    yield s
    s.close()


def _conns(n):
    pairs = [socket.socketpair() for _ in range(n)]
    return pairs


def _plan(pairs, pid=4242, first_fd=10):
    """One process's plan as criutcp.Taken.hide hands it: its numbers from first_fd on,
    our descriptors the socketpairs' first ends, each in epoll 5."""
    ours = {first_fd + i: a.fileno() for i, (a, _) in enumerate(pairs)}
    inodes = {t: os.fstat(fd).st_ino for t, fd in ours.items()}
    regs = [fdmove.Registration(5, t, 0x2019, t << 32 | 7, inodes[t]) for t in ours]
    return (pid, ours, inodes, regs, {first_fd})


def _close(pairs):
    for a, b in pairs:
        a.close()
        b.close()


def test_room_needs_a_manager_that_says_how_many_it_keeps(tmp_path, monkeypatch):
    keeper = hiddenkeep.HiddenKeeper(str(tmp_path), reserved=2)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert keeper.room()[0] == 0
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    monkeypatch.delenv("FDSTORE", raising=False)
    room, why = keeper.room()
    assert room == 0 and "FDSTORE" in why
    monkeypatch.setenv("FDSTORE", "junk")
    assert keeper.room()[0] == 0
    monkeypatch.setenv("FDSTORE", "10")
    assert keeper.room()[0] == 8  # the queues' two places taken


def test_kept_in_the_store_in_chunks_with_a_record_then_forgotten(tmp_path, store):
    keeper = hiddenkeep.HiddenKeeper(str(tmp_path / "state"), reserved=1)
    pairs = _conns(300)  # more than one SCM_RIGHTS message (253)
    try:
        plan = _plan(pairs)
        assert keeper.keep("web", 4240, [plan])
        store.drain()
        kept = [fd for name, fd in store.fds if name == "hidden-web"]
        assert len(kept) == 300
        assert {os.fstat(fd).st_ino for fd in kept} == set(plan[2].values())
        with open(tmp_path / "state" / "hidden" / "web.json") as f:
            record = json.load(f)
        (proc,) = record["processes"]
        assert record["root"] == 4240 and proc["pid"] == 4242 and hiddenkeep._unhex("q", proc["fds"], "") == list(plan[1])
        assert hiddenkeep._unhex("q", proc["cloexec"], "") == [10]
        assert hiddenkeep._unhex("Q", proc["inodes"], "") == [plan[2][t] for t in plan[1]]
        assert hiddenkeep._unhex("Q", proc["regs"], "") == [x for r in plan[3] for x in r]
        assert keeper.room()[0] == 600 - 1 - 300
        keeper.forget("web")
        store.drain()
        assert store.fds == [] and not (tmp_path / "state" / "hidden" / "web.json").exists()
        assert keeper.room()[0] == 599
    finally:
        _close(pairs)


def test_not_kept_when_the_store_has_no_room_for_them_all(tmp_path, store, monkeypatch):
    monkeypatch.setenv("FDSTORE", "100")
    keeper = hiddenkeep.HiddenKeeper(str(tmp_path), reserved=1)
    pairs = _conns(100)
    try:
        assert not keeper.keep("web", 4240, [_plan(pairs)])
        store.drain()
        assert store.fds == [] and not (tmp_path / "hidden" / "web.json").exists()
    finally:
        _close(pairs)


def test_a_successor_matches_the_stores_copies_to_the_record_by_inode(tmp_path, store):
    state = str(tmp_path / "state")
    keeper = hiddenkeep.HiddenKeeper(state, reserved=0)
    pairs, stray = _conns(20), socket.socketpair()
    try:
        plan = _plan(pairs)
        assert keeper.keep("web", 4240, [plan])
        store.drain()
        # what the manager passes the next agent: copies, in any order, plus one the record
        # does not name, and copies of a service with no record at all
        passed = [os.dup(fd) for _, fd in reversed(store.fds)] + [os.dup(stray[0].fileno())]
        orphan = [os.dup(stray[1].fileno())]
        got = hiddenkeep.inherit(state, {"web": passed, "gone": orphan})
        assert list(got) == ["web"]
        inh = got["web"]
        (proc,) = inh.processes
        assert len(inh) == 20 and inh.root == 4240 and proc.pid == 4242 and proc.cloexec == {10}
        for target, fd in proc.ours.items():  # each copy at the number its socket had
            assert os.fstat(fd).st_ino == plan[2][target]
        assert [r.tfd for r in proc.regs] == list(plan[1])
        for fd in orphan + [passed[-1]]:  # the stray copies were closed
            with pytest.raises(OSError):
                os.fstat(fd)
        inh.close()
        store.drain()
        assert store.fds == [] and not os.path.exists(os.path.join(state, "hidden", "web.json"))
        for fd in passed:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        _close(pairs)
        stray[0].close()
        stray[1].close()


def _entry(**kw):
    e = {"pid": 1, "started": 2, "fds": "", "inodes": "", "cloexec": "", "regs": ""}
    root = kw.pop("root", 1)
    e.update(kw)
    return json.dumps({"version": 1, "root": root, "processes": [e]}).encode()


ONE_Q = "01" + "00" * 7  # one packed 64-bit 1


@pytest.mark.parametrize("junk", [b"{", b"[]", b'{"version": 1, "processes": [{"pid": "x"}]}',
                                  _entry(fds=ONE_Q), _entry(regs=ONE_Q * 3), _entry(fds="zz"),
                                  _entry(inodes="0102"), _entry(fds=[1]), _entry(pid=-1),
                                  _entry(regs=ONE_Q * 2 + (1 << 32).to_bytes(8, "little").hex() + ONE_Q * 2),
                                  _entry(root="1")])
def test_a_bad_record_closes_the_copies_and_is_removed(tmp_path, junk):
    os.makedirs(tmp_path / "hidden")
    (tmp_path / "hidden" / "web.json").write_bytes(junk)
    a, b = socket.socketpair()
    try:
        copy = os.dup(a.fileno())
        assert hiddenkeep.inherit(str(tmp_path), {"web": [copy]}) == {}
        with pytest.raises(OSError):
            os.fstat(copy)
        assert not (tmp_path / "hidden" / "web.json").exists()
    finally:
        a.close()
        b.close()


def test_a_record_without_copies_is_removed(tmp_path):
    os.makedirs(tmp_path / "hidden")
    (tmp_path / "hidden" / "web.json").write_text('{"version": 1, "root": 1, "processes": []}')
    assert hiddenkeep.inherit(str(tmp_path), {}) == {}
    assert not (tmp_path / "hidden" / "web.json").exists()


def test_fdnames():
    assert hiddenkeep.service_of_fdname(hiddenkeep.fdname("web-1.a")) == "web-1.a"
    assert hiddenkeep.service_of_fdname("nfqueue-7") is None
    assert hiddenkeep.service_of_fdname("hidden-") is None
