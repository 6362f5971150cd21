"""nodeshim.fdmove's epoll fdinfo reader and nodeshim.criutcp's FILE v3: total decoders."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from nodeshim import criutcp, fdmove
from tests.unit.test_sockwire import conn

FDINFO = (b"pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1039\n"
          b"tfd:        4 events:       19 data:                4  pos:0 ino:147a1f4 sdev:9\n"
          b"tfd:     1007 events: 80002019 data:     7f00deadbeef  pos:0 ino:2a sdev:9\n")


def test_epoll_fdinfo_lines_read():
    regs = fdmove.parse_epoll_fdinfo(6, FDINFO)
    assert regs == [fdmove.Registration(6, 4, 0x19, 4, 0x147a1f4),
                    fdmove.Registration(6, 1007, 0x80002019, 0x7f00deadbeef, 0x2a)]


@pytest.mark.parametrize("line", [b"tfd: x events: 1 data: 1 pos:0 ino:1", b"tfd: 4 events: zz data: 1 pos:0 ino:1",
                                  b"tfd: 4", b"tfd: 99999999999 events: 1 data: 1 pos:0 ino:1"])
def test_epoll_fdinfo_refuses_what_is_not_the_kernels(line):
    with pytest.raises(ValueError):
        fdmove.parse_epoll_fdinfo(3, b"pos:\t0\n" + line + b"\n")


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_epoll_fdinfo_decoder_is_total(data):
    try:
        fdmove.parse_epoll_fdinfo(3, data)
    except ValueError:
        pass


def test_runs_of_numbers():
    assert fdmove._runs([7, 3, 4, 5, 9, 10]) == [(3, 5), (7, 7), (9, 10)]


def _state(i: int, family: int = 4):
    return conn(i, b"in%d" % i, b"out%d" % i, unsent=2, family=family, name=f"1.{10 + i}")


def test_file_v3_round_trip():
    states = [_state(0), _state(1, 6), _state(2)]
    opts = bytes(range(criutcp.OPTS_SIZE)) * 3
    regs = [(1, fdmove.Registration(5, 10, 0x80000019, 10, 0)), (1, fdmove.Registration(5, 12, 1, 99, 0))]
    data = criutcp.encode3(states, [0o4002, 0o2004002, 0o2], opts, regs)
    got, hidden = criutcp.decode3(data)
    order = [0, 2, 1]  # the file groups IPv4 first
    assert [s.name for s in got] == [states[i].name for i in order]
    assert hidden.flags == [[0o4002, 0o2004002, 0o2][i] for i in order]
    assert hidden.options == opts  # identical blocks here; the order is the records'
    assert hidden.registrations == regs


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_file_v3_decoder_is_total(tail):
    data = criutcp.encode3([_state(0)], [2], bytes(criutcp.OPTS_SIZE), [])
    for candidate in (criutcp.MAGIC3 + tail, data[:len(tail) % len(data)], data + tail[:3]):
        try:
            criutcp.decode3(candidate)
        except ValueError:
            pass


def test_why_a_program_keeps_its_descriptors(tmp_path):
    import os
    status = open("/proc/self/status").read()
    free = "Seccomp:\t0" in status and "TracerPid:\t0" in status
    assert (fdmove.why_not(os.getpid(), 3) is None) == free
    assert "limit" in fdmove.why_not(os.getpid(), 10 ** 9) or not free
    assert fdmove.why_not(2 ** 22 + 7, 3).startswith("cannot read its status")  # no such process
