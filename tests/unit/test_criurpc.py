"""nodeshim.criurpc: the requests we send `criu swrk` and the answers we read (criu 4.2's
images/rpc.proto), checked against the wire bytes, field by field, and fuzzed: a
malformed answer is a ValueError, never another exception or a loop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeshim import criurpc
from nodeshim.criurpc import _fields


def message(data: bytes) -> dict[int, list]:
    out: dict[int, list] = {}
    for field, _, value in _fields(data):
        out.setdefault(field, []).append(value)
    return out


def opts_of(request: bytes) -> dict[int, list]:
    req = message(request)
    assert len(req[2]) == 1
    return message(req[2][0])


def test_a_dump_request_carries_every_option_of_our_command_line():
    req = criurpc.dump_request(4242, "/dev/shm/img", log_file="dump.log", log_level=4,
                               tcp_close=True, ps_socket=7)
    assert message(req)[1] == [criurpc.DUMP]
    o = opts_of(req)
    assert o[1] == [(1 << 64) - 1]  # images_dir_fd = -1 (required): the path is used instead
    assert o[68] == [b"/dev/shm/img"]
    assert o[2] == [4242]
    assert o[10] == [b"dump.log"] and o[9] == [4]
    assert o[52] == [1] and 5 not in o  # --tcp-close, not --tcp-established
    assert o[69] == [1]  # --leave-stopped
    assert o[64] == [3]  # --network-lock skip
    assert message(o[11][0]) == {4: [7]}  # the page server over fd 7


def test_a_dump_request_without_our_connections_asks_criu_to_move_them():
    o = opts_of(criurpc.dump_request(1, "/i", log_file="dump.log"))
    assert o[5] == [1] and 52 not in o
    assert 11 not in o and o[9] == [2]


def test_a_restore_request_inherits_the_pipe_and_makes_the_copy_our_child():
    req = criurpc.restore_request("/i", log_file="restore.log", tcp_close=True,
                                  inherit_fds={9: "pipe:[77]", 5: "pipe:[1]"})
    assert message(req)[1] == [criurpc.RESTORE]
    o = opts_of(req)
    assert o[26] == [1]  # rst_sibling
    assert o[52] == [1]
    assert [message(x) for x in o[27]] == [{1: [b"pipe:[1]"], 2: [5]}, {1: [b"pipe:[77]"], 2: [9]}]
    assert 2 not in o  # no pid on a restore


def test_a_lazy_restore_request_says_so_and_a_copied_one_does_not():
    assert opts_of(criurpc.restore_request("/i", log_file="r.log", lazy_pages=True))[48] == [1]
    assert 48 not in opts_of(criurpc.restore_request("/i", log_file="r.log"))


def test_the_version_request_keeps_the_worker_open_for_the_real_one():
    assert message(criurpc.version_request()) == {1: [criurpc.VERSION], 4: [1]}


def test_a_real_dump_answer_with_criu_s_harmless_error_line():
    # the answer criu 4.2.1 gave on this machine (criu_resp: type DUMP, success, dump {},
    # cr_errmsg: the rlimit line it logs on every run without CAP_SYS_RESOURCE)
    data = (b"\x08\x01\x10\x01\x1a\x02\x08\x00J^Error (criu/util.c:1534): rlimit: Can't setup "
            b"RLIMIT_NOFILE for self: Operation not permitted\n")
    a = criurpc.decode_answer(data)
    assert (a.kind, a.success, a.pid) == (criurpc.DUMP, True, None)
    assert "RLIMIT_NOFILE" in a.message


def test_a_restore_answer_gives_the_pid_and_a_failure_its_errno():
    ok = criurpc.decode_answer(bytes([0x08, 2, 0x10, 1, 0x22, 3, 0x08, 0xB9, 0x60]))
    assert (ok.kind, ok.success, ok.pid) == (criurpc.RESTORE, True, 12345)
    neg = (-3) & ((1 << 64) - 1)
    bad = criurpc.decode_answer(bytes([0x08, 2, 0x10, 0]) + b"\x38" + criurpc._uvarint(neg) + b"J\x04oops")
    assert (bad.success, bad.errno, bad.message) == (False, -3, "oops")


@pytest.mark.parametrize("data, why", [
    (b"", "without its type"),
    (b"\x08\x01", "without its type or result"),
    (b"\x08\x01\x10", "truncated varint"),
    (b"\x08\x01\x10\x01J\x05ab", "truncated"),
    (b"\x08\x06\x10\x01", "notification"),
    (b"\x0b\x08\x01\x10\x01", "wire type 3"),
    (b"\x00\x01", "field 0"),
    (b"\x08" + b"\xff" * 11, "truncated varint"),
])
def test_a_malformed_answer_is_a_value_error(data, why):
    with pytest.raises(ValueError, match=why):
        criurpc.decode_answer(data)


def test_an_oversized_answer_is_refused_before_it_is_read():
    with pytest.raises(ValueError, match="too long"):
        criurpc.decode_answer(b"\x08\x01\x10\x01" + b"J" + criurpc._uvarint(criurpc.MAX_ANSWER) + b"x" * criurpc.MAX_ANSWER)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_value_error(data):
    try:
        a = criurpc.decode_answer(data)
    except ValueError:
        return
    assert isinstance(a.success, bool) and a.kind != 6


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1), st.integers(0, 1 << 20))
def test_a_restore_answer_round_trips_any_pid_and_errno(pid, errno):
    body = criurpc._int(1, pid)
    data = criurpc._int(1, criurpc.RESTORE) + criurpc._int(2, 1) + criurpc._bytes(4, body) + criurpc._int(7, errno)
    a = criurpc.decode_answer(data)
    assert (a.pid, a.errno) == (pid, errno)
