"""The batched handoff's flow codec (clustercore.batch_messages.FLOWS): runs of flows that
share protocol, destination and port; exact round trip in order; a total decoder."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore import batch_messages as bm
from clustercore import messages as msgs
from clustercore.errors import PeerControlError

VIP = "203.0.113.10"


def conn(i: int, port: int = 7, dst: str = VIP, proto: int = 6):
    return (proto, f"198.51.100.{i % 250 + 1}", 10000 + i, dst, port)


def test_a_services_connections_are_one_run_and_come_back_in_order():
    kept = tuple(conn(i) for i in range(1000))
    wire = bm.FLOWS.to_wire(kept)
    assert len(wire) == 1 and wire[0][:3] == [6, VIP, 7] and len(wire[0][3]) == 2000
    assert bm.FLOWS.from_wire(json.loads(json.dumps(wire))) == kept


def test_interleaved_ports_keep_the_order_of_the_flows():
    flows = (conn(1, 80), conn(2, 443), conn(3, 80), conn(4, 80), conn(5, 443))
    wire = bm.FLOWS.to_wire(flows)
    assert [r[2] for r in wire] == [80, 443, 80, 443]
    assert bm.FLOWS.from_wire(wire) == flows


def test_a_journal_written_before_the_runs_still_reads():
    old = [[6, "198.51.100.1", 40001, VIP, 7], [17, "2001:db8::1", 53, "2001:db8::10", 53]]
    assert bm.FLOWS.from_wire(old) == ((6, "198.51.100.1", 40001, VIP, 7),
                                       (17, "2001:db8::1", 53, "2001:db8::10", 53))
    # and a mix of both forms
    assert bm.FLOWS.from_wire([old[0], [6, VIP, 7, ["198.51.100.2", 40002]]])[1] == (6, "198.51.100.2", 40002, VIP, 7)


@pytest.mark.parametrize("bad", [
    None, {}, "flows", [None], [[6, VIP, 7]], [[6, VIP, 7, ["198.51.100.1"]]],
    [[6, VIP, 7, ["198.51.100.1", "40001"]]], [[6, VIP, 7, ["", 40001]]],
    [[6, VIP, 70000, ["198.51.100.1", 1]]], [[True, VIP, 7, ["198.51.100.1", 1]]],
    [[6, "", 7, ["198.51.100.1", 1]]], [[6, VIP, 7, "198.51.100.1 1"]],
    [[6, VIP, 7, ["198.51.100.1", -1]]], [[6, VIP, 7, ["198.51.100.1", 1, "198.51.100.1", 1]]],
    [[6, "198.51.100.1", 1, VIP, 7], [6, VIP, 7, ["198.51.100.1", 1]]],
])
def test_malformed_flows_are_the_peers_fault(bad):
    with pytest.raises(PeerControlError):
        bm.FLOWS.from_wire(bad)


def test_a_message_carrying_runs_decodes_to_the_same_message():
    step = bm.ReleaseBatch(service="echo", epoch="02:76:63:00:00:02", batch=0,
                           flows=tuple(conn(i) for i in range(50)) + (conn(1, 8),))
    assert msgs.decode(json.loads(json.dumps(step.to_wire()))) == step


flows_st = st.lists(st.tuples(st.sampled_from([6, 17]), st.sampled_from(["198.51.100.1", "2001:db8::1", "x"]),
                              st.integers(0, 65535), st.sampled_from([VIP, "2001:db8::10"]),
                              st.sampled_from([7, 53, 65535])), unique=True, max_size=40)


@settings(max_examples=300, deadline=None)
@given(flows_st)
def test_any_flows_round_trip_exactly(flows):
    flows = tuple(flows)
    assert bm.FLOWS.from_wire(json.loads(json.dumps(bm.FLOWS.to_wire(flows)))) == flows


json_st = st.recursive(st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=3),
                       lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
                       max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(json_st)
def test_the_decoder_is_total(data):
    try:
        flows = bm.FLOWS.from_wire(data)
    except PeerControlError:
        return
    assert all(len(f) == 5 for f in flows)
