"""The node agent's opt-in verdict log (nodeshim.verdictlog) and how the packet replay
folds it (vipctl.replaylab.fold_logs): no kernel, a fake queue packet."""

import time

import pytest
from scapy.all import IP, UDP, raw

from clustercore.capture import packet_digest
from clustercore.cutover import DestCutover, SourceCutover, epoch_mac
from clustercore.errors import LocalControlError
from clustercore.ownership import NodeFilter, Service, Verdict
from clustercore.packet import UDP as P_UDP
from nodeshim.verdictlog import VerdictLog
from vipctl.replaylab import fold_logs
from clustercore.messages import NodeVerdicts

ECHO = Service("echo", "n1", ((P_UDP, 7),), "builtin:echo")


class FakePacket:
    def __init__(self, data):
        self.data, self.verdict = data, None

    def accept(self):
        self.verdict = "accept"

    def drop(self):
        self.verdict = "drop"

    def get_payload(self):
        return self.data

    def get_hw(self):
        return b"\x02\x76\x63\x00\x00\x02"


def dgram(i, dport=7):
    return raw(IP(src="198.51.100.2", dst="203.0.113.10") / UDP(sport=5000, dport=dport) / (b"d%d" % i))


def node(name="n1"):
    f = NodeFilter(name)
    f.load([ECHO], "n1")
    return f


def test_off_by_default_and_bounded_by_its_ttl():
    log = VerdictLog()
    assert not log.active()
    assert log.request(NodeVerdicts(action="start", ttl=0.05))["active"]
    assert log.active()
    time.sleep(0.08)
    assert not log.active()
    with pytest.raises(LocalControlError):
        log.request(NodeVerdicts(action="start", ttl=0))
    with pytest.raises(LocalControlError):
        log.request(NodeVerdicts(action="read", since=-1))
    with pytest.raises(LocalControlError):
        log.request(NodeVerdicts(action="dance"))


def test_decisions_holds_and_their_resolutions_are_logged():
    log, f = VerdictLog(), node("n2")
    start = log.request(NodeVerdicts(action="start"))["seq"]
    cut = DestCutover(epoch_mac(2))
    f.roles["echo"] = cut
    pkts = [FakePacket(dgram(i)) for i in range(3)]
    assert log.decide(f, pkts[0].data, epoch_mac(1), pkts[0], 0.0) is Verdict.DROP  # old epoch
    for p in pkts[1:]:
        assert log.decide(f, p.data, epoch_mac(2), p, 0.0) is Verdict.HOLD
    plan = cut.release({(17, "198.51.100.2", 5000, "203.0.113.10", 7): 1}, 1.0)
    for h in plan.drop:
        h.drop()
    for h in plan.accept:
        h.accept()
    assert [p.verdict for p in pkts] == [None, "drop", "accept"]  # the real packets got them
    page = log.request(NodeVerdicts(action="read", since=start))
    assert [e[3] for e in page["entries"]] == ["drop", "hold", "hold", "drop", "accept"]
    assert page["entries"][0][1] == packet_digest(pkts[0].data) and page["entries"][0][2] == "echo"
    folded = fold_logs({"n2": page["entries"]})["n2"]
    assert [list(folded[packet_digest(p.data)]) for p in pkts] == [["drop"], ["drop"], ["accept"]]
    assert log.request(NodeVerdicts(action="stop"))["active"] is False


def test_a_handover_is_logged_when_the_source_gives_the_bytes_away():
    log, f = VerdictLog(), node("n1")
    log.request(NodeVerdicts(action="start"))
    cut = SourceCutover(epoch_mac(2))
    f.roles["echo"] = cut
    cut.freeze(0.0)
    late = FakePacket(dgram(9))
    assert log.decide(f, late.data, epoch_mac(1), late, 0.0) is Verdict.HOLD
    handed = [h.get_payload() for h in cut.hand_over_late()]
    assert handed == [late.data]
    for h in cut.commit().drop:
        h.drop()
    entries = log.request(NodeVerdicts(action="read"))["entries"]
    assert [e[3] for e in entries] == ["hold", "handover", "drop"]
    assert list(fold_logs({"n1": entries})["n1"][packet_digest(late.data)]) == ["handover"]


def test_pages_and_overflow():
    log, f = VerdictLog(max_entries=10), node()
    log.request(NodeVerdicts(action="start"))
    for i in range(25):
        log.decide(f, dgram(i), None, FakePacket(dgram(i)), 0.0)
    page = log.request(NodeVerdicts(action="read", since=0, limit=4))
    assert page["overflowed"] and len(page["entries"]) == 4 and page["more"]
    tail = log.request(NodeVerdicts(action="read", since=20))
    assert [e[0] for e in tail["entries"]] == [21, 22, 23, 24, 25] and not tail["more"] and not tail["overflowed"]


def test_identical_packets_are_told_apart_by_their_order():
    same = dgram(1)
    logs = {"n1": [[1, packet_digest(same), "echo", "accept", None], [2, packet_digest(same), "echo", "hold", None],
                   [3, None, None, "accept", 2]],
            "n2": [[1, packet_digest(same), "echo", "drop", None], [2, packet_digest(same), "echo", "hold", None]]}
    folded = fold_logs(logs)
    assert list(folded["n1"][packet_digest(same)]) == ["accept", "accept"]
    assert list(folded["n2"][packet_digest(same)]) == ["drop", "held"]  # never resolved
