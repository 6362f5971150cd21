"""gateway.bpf: the pure model of the fast path (which ports, which entries, in which order
around nft's table), and the real program run on crafted frames (BPF_PROG_TEST_RUN)
against that model, GLB Director's way: every frame is either redirected exactly as the
nft table would send it, or passed on untouched to that table."""

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore.cutover import epoch_mac
from clustercore.errors import KernelError
from gateway import bpf
from vipwire import bpfsys

VIP, VIP2, VIP6 = "192.0.2.10", "198.51.100.10", "2001:db8::10"
OWNER, OTHER = "02:00:00:00:01:01", "02:00:00:00:01:02"
IFINDEX = 7


def test_entries_are_the_single_target_ports_on_every_ipv4_vip():
    epochs = {(6, 80): 3, (17, 53): 1, (6, 443): 2, (6, 22): 5}
    targets = {(6, 80): [OWNER], (17, 53): [OTHER], (6, 443): [OWNER, OTHER], (6, 22): []}
    got = bpf.entries(vips=(VIP, VIP6, VIP2), epochs=epochs, targets=targets, ifindex=IFINDEX)
    assert sorted((e.vip, e.proto, e.port, e.dst_mac, e.src_mac) for e in got.values()) == sorted([
        (VIP, 6, 80, OWNER, epoch_mac(3)), (VIP2, 6, 80, OWNER, epoch_mac(3)),
        (VIP, 17, 53, OTHER, epoch_mac(1)), (VIP2, 17, 53, OTHER, epoch_mac(1)),
    ])  # two targets (a migration's copies), none, IPv6: nft's alone
    assert bpf.entries(vips=(VIP,), epochs=epochs, targets=None, ifindex=IFINDEX) == {}  # broadcast


def test_key_and_value_bytes_are_what_the_program_reads():
    e = bpf.Entry(VIP, 17, 53, OWNER, epoch_mac(2), IFINDEX)
    assert e.key() == socket.inet_aton(VIP) + bytes([17, 0]) + struct.pack("!H", 53)
    assert e.value() == bytes.fromhex("020000000101") + bytes.fromhex(epoch_mac(2).replace(":", "")) \
        + struct.pack("<II", IFINDEX, 0)


def test_changes_retire_what_goes_or_changes_before_and_install_after():
    a = bpf.Entry(VIP, 6, 80, OWNER, epoch_mac(1), IFINDEX)
    b = bpf.Entry(VIP, 6, 81, OWNER, epoch_mac(1), IFINDEX)
    moved = bpf.Entry(VIP, 6, 80, OTHER, epoch_mac(2), IFINDEX)
    c = bpf.Entry(VIP, 17, 53, OWNER, epoch_mac(1), IFINDEX)
    old = {a.key(): a, b.key(): b}
    retire, install = bpf.changes(old, {moved.key(): moved, c.key(): c})
    assert sorted(retire) == sorted([a.key(), b.key()])  # changed and gone: out before nft
    assert install == [moved, c]
    assert bpf.changes(old, dict(old)) == ([], [])  # nothing changes: nothing touched


def test_the_gateway_retires_before_nft_and_installs_after(monkeypatch):
    """The ordering that keeps the program from doing what the current table would not."""
    from gateway import daemon

    calls = []

    class FakeFast:
        def retire(self, new):
            calls.append(("retire", sorted(e.port for e in new.values())))

        def install(self, new):
            calls.append(("install", sorted(e.port for e in new.values())))

    monkeypatch.setattr(daemon.nft, "apply", lambda script: calls.append(("nft", None)))
    gw = _bare_gateway(daemon)
    gw.fast_path = FakeFast()
    gw.apply_delivery()
    assert calls == [("retire", [7]), ("nft", None), ("install", [7])]
    gw.delivery_override["echo"] = ("n1", "n2")  # a migration's two targets: off the fast path
    calls.clear()
    gw.apply_delivery()
    assert calls == [("retire", []), ("nft", None), ("install", [])]


def _bare_gateway(daemon):
    from types import SimpleNamespace

    from clustercore.config import NodeEntry
    from clustercore.kinds import Delivery

    gw = daemon.Gateway.__new__(daemon.Gateway)
    gw.config = SimpleNamespace(delivery=Delivery.SELECTIVE, vips=(VIP,), client_interface="c0",
                                cluster_interface="br0",
                                nodes=(NodeEntry("n1", "203.0.113.1", OWNER), NodeEntry("n2", "203.0.113.2", OTHER)))
    gw.table = [SimpleNamespace(name="echo", owner="n1", ports=[(6, 7)])]
    gw.epochs = {"echo": 1}
    gw.delivery_override = {}
    gw.failover = SimpleNamespace(fenced=set())
    gw.gateway_mac = "02:aa:00:00:00:01"
    gw._cluster_ifindex = IFINDEX
    return gw


# --- the program itself, run by the kernel ------------------------------------------------

def _fast_path_or_skip():
    try:
        return bpf.FastPath(0, attach=False)
    except KernelError as e:
        pytest.skip(f"bpf(2) not available here: {e}")


@pytest.fixture(scope="module")
def loaded():
    fp = _fast_path_or_skip()
    yield fp
    fp.close()


def frame(*, dst=VIP, proto=6, dport=80, ihl=5, frag=0, ethertype=0x0800, length=None) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + 4 * (ihl - 5) + 20, 1, frag, 64, proto, 0,
                     socket.inet_aton("203.0.113.5"), socket.inet_aton(dst)) + b"\1" * (4 * (ihl - 5))
    data = bytes.fromhex("02aabbccddee021122334455") + struct.pack("!H", ethertype) + ip \
        + struct.pack("!HH", 40000, dport) + b"\0" * 16
    return data if length is None else data[:length]


def model(entries: dict, f: bytes):
    """What nft's table does with this frame, in the fast path's terms: (verdict, frame)."""
    if len(f) < 38 or f[12:14] != b"\x08\x00" or f[14] != 0x45 or struct.unpack("!H", f[20:22])[0] & 0x3fff:
        return bpf.TCX_NEXT, f
    key = f[30:34] + bytes([f[23], 0]) + f[36:38]
    e = entries.get(key)
    if e is None:
        return bpf.TCX_NEXT, f
    return bpf.TC_ACT_REDIRECT, bytes.fromhex(e.dst_mac.replace(":", "") + e.src_mac.replace(":", "")) + f[12:]


def test_the_program_redirects_a_mapped_port_and_passes_everything_else(loaded):
    table = bpf.entries(vips=(VIP,), epochs={(6, 80): 3}, targets={(6, 80): [OWNER]}, ifindex=IFINDEX)
    loaded.retire(table)
    loaded.install(table)
    before = loaded.packets()
    rc, out = bpfsys.test_run(loaded.prog_fd, frame())[:2]
    assert rc == bpf.TC_ACT_REDIRECT
    assert out[:12].hex() == OWNER.replace(":", "") + epoch_mac(3).replace(":", "") and out[12:] == frame()[12:]
    assert loaded.packets() == before + 1
    for other in (frame(dport=81), frame(proto=17), frame(dst=VIP2), frame(ihl=6), frame(frag=0x2000),
                  frame(frag=0x0010), frame(ethertype=0x86dd), frame(length=36)):
        assert bpfsys.test_run(loaded.prog_fd, other)[:2] == (bpf.TCX_NEXT, other)
    assert loaded.packets() == before + 1
    loaded.retire({})
    assert bpfsys.test_run(loaded.prog_fd, frame())[:2] == (bpf.TCX_NEXT, frame())  # retired: nft's again


PORTS = st.sampled_from([7, 53, 80, 6379])
frames = st.builds(frame, dst=st.sampled_from([VIP, VIP2, "203.0.113.9"]), proto=st.sampled_from([6, 17, 1]),
                   dport=PORTS, ihl=st.sampled_from([5, 5, 5, 6, 15]),
                   frag=st.sampled_from([0, 0, 0, 0x4000, 0x2000, 0x0001, 0x1fff]),
                   ethertype=st.sampled_from([0x0800, 0x0800, 0x86dd, 0x0806]),
                   length=st.one_of(st.none(), st.integers(36, 40))
                   # the test run itself refuses an IPv6 frame shorter than an IPv6 header
                   ).filter(lambda f: f[12:14] != b"\x86\xdd" or len(f) >= 54)
tables = st.dictionaries(st.tuples(st.sampled_from([6, 17]), PORTS),
                         st.tuples(st.integers(1, 300), st.lists(st.sampled_from([OWNER, OTHER]), max_size=2)),
                         max_size=6)


@settings(max_examples=150, deadline=None)
@given(table=tables, batch=st.lists(frames, min_size=1, max_size=6))
def test_the_program_agrees_with_the_model(loaded, table, batch):
    entries = bpf.entries(vips=(VIP, VIP2), epochs={k: e for k, (e, _) in table.items()},
                          targets={k: m for k, (_, m) in table.items()}, ifindex=IFINDEX)
    loaded.retire(entries)
    loaded.install(entries)
    for f in batch:
        assert bpfsys.test_run(loaded.prog_fd, f)[:2] == model(entries, f), f.hex()
