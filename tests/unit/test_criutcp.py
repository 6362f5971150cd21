"""nodeshim.criutcp's image file (our TCP connections beside criu's image): an exact round
trip, both families, and anything else refused with a ValueError (the destination reads
it before it touches a socket). The kernel side runs in tests/lab/test_process_strategy.py."""

import random

import pytest

from nodeshim import criutcp
from tests.unit.test_sockwire import conn


def named(i, family=4, rq=b"", sq=b""):
    return conn(i, rq, sq, unsent=len(sq) // 2, family=family, name=f"{1 + i % 3}.{10 + i}")


def test_round_trip_keeps_both_families_and_each_name():
    states = [named(0, rq=b"GET / HTTP/1.1\r\n"), named(1, family=6, sq=b"x" * 500), named(2), named(3, family=6)]
    back = criutcp.decode(criutcp.encode(states))
    # IPv4 first, then IPv6, each in its order: restore_tree finds a socket by its name, not its place
    assert back == [states[0], states[2], states[1], states[3]]
    assert [criutcp._parse_name(s.name) for s in back] == [(1, 10), (3, 12), (2, 11), (1, 13)]


def test_no_connections_is_a_valid_file():
    assert criutcp.decode(criutcp.encode([])) == []


@pytest.mark.parametrize("cut", [0, 3, len(criutcp.MAGIC) + 2, -1, -40])
def test_a_cut_file_is_refused(cut):
    data = criutcp.encode([named(0, rq=b"abc"), named(1, family=6)])
    with pytest.raises(ValueError):
        criutcp.decode(data[:cut])


def test_trailing_bytes_and_another_magic_are_refused():
    data = criutcp.encode([named(0)])
    with pytest.raises(ValueError, match="after the records"):
        criutcp.decode(data + b"\0")
    with pytest.raises(ValueError, match="not our format"):
        criutcp.decode(b"VIPTCP2\n" + data[len(criutcp.MAGIC):])


def test_random_mutations_never_escape_as_anything_but_value_error():
    data = bytearray(criutcp.encode([named(i, family=4 + 2 * (i % 2), rq=b"q" * i) for i in range(6)]))
    rng = random.Random(13)
    for _ in range(2000):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        try:
            criutcp.decode(bytes(bad))
        except ValueError:
            pass


@pytest.mark.parametrize("name", [None, "1", "1.2.3", "a.b", "1:2"])
def test_a_record_not_named_pid_dot_fd_is_refused(name):
    with pytest.raises(ValueError):
        criutcp._parse_name(name)
