"""The gateway's bpf fast path (gateway.bpf) in a real lab: a selective gateway sends a
single-owner service's packets through its tcx program (the metric counts them), the
owner and only the owner accepts them, and a live migration under load through it stays
exact (the port leaves the fast path while it has two targets and comes back pointing at
the new owner). A gateway with `bpf_fast_path = false` has no program and delivers the
same packets through nft alone."""

import pytest

from clustercore.kinds import Delivery
from vipctl import lab as labmod

from .conftest import lab_with_services
from .test_migration import assert_exact, finish_load, migrate, start_load
from .test_operations import scrape, val

VIP = labmod.VIP
N = 60


def fast_packets(h) -> float:
    return val(scrape(h, "gateway"), "vipcluster_fast_path_packets_total")


@pytest.fixture(scope="module")
def flab():
    with lab_with_services("f", delivery=Delivery.SELECTIVE) as h:
        yield h


def test_single_owner_packets_take_the_fast_path_to_the_owner_only(flab):
    before_fast = fast_packets(flab)
    before, _ = flab.counters("echo")
    r = flab.pyclient("udp-echo", VIP, 7, N)
    assert r["answered_once"] == N and r["duplicated"] == 0, r
    after, _ = flab.counters("echo")
    # every datagram went through the program (plus whatever else was sent meanwhile)
    assert fast_packets(flab) - before_fast >= N
    assert after["n1"] - before["n1"] == N
    assert after["n2"] == before["n2"] and after["n3"] == before["n3"]


def test_a_migration_through_the_fast_path_is_exact_and_the_path_follows_the_owner(flab, tmp_path):
    p, stop = start_load(flab, tmp_path, "fast", conns=20, duration=30.0)
    migrate(flab, "echo", "n2")  # committed, 0 lost (asserted there)
    result = finish_load(p, stop)
    assert_exact(result)
    before_fast = fast_packets(flab)
    before, _ = flab.counters("echo")
    r = flab.pyclient("udp-echo", VIP, 7, N)
    assert r["answered_once"] == N and r["duplicated"] == 0, r
    after, _ = flab.counters("echo")
    assert fast_packets(flab) - before_fast >= N  # back on the fast path, now to n2
    assert after["n2"] - before["n2"] == N and after["n1"] == before["n1"]


def nft_node_map(h, k: int) -> bool:
    return labmod.exec_in(h.lab.node_ns(k), ["nft", "list", "table", "inet", "vipcluster_node"],
                          capture_output=True).returncode == 0


def test_nodes_keep_their_verdict_map_in_the_tcx_program_not_in_nft(flab):
    assert not any(nft_node_map(flab, k) for k in (1, 2, 3))
    before, _ = flab.counters("kv")
    r = flab.pyclient("kv", VIP, 6379, 20)
    assert r["get_ok"] == 20, r
    after, _ = flab.counters("kv")  # counted by the program on n2's cluster interface
    owner = next(n for n in after if after[n] > before[n])
    assert after[owner] - before[owner] >= 40 and all(after[n] == before[n] for n in after if n != owner)


def test_without_the_fast_path_nft_delivers_the_same():
    with lab_with_services("fo", delivery=Delivery.SELECTIVE, bpf_fast_path=False, node_bpf=False) as h:
        gw = scrape(h, "gateway")
        assert not any(name == "vipcluster_fast_path_packets_total" for name, _ in gw)
        assert nft_node_map(h, 1) and nft_node_map(h, 2)
        before, _ = h.counters("echo")
        r = h.pyclient("udp-echo", VIP, 7, N)
        assert r["answered_once"] == N and r["duplicated"] == 0, r
        after, _ = h.counters("echo")
        assert after["n1"] - before["n1"] == N and after["n2"] == before["n2"]
