"""The health machine (clustercore.health): schedule, threshold, every (state, event) pair,
the spec's validation and wire form, and where a failed service goes."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore import health as h
from clustercore import messages as msgs
from clustercore.errors import LocalControlError, PeerControlError
from clustercore.ownership import Service, ServiceTable
from nodeshim.probes import dns_answer_ok, dns_query


def spec(**kw):
    return h.HealthSpec(check=kw.pop("check", "tcp"), **kw)


def test_every_state_event_pair_is_in_the_table():
    for state in h.Health:
        for event in (h.Tick, h.ProbePassed, h.ProbeFailed):
            assert (state, event) in h.TRANSITIONS


def test_probe_schedule_follows_the_interval_and_never_overlaps():
    m = h.HealthMonitor("echo", spec(interval_s=2.0))
    assert m.handle(h.Tick(now=0.0)) == [h.RunProbe(service="echo", spec=m.spec)]
    assert m.handle(h.Tick(now=5.0)) == []  # one probe at a time
    cmds = m.handle(h.ProbePassed(now=0.1, detail="ok"))
    assert [c.state for c in cmds] == [h.Health.HEALTHY]
    assert m.handle(h.Tick(now=1.9)) == []  # not due before the interval
    assert len(m.handle(h.Tick(now=2.0))) == 1


def test_unhealthy_after_k_failures_in_a_row_and_back_on_one_pass():
    m = h.HealthMonitor("echo", spec(interval_s=1.0, failures=3))
    states = []
    now = 0.0
    for ok in (True, False, False, True, False, False, False, False):
        assert m.handle(h.Tick(now=now))
        ev = h.ProbePassed(now=now) if ok else h.ProbeFailed(now=now, detail="process 7 is stopped")
        states += [c.state for c in m.handle(ev)]
        now += 1.0
    # a pass between failures resets the count: only the run of 3 makes it unhealthy,
    # and it is reported once
    assert states == [h.Health.HEALTHY, h.Health.FAILING, h.Health.FAILING, h.Health.HEALTHY,
                      h.Health.FAILING, h.Health.FAILING, h.Health.UNHEALTHY]
    assert m.state is h.Health.UNHEALTHY and m.failures == 4
    m.handle(h.Tick(now=now))
    assert [c.state for c in m.handle(h.ProbePassed(now=now))] == [h.Health.HEALTHY]


def test_a_result_with_no_probe_running_is_ignored():
    m = h.HealthMonitor("echo", spec(failures=1))
    assert m.handle(h.ProbeFailed(now=0.0, detail="late")) == []
    assert m.state is h.Health.STARTING


@pytest.mark.parametrize("check", ["", "udp", "tcp:80", "http:index", "http:/a b", "dns:", "exec:", "exec:'x",
                                   "dns:" + "a" * 64 + ".com", 5, None])
def test_bad_checks_are_refused_with_a_reason(check):
    with pytest.raises(LocalControlError, match="--check"):
        h.HealthSpec(check=check)


@pytest.mark.parametrize("kw", [{"interval_s": 0}, {"interval_s": True}, {"failures": 0}, {"failures": 1.5},
                                {"failover": "migrate"}])
def test_bad_options_are_refused(kw):
    with pytest.raises(LocalControlError):
        spec(**kw)


def test_spec_travels_with_the_service_and_decodes_totally():
    s = Service("web", "n1", ((6, 80),), "nginx", health=spec(check="http:/healthz", failover="restart"))
    table = msgs.Table(services=(s,))
    back = msgs.decode(table.to_wire())
    assert back.services[0] == s and back.services[0].health.kind == "http"
    wire = table.to_wire()
    assert wire["services"][0]["check"]["check"] == "http:/healthz"
    wire["services"][0]["check"] = {"check": "tcp", "failures": "many"}
    with pytest.raises(PeerControlError):
        msgs.decode(wire)
    wire["services"][0]["check"] = {"check": "tcp", "evil": 1}
    with pytest.raises(PeerControlError):
        msgs.decode(wire)


def test_a_list_row_with_a_health_state_reads_back_as_the_service():
    """`service list --json` rows carry the spec under `check` and the state under
    `health`; tools (the replays) read rows back with Service.from_dict."""
    s = Service("web", "n1", ((6, 80),), "nginx", health=spec(check="tcp"))
    row = {**s.to_dict(), "health": "healthy", "health_detail": "connected"}
    assert Service.from_dict(row) == s
    plain = Service("old", "n2", ((6, 7),), "builtin:echo")
    assert Service.from_dict({**plain.to_dict(), "check": None, "health": "unchecked"}) == plain


def test_owner_change_keeps_the_check():
    t = ServiceTable([Service("web", "n1", ((6, 80),), "nginx", health=spec())])
    t.set_owner("web", "n2")
    assert t.get("web").owner == "n2" and t.get("web").health == spec()


def test_needs_port():
    with pytest.raises(LocalControlError, match="tcp port"):
        h.needs_port(spec(check="http:/"), ((17, 53),))
    h.needs_port(spec(check="dns:example.org"), ((17, 53),))


def test_pick_node_skips_down_unfit_and_current_and_balances():
    nodes = ["n1", "n2", "n3", "n4"]
    assert h.pick_node(current="n1", nodes=nodes, up={"n1", "n2", "n3", "n4"}, unfit={"n2"},
                       load={"n3": 2, "n4": 1}) == "n4"
    assert h.pick_node(current="n1", nodes=nodes, up={"n1", "n3"}, unfit=set(), load={}) == "n3"
    assert h.pick_node(current="n1", nodes=nodes, up={"n1"}, unfit=set(), load={}) is None


def test_dns_answer_check_is_total():
    q = dns_query("example.org", 77)
    assert q[:2] == b"\x00\x4d"
    answer = b"\x00\x4d\x81\x80" + q[4:]
    assert dns_answer_ok(answer, 77)[0]
    assert not dns_answer_ok(b"\x00\x4d\x81\x83" + q[4:], 77)[0]  # NXDOMAIN
    assert not dns_answer_ok(q, 77)[0]  # a query is not an answer
    for junk in (b"", b"\x00", bytes(11), b"\xff" * 40):
        assert dns_answer_ok(junk, 77)[0] is False


def test_failover_needs_a_service_vipcluster_can_start_elsewhere():
    from clustercore.kinds import ServiceKind

    with pytest.raises(LocalControlError, match="external or adopted"):
        h.check_failover(spec(failover="restart"), ServiceKind.ADOPTED)
    with pytest.raises(LocalControlError):
        h.check_failover(spec(failover="restart"), ServiceKind.EXTERNAL)
    h.check_failover(spec(), ServiceKind.EXTERNAL)  # a check alone is fine
    h.check_failover(spec(failover="restart"), ServiceKind.BUILTIN)


events = st.lists(st.tuples(st.sampled_from(["tick", "pass", "fail"]), st.floats(0, 5)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(seq=events, k=st.integers(1, 5), interval=st.sampled_from([0.1, 0.5, 2.0]))
def test_any_event_sequence_keeps_the_machine_consistent(seq, k, interval):
    """Whatever arrives in whatever order: one probe at a time, UNHEALTHY exactly when K
    failures in a row were counted, a report for each state change and only then."""
    m = h.HealthMonitor("svc", spec(interval_s=interval, failures=k))
    now, in_flight = 0.0, False
    for kind, dt in seq:
        now += dt
        before = m.state
        if kind == "tick":
            cmds = m.handle(h.Tick(now=now))
            if in_flight:
                assert cmds == []
            in_flight = in_flight or bool(cmds)
        else:
            ev = h.ProbePassed(now=now) if kind == "pass" else h.ProbeFailed(now=now, detail="x")
            cmds = m.handle(ev)
            if not in_flight:
                assert cmds == [] and m.state is before
            in_flight = False
        assert m.in_flight == in_flight
        assert (m.state is h.Health.UNHEALTHY) == (m.failures >= k)
        reports = [c for c in cmds if isinstance(c, h.ReportHealth)]
        if m.state is not before:
            assert [r.state for r in reports] == [m.state]
        elif m.state is not h.Health.FAILING:
            assert reports == []
