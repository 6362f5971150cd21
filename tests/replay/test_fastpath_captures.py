"""The kernel fast path and the queue agree on every verdict: every capture replayed through
both, on every node, with every node as anchor. The fast path either gives the queue's
verdict or hands the packet to the queue; it never decides differently."""

import pytest

from clustercore.fastpath import QUEUE, evaluate, rules_for
from clustercore.ownership import NodeFilter, Verdict
from clustercore.packet import ICMP, ICMPV6, TCP, UDP
from tests.replay.conftest import CAPTURE_FILES, loaded
from vipctl import replay as rp


@pytest.mark.parametrize("path", CAPTURE_FILES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_fast_path_and_queue_agree_on_every_packet_of_every_capture(path):
    cap = loaded(path)
    if not cap.capture.to_vip:
        pytest.skip("no packet to the VIP in this capture")
    names, services = rp.setup(cap, (), None)
    # what the rules must decide (no service in migration): every TCP and UDP packet and
    # every echo request (ICMP and ICMPv6); ICMP errors and other protocols go to the queue
    decidable = sum(1 for p in cap.capture.to_vip if p.packet is not None
                    and (p.packet.proto in (TCP, UDP) or (p.packet.proto, p.packet.icmp_type) in ((ICMP, 8), (ICMPV6, 128))))
    decided = queued = 0
    verdicts = {Verdict.ACCEPT: 0, Verdict.DROP: 0}
    for anchor in names:
        for node in names:
            f = NodeFilter(node)
            f.load(services, anchor)
            rules = rules_for(node, services, anchor, set())
            for p in cap.capture.to_vip:
                if p.packet is None:
                    continue  # unreadable bytes: the kernel rules let them reach the queue
                verdict, _ = evaluate(rules, p.packet)
                if verdict == QUEUE:
                    queued += 1
                    continue
                decided += 1
                verdicts[verdict] += 1
                want = f.decide(p.data).verdict
                assert verdict == want, (path, p.index, node, anchor, verdict, want)
    # the comparison covered every decidable packet on every node for every anchor, and
    # both verdicts occurred (the rules accepted on the owner and dropped elsewhere)
    assert decidable > 0
    assert decided == decidable * len(names) ** 2, (decided, decidable, queued)
    assert verdicts[Verdict.ACCEPT] > 0 and (verdicts[Verdict.DROP] > 0 or len(names) == 1), verdicts


def test_migrating_services_always_reach_the_queue():
    cap = loaded(next(p for p in CAPTURE_FILES if "migration" in p))
    names, services = rp.setup(cap, (), None)
    for s in services:
        rules = rules_for("n1", services, "n1", {s.name})
        checked = 0
        for p in cap.capture.to_vip:
            if p.packet is not None and p.packet.service_key in s.ports:
                assert evaluate(rules, p.packet)[0] == QUEUE
                checked += 1
        assert checked > 0, f"the capture has no packet of {s.name}"
