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
        criutcp.decode(b"VIPTCP3\n" + data[len(criutcp.MAGIC):])


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


def extras_for(states):
    return [(1000 + i, bytes([i]) * criutcp.OPTS_SIZE) for i in range(len(states))]


def test_v2_keeps_each_connections_inode_and_options_with_its_record():
    states = [named(0, rq=b"GET"), named(1, family=6, sq=b"y" * 99), named(2), named(3, family=6)]
    data = criutcp.encode(states, extras_for(states))
    assert data.startswith(criutcp.MAGIC2)
    image = criutcp.decode_image(data)
    # the records in the file's order (IPv4 first), each one's inode and options with it
    assert image.states == [states[0], states[2], states[1], states[3]]
    assert image.inodes == [1000, 1002, 1001, 1003]
    each = criutcp.OPTS_SIZE
    assert [image.options[i * each:(i + 1) * each] for i in range(4)] == [bytes([i]) * each for i in (0, 2, 1, 3)]
    # without extras: v1, no inodes, no options (criu carried them)
    plain = criutcp.decode_image(criutcp.encode(states))
    assert plain.states == image.states and plain.inodes is None and plain.options is None


def test_v2_with_options_of_the_wrong_size_or_count_is_refused():
    states = [named(0), named(1)]
    with pytest.raises(ValueError, match="bytes of socket options"):
        criutcp.encode(states, [(1, b"x"), (2, b"y")])
    data = criutcp.encode(states, extras_for(states))
    with pytest.raises(ValueError):
        criutcp.decode_image(data[:-1])
    with pytest.raises(ValueError, match="243 bytes of options, not 2 x 121"):
        criutcp.decode_image(data + b"\0")
    # a count that is not the records'
    each = criutcp._EXTRA.size + criutcp.OPTS_SIZE
    count_at = len(data) - 2 * each - 4
    bad = data[:count_at] + (1).to_bytes(4, "big") + data[count_at + 4:-each]
    with pytest.raises(ValueError, match="options for 1 connections, 2 records"):
        criutcp.decode_image(bad)
    # an IP version that is not its record's, or none at all
    fam_at = count_at + 4 + 8
    with pytest.raises(ValueError, match="IP versions are not the records'"):
        criutcp.decode_image(data[:fam_at] + b"\x06" + data[fam_at + 1:])
    with pytest.raises(ValueError, match="IP version 5"):
        criutcp.decode_tail(data[:fam_at] + b"\x05" + data[fam_at + 1:])


def test_the_tail_alone_names_and_places_every_connection():
    states = [named(0), named(1, family=6), named(2)]
    data = criutcp.encode(states, extras_for(states))
    tail = criutcp.decode_tail(data)
    whole = criutcp.decode_image(data)
    assert tail.states is None and tail.inodes == whole.inodes == [1000, 1002, 1001]
    assert tail.families == whole.families == [4, 4, 6] and tail.options == whole.options
    with pytest.raises(ValueError, match="not --tcp-external"):
        criutcp.decode_tail(criutcp.encode(states))


def test_v2_random_mutations_never_escape_as_anything_but_value_error():
    states = [named(i, family=4 + 2 * (i % 2), rq=b"q" * i) for i in range(5)]
    data = bytearray(criutcp.encode(states, extras_for(states)))
    rng = random.Random(14)
    for _ in range(2000):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        for decoder in (criutcp.decode_image, criutcp.decode_tail):
            try:
                decoder(bytes(bad))
            except ValueError:
                pass


def test_the_c_extension_carries_as_many_bytes_of_options_as_the_file():
    from nodeshim import repairc
    if repairc.ext is None:
        pytest.skip("nodeshim._repair is not built")
    assert repairc.ext.OPTS_SIZE == criutcp.OPTS_SIZE


@pytest.mark.parametrize("name", [None, "1", "1.2.3", "a.b", "1:2"])
def test_a_record_not_named_pid_dot_fd_is_refused(name):
    with pytest.raises(ValueError):
        criutcp._parse_name(name)
