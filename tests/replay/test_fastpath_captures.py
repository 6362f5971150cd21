"""The kernel fast path and the queue agree on every verdict: every capture replayed through
both, on every node, with every node as anchor. The fast path either gives the queue's
verdict or hands the packet to the queue; it never decides differently."""

import pytest

from clustercore.fastpath import QUEUE, evaluate, rules_for
from clustercore.ownership import NodeFilter
from tests.replay.conftest import CAPTURE_FILES, loaded
from vipctl import replay as rp


@pytest.mark.parametrize("path", CAPTURE_FILES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_fast_path_and_queue_agree_on_every_packet_of_every_capture(path):
    cap = loaded(path)
    names, services = rp.setup(cap, (), None)
    decided = queued = 0
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
                want = f.decide(p.data).verdict
                assert verdict == want, (path, p.index, node, anchor, verdict, want)
    assert decided or not cap.capture.to_vip


def test_migrating_services_always_reach_the_queue():
    cap = loaded(next(p for p in CAPTURE_FILES if "migration" in p))
    names, services = rp.setup(cap, (), None)
    for s in services:
        rules = rules_for("n1", services, "n1", {s.name})
        for p in cap.capture.to_vip:
            if p.packet is not None and p.packet.service_key in s.ports:
                assert evaluate(rules, p.packet)[0] == QUEUE
