"""nodeshim.bpfnode: the node's verdict map as a tcx program, run on crafted frames
(BPF_PROG_TEST_RUN) against what the nft map (nodeshim.nftnode) decides for them: ACCEPT
marks the packet FAST_MARK and lets it on, DROP drops it, anything the map does not hold
(or cannot read: fragments, IPv4 options, IPv6 extension headers) goes on unmarked to the
iptables list. The agent uses either home for the map through the same three calls."""

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore.errors import KernelError
from clustercore.fastpath import FAST_MARK
from clustercore.kinds import Datapath
from clustercore.ownership import Verdict
from nodeshim import bpfnode, nftnode
from vipwire import bpfsys

VIP, VIP6, OTHER = "203.0.113.10", "2001:db8::10", "203.0.113.99"
ACCEPTED = (bpfsys.TCX_NEXT, FAST_MARK)
DROPPED = (bpfsys.TC_ACT_SHOT, 0)
LIST = (bpfsys.TCX_NEXT, 0)  # on to the iptables list, unmarked


@pytest.fixture(scope="module")
def node_map():
    try:
        m = bpfnode.NodeMap(0, attach=False)
    except KernelError as e:
        pytest.skip(f"bpf(2) not available here: {e}")
    yield m
    m.close()


def v4(dst=VIP, proto=6, dport=7, ihl=5, frag=0) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 40, 1, frag, 64, proto, 0,
                     socket.inet_aton("198.51.100.5"), socket.inet_aton(dst)) + b"\1" * (4 * (ihl - 5))
    return bytes(12) + b"\x08\x00" + ip + struct.pack("!HH", 40000, dport) + bytes(16)


def v6(dst=VIP6, nexthdr=6, dport=7) -> bytes:
    ip = struct.pack("!IHBB16s16s", 0x60000000, 20, nexthdr, 64, socket.inet_pton(socket.AF_INET6, "2001:db8::5"),
                     socket.inet_pton(socket.AF_INET6, dst))
    return bytes(12) + b"\x86\xdd" + ip + struct.pack("!HH", 40000, dport) + bytes(16)


def run(m, frame):
    rc, out, mark = bpfsys.test_run(m.prog_fd, frame)
    assert out == frame  # the program never writes the frame
    return rc, mark


def model(vips, vmap, frame: bytes):
    """The nft map's decision (`ip[6] daddr VIP ... meta l4proto . th dport vmap`), as far as
    the program reads frames; what it does not read goes to the list."""
    if frame[12:14] == b"\x08\x00":
        if frame[14] != 0x45 or struct.unpack("!H", frame[20:22])[0] & 0x3fff:
            return LIST
        dst, proto, dport = socket.inet_ntoa(frame[30:34]), frame[23], struct.unpack("!H", frame[36:38])[0]
    elif frame[12:14] == b"\x86\xdd":
        if frame[20] not in (6, 17):
            return LIST
        dst = socket.inet_ntop(socket.AF_INET6, frame[38:54])
        proto, dport = frame[20], struct.unpack("!H", frame[56:58])[0]
    else:
        return LIST
    if dst not in vips or (proto, dport) not in vmap:
        return LIST
    return ACCEPTED if vmap[(proto, dport)][0] == Verdict.ACCEPT else DROPPED


def test_accept_marks_drop_drops_the_rest_goes_to_the_list_and_each_is_counted(node_map):
    node_map.install([VIP, VIP6], {(6, 7): (Verdict.ACCEPT, "echo"), (17, 53): (Verdict.DROP, "dns")})
    base = node_map.read_counters()
    assert run(node_map, v4()) == ACCEPTED
    assert run(node_map, v6()) == ACCEPTED
    assert run(node_map, v4(proto=17, dport=53)) == DROPPED
    for other in (v4(dport=8), v4(dst=OTHER), v4(ihl=6), v4(frag=0x2000), v4(frag=0x0001), v6(nexthdr=0),
                  v6(dport=9), v4(proto=1)):
        assert run(node_map, other) == LIST
    got = node_map.read_counters()
    assert got["echo"]["accepted"] - base.get("echo", {}).get("accepted", 0) == 2
    assert got["dns"]["dropped"] - base.get("dns", {}).get("dropped", 0) == 1
    node_map.remove()
    assert run(node_map, v4()) == LIST  # emptied: the list decides
    assert node_map.read_counters()["echo"] == got["echo"]  # counters outlive their entries


PORTS = st.sampled_from([7, 53, 80])
frames = st.one_of(
    st.builds(v4, dst=st.sampled_from([VIP, OTHER]), proto=st.sampled_from([6, 17, 1]), dport=PORTS,
              ihl=st.sampled_from([5, 5, 6]), frag=st.sampled_from([0, 0, 0x4000, 0x2000, 0x0003])),
    st.builds(v6, dst=st.sampled_from([VIP6, "2001:db8::99"]), nexthdr=st.sampled_from([6, 17, 0, 44]), dport=PORTS))
vmaps = st.dictionaries(st.tuples(st.sampled_from([6, 17]), PORTS),
                        st.tuples(st.sampled_from([Verdict.ACCEPT, Verdict.DROP]), st.sampled_from(["a", "b"])),
                        max_size=6)


@settings(max_examples=150, deadline=None)
@given(vips=st.sampled_from([(VIP,), (VIP6,), (VIP, VIP6)]), vmap=vmaps, batch=st.lists(frames, min_size=1, max_size=6))
def test_the_program_decides_as_the_nft_map(node_map, vips, vmap, batch):
    node_map.install(vips, vmap)
    for f in batch:
        assert run(node_map, f) == model(vips, vmap, f), f.hex()


def test_the_front_is_nft_where_the_program_may_not_serve(monkeypatch):
    """Queue datapath, conntrack nodes, no cluster interface or turned off: nftnode, as before."""
    from types import SimpleNamespace

    def cfg(**kw):
        base = dict(bpf_fast_path=True, cluster_interface="eth0", datapath=Datapath.FAST, conntrack=False)
        return SimpleNamespace(**(base | kw))

    monkeypatch.setattr(bpfnode, "NodeMap", lambda ifindex: pytest.fail("no program expected"))
    for c in (cfg(bpf_fast_path=False), cfg(cluster_interface=None), cfg(datapath=Datapath.QUEUE),
              cfg(conntrack=True)):
        assert bpfnode.open_front(c) is nftnode


def test_a_kernel_that_refuses_the_program_keeps_the_nft_map(monkeypatch):
    from types import SimpleNamespace

    def refuse(ifindex):
        raise KernelError("bpf tcx attach", 22)

    monkeypatch.setattr(bpfnode, "NodeMap", refuse)
    monkeypatch.setattr(bpfnode.socket, "if_nametoindex", lambda name: 3)
    removed = []
    monkeypatch.setattr(bpfnode.nftnode, "remove", lambda: removed.append(True))
    c = SimpleNamespace(bpf_fast_path=True, cluster_interface="eth0", datapath=Datapath.FAST, conntrack=False)
    assert bpfnode.open_front(c) is nftnode and not removed  # the nft map stays where it is
