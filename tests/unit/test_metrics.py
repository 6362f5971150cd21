"""The metrics of the gateway and the agents (gateway.metrics, nodeshim.metrics) and the
endpoint that serves them (vipwire.metricsserver), parsed with prometheus_client's own
text parser, as a Prometheus server would read them."""

import asyncio
import threading
from types import SimpleNamespace

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clustercore.config import GatewayConfig, NodeEntry
from clustercore.migration import MigrationBook
from clustercore.ownership import Service, ServiceTable
from gateway.metrics import GatewayMetrics
from nodeshim import iptables, nftnode
from nodeshim import metrics as node_metrics
from nodeshim.agent import NodeAgent
from vipwire.metricsserver import MetricsServer, serve


def parse(registry) -> dict:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def fake_gateway():
    cfg = GatewayConfig(vip="203.0.113.10", client_interface="c0", cluster_interface="br0",
                        listen_address="192.0.2.1", tls_ca="ca", tls_cert="c", tls_key="k",
                        nodes=(NodeEntry("n1", "192.0.2.11", "02:00:00:00:01:01"),
                               NodeEntry("n2", "192.0.2.12", "02:00:00:00:01:02"),
                               NodeEntry("n3", "192.0.2.13", "02:00:00:00:01:03")))
    table = ServiceTable([Service("echo", "n1", ((6, 7), (17, 7)), "builtin:echo"),
                          Service("kv", "n2", ((6, 6379),), "builtin:kv"),
                          Service("web", "n1", ((6, 80),), "nginx -g 'daemon off;'")])
    book = MigrationBook()
    controller = SimpleNamespace(book=book, busy=lambda name: name in book)
    gw = SimpleNamespace(config=cfg, table=table, agents={"n1": object(), "n2": object()},
                         epochs={"echo": 3}, controller=controller,
                         copies_per_packet=lambda: {"steady": 3, "migrating": 3}, fast_path=None)
    return gw, book


def test_gateway_state_is_read_at_scrape_time():
    gw, book = fake_gateway()
    m = GatewayMetrics(gw)
    s = parse(m.registry)
    assert [val(s, "vipcluster_node_up", node=n) for n in ("n1", "n2", "n3")] == [1, 1, 0]
    assert [val(s, "vipcluster_node_services", node=n) for n in ("n1", "n2", "n3")] == [2, 1, 0]
    assert val(s, "vipcluster_service_info", service="echo", owner="n1", strategy="handoff") == 1
    assert val(s, "vipcluster_service_info", service="web", owner="n1", strategy="process") == 1
    assert val(s, "vipcluster_service_epoch", service="echo") == 3
    assert val(s, "vipcluster_service_epoch", service="kv") == 1
    assert val(s, "vipcluster_migrations_in_progress") == 0
    book.begin(service="echo", owner="n1", dest="n2", nodes={"n1": True, "n2": True, "n3": False})
    del gw.agents["n2"]
    s = parse(m.registry)
    assert val(s, "vipcluster_migrations_in_progress") == 1
    assert val(s, "vipcluster_service_migrating", service="echo") == 1
    assert val(s, "vipcluster_service_migrating", service="kv") == 0
    assert val(s, "vipcluster_node_up", node="n2") == 0


def test_the_fast_path_counter_is_read_at_scrape_time_and_absent_without_it():
    gw, _ = fake_gateway()
    m = GatewayMetrics(gw)
    assert not [k for k in parse(m.registry) if k[0].startswith("vipcluster_fast_path")]
    counts = iter([5, 12])
    gw.fast_path = SimpleNamespace(packets=lambda: next(counts))
    assert val(parse(m.registry), "vipcluster_fast_path_packets_total") == 5
    assert val(parse(m.registry), "vipcluster_fast_path_packets_total") == 12


def test_health_series_exist_only_for_services_with_a_check():
    gw, _ = fake_gateway()
    m = GatewayMetrics(gw)
    assert not [k for k in parse(m.registry) if k[0] == "vipcluster_service_healthy"]
    m.set_health("echo", True)
    m.set_health("kv", False)
    s = parse(m.registry)
    assert val(s, "vipcluster_service_healthy", service="echo") == 1
    assert val(s, "vipcluster_service_healthy", service="kv") == 0
    m.set_health("kv", None)
    assert val(parse(m.registry), "vipcluster_service_healthy", service="kv") is None


def test_a_migration_report_is_counted_with_its_measures():
    gw, _ = fake_gateway()
    m = GatewayMetrics(gw)
    report = {"service": "echo", "from": "n1", "to": "n2", "outcome": "committed", "freeze_ms": 3.0,
              "total_ms": 180.0, "bytes_moved": 123456, "tcp_established": 7, "held": 40, "released": 35,
              "duplicates_suppressed": 5, "lost": 0, "kernel_queue_drops": {"n1": 2}}
    m.migration_finished(report)
    m.migration_finished({**report, "outcome": "rolled_back", "freeze_ms": None, "total_ms": 50.0,
                          "bytes_moved": 999, "held": 1, "released": 1, "duplicates_suppressed": 0,
                          "kernel_queue_drops": {}})
    s = parse(m.registry)
    assert val(s, "vipcluster_migrations_total", service="echo", strategy="handoff", outcome="committed") == 1
    assert val(s, "vipcluster_migrations_total", service="echo", strategy="handoff", outcome="rolled_back") == 1
    # only a committed migration moved bytes and connections and had a freeze to measure
    assert val(s, "vipcluster_migration_moved_bytes_total", service="echo", strategy="handoff") == 123456
    assert val(s, "vipcluster_migration_moved_connections_total", service="echo") == 7
    assert val(s, "vipcluster_migration_freeze_seconds_count", strategy="handoff") == 1
    assert val(s, "vipcluster_migration_freeze_seconds_sum", strategy="handoff") == pytest.approx(0.003)
    assert val(s, "vipcluster_migration_freeze_seconds_bucket", strategy="handoff", le="0.0025") == 0
    assert val(s, "vipcluster_migration_freeze_seconds_bucket", strategy="handoff", le="0.005") == 1
    assert val(s, "vipcluster_migration_duration_seconds_count", strategy="handoff", outcome="committed") == 1
    assert val(s, "vipcluster_migration_duration_seconds_sum", strategy="handoff", outcome="rolled_back") == 0.05
    assert val(s, "vipcluster_migration_held_packets_total", service="echo") == 41
    assert val(s, "vipcluster_migration_released_packets_total", service="echo") == 36
    assert val(s, "vipcluster_migration_duplicates_suppressed_total", service="echo") == 5
    assert val(s, "vipcluster_migration_kernel_queue_drops_total", node="n1") == 2


def test_logins_refusals_and_transitions():
    gw, _ = fake_gateway()
    m = GatewayMetrics(gw)
    m.login("n1")
    m.login("n1")
    m.node_down("n1")
    m.refused("wrong_name")
    m.refused("something a peer made up")  # label values stay a closed set
    m.control_refused("not_root")
    s = parse(m.registry)
    assert val(s, "vipcluster_logins_total", node="n1") == 2
    assert val(s, "vipcluster_node_transitions_total", node="n1", state="up") == 2
    assert val(s, "vipcluster_node_transitions_total", node="n1", state="down") == 1
    assert val(s, "vipcluster_login_refusals_total", reason="wrong_name") == 1
    assert val(s, "vipcluster_login_refusals_total", reason="other") == 1
    assert not [k for k in s if "made up" in str(k)]
    assert val(s, "vipcluster_control_refusals_total", reason="not_root") == 1


class FakeRole:
    def __init__(self, n):
        self.n = n

    def held_count(self):
        return self.n


def fake_agent(fast_rules, own, kernel_base):
    agent = SimpleNamespace(
        config=SimpleNamespace(name="n2", queue_num=0, queue_nums=range(0, 4), vips=("203.0.113.10",)),
        filter=SimpleNamespace(counters_dict=lambda: {k: dict(v) for k, v in own.items()}, unparsed=4,
                               roles={"echo": FakeRole(12)}),
        _fast_rules=fast_rules, _kernel_base=kernel_base, queue=SimpleNamespace(errors=0),
        running={}, rpc=object(), _front=nftnode,  # the nft map's module (bpfnode.NodeMap: the same calls)
        _datapath_lock=threading.RLock())
    agent.fast_rules_now = lambda: agent._fast_rules
    agent.packet_counters = lambda kernel=None: NodeAgent.packet_counters(agent, kernel)
    agent.kernel_counters = lambda kernel=None: NodeAgent.kernel_counters(agent, kernel)
    agent.read_kernel_counters = lambda: NodeAgent.read_kernel_counters(agent)
    return agent


def test_node_packets_fold_the_kernel_counters_in(monkeypatch):
    own = {"echo": {"accepted": 5, "dropped": 1, "held": 12}}
    agent = fake_agent(["-A VIPCLUSTER ..."], own, {"echo": {"accepted": 100, "dropped": 0},
                                                   "kv": {"accepted": 0, "dropped": 30}})
    reads = []

    def read_counters(versions=None):
        reads.append(1)
        return {"echo": {"accepted": 1000, "dropped": 2}, "kv": {"accepted": 0, "dropped": 7}}
    monkeypatch.setattr(iptables, "read_counters", read_counters)
    # the verdict map's counters (nodeshim.nftnode) are added to the list's
    monkeypatch.setattr(nftnode, "read_counters", lambda: {"echo": {"accepted": 20, "dropped": 0}})
    monkeypatch.setattr(node_metrics.queue, "kernel_drops", lambda q: 9)
    m = node_metrics.NodeMetrics(agent)
    asyncio.run(m.before_scrape())
    s = parse(m.registry)
    assert val(s, "vipcluster_packets_total", node="n2", service="echo", verdict="accepted") == 1125
    assert val(s, "vipcluster_packets_total", node="n2", service="echo", verdict="dropped") == 3
    assert val(s, "vipcluster_packets_total", node="n2", service="echo", verdict="held") == 12
    assert val(s, "vipcluster_packets_total", node="n2", service="kv", verdict="dropped") == 37
    # the kernel's part alone: the map's and the list's, replaced rules' included, no queue
    assert val(s, "vipcluster_kernel_packets_total", node="n2", service="echo", verdict="accepted") == 1120
    assert val(s, "vipcluster_kernel_packets_total", node="n2", service="echo", verdict="dropped") == 2
    assert val(s, "vipcluster_kernel_packets_total", node="n2", service="kv", verdict="dropped") == 37
    assert val(s, "vipcluster_kernel_queue_drops_total", node="n2") == 9
    assert val(s, "vipcluster_unparsed_packets_total", node="n2") == 4
    assert val(s, "vipcluster_held_packets", node="n2", service="echo") == 12
    assert val(s, "vipcluster_agent_gateway_connected", node="n2") == 1
    assert reads == [1]


def test_node_with_the_queue_datapath_reads_no_kernel_counters(monkeypatch):
    agent = fake_agent([], {"echo": {"accepted": 5, "dropped": 1, "held": 0}}, {})
    monkeypatch.setattr(iptables, "read_counters", lambda versions=None: pytest.fail("read"))
    monkeypatch.setattr(nftnode, "read_counters", lambda: pytest.fail("read"))
    m = node_metrics.NodeMetrics(agent)
    asyncio.run(m.before_scrape())
    assert val(parse(m.registry), "vipcluster_packets_total", node="n2", service="echo", verdict="accepted") == 5
    assert not [k for k in parse(m.registry) if k[0] == "vipcluster_kernel_packets_total"]


def test_rules_replaced_during_the_read_are_read_again(monkeypatch):
    """The counters of a replaced rule set go into the base: a read of the old rules must
    not be added to it (the counter would jump up, then back down)."""
    agent = fake_agent(["old"], {}, {})
    calls = []

    def read_counters(versions=None):
        calls.append(agent._fast_rules)
        if len(calls) == 1:
            agent._fast_rules = ["new"]  # sync_datapath ran meanwhile
            agent._kernel_base = {"echo": {"accepted": 50, "dropped": 0}}
            return {"echo": {"accepted": 50, "dropped": 0}}
        return {"echo": {"accepted": 3, "dropped": 0}}
    monkeypatch.setattr(iptables, "read_counters", read_counters)
    monkeypatch.setattr(nftnode, "read_counters", lambda: {})
    m = node_metrics.NodeMetrics(agent)
    asyncio.run(m.before_scrape())
    assert len(calls) == 2
    assert val(parse(m.registry), "vipcluster_packets_total", node="n2", service="echo", verdict="accepted") == 53


def test_node_event_counters():
    m = node_metrics.NodeMetrics(fake_agent([], {}, {}))
    m.session("registered")
    m.step("echo", "migrate.freeze", "ok")
    m.step("echo", "migrate.freeze", "refused")
    m.restarted("kv")
    s = parse(m.registry)
    assert val(s, "vipcluster_agent_gateway_sessions_total", node="n2", event="registered") == 1
    assert val(s, "vipcluster_agent_migration_steps_total", node="n2", service="echo", step="freeze", outcome="ok") == 1
    assert val(s, "vipcluster_agent_migration_steps_total", node="n2", service="echo", step="freeze",
               outcome="refused") == 1
    assert val(s, "vipcluster_agent_service_restarts_total", node="n2", service="kv") == 1


# --- the endpoint ---------------------------------------------------------------------


async def _http(port, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_the_endpoint_serves_the_registry_after_its_hook():
    gw, _ = fake_gateway()
    m = GatewayMetrics(gw)
    hooked = []

    async def before():
        hooked.append(1)
        m.login("n3")

    async def main():
        server = MetricsServer(m.registry, before)
        await server.start("127.0.0.1", 0)
        try:
            ok = await _http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            missing = await _http(server.port, b"GET /other HTTP/1.1\r\n\r\n")
            post = await _http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")
            garbage = await _http(server.port, b"\x00\xff" * 5000)  # no head end: closed
        finally:
            server.close()
        return ok, missing, post, garbage
    ok, missing, post, garbage = asyncio.run(main())
    head, body = ok.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200") and b"text/plain; version=" in head
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples[("vipcluster_logins_total", (("node", "n3"),))] == 1 and hooked == [1]
    assert missing.startswith(b"HTTP/1.0 404") and post.startswith(b"HTTP/1.0 405")
    assert garbage == b""


def test_off_serves_nothing_and_a_bad_address_is_refused():
    from prometheus_client import CollectorRegistry

    assert asyncio.run(serve("off", CollectorRegistry())) is None
    with pytest.raises(ValueError):
        asyncio.run(serve("localhost:9470", CollectorRegistry()))


# --- the config field -------------------------------------------------------------------


def test_metrics_address_in_the_configs():
    from clustercore.config import gateway_config_from_dict, listen_address, node_config_from_dict
    from clustercore.errors import ConfigError

    gw = {"vip": "203.0.113.10", "client_interface": "c0", "cluster_interface": "br0",
          "listen_address": "192.0.2.1", "tls_ca": "a", "tls_cert": "b", "tls_key": "c",
          "nodes": [{"name": "n1", "address": "192.0.2.11", "mac": "02:00:00:00:01:01"}]}
    node = {"name": "n1", "vip": "203.0.113.10", "gateway_address": "192.0.2.1",
            "tls_ca": "a", "tls_cert": "b", "tls_key": "c"}
    assert gateway_config_from_dict(gw).metrics_address == "127.0.0.1:9470"
    assert node_config_from_dict(node).metrics_address == "127.0.0.1:9471"
    assert gateway_config_from_dict({**gw, "metrics_address": "off"}).metrics_address == "off"
    assert listen_address("[2001:db8::1]:9100") == ("2001:db8::1", 9100)
    for bad in ("localhost:9470", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", 9470, ""):
        with pytest.raises(ConfigError) as e:
            node_config_from_dict({**node, "metrics_address": bad})
        assert "metrics_address" in str(e.value)


def test_status_lists_the_migrations_in_progress():
    from gateway.controller import Controller

    c = Controller(SimpleNamespace())
    assert c.in_progress() == []
    c.runs["echo"] = SimpleNamespace(source="n1", dest="n2", entered=("freezing", 0.0), started=0.0, streamed=512)
    c.runs["kv"] = SimpleNamespace(source="n2", dest="n3", entered=None, started=0.0, streamed=0)
    c.recovering["web"] = object()
    got = c.in_progress()
    assert [(m["service"], m.get("from"), m.get("to"), m["step"]) for m in got] == [
        ("echo", "n1", "n2", "freezing"), ("kv", "n2", "n3", "start"), ("web", None, None, "recovering")]
    assert got[0]["streamed"] == 512


def test_control_requests_are_counted_by_outcome():
    from clustercore import messages as msgs
    from clustercore.errors import LocalControlError

    gw, _ = fake_gateway()
    m = GatewayMetrics(gw)

    async def ok(msg, ctx):
        return {"pong": True}

    async def refuse(msg, ctx):
        raise LocalControlError("unknown service 'x'")

    async def bug(msg, ctx):
        raise KeyError("a bug")
    handlers = m.count_requests({msgs.Ping: ok, msgs.ServiceRemove: refuse, msgs.Status: bug})
    assert asyncio.run(handlers[msgs.Ping](msgs.Ping(), None)) == {"pong": True}
    with pytest.raises(LocalControlError):
        asyncio.run(handlers[msgs.ServiceRemove](msgs.ServiceRemove(name="x"), None))
    with pytest.raises(KeyError):
        asyncio.run(handlers[msgs.Status](msgs.Status(), None))
    s = parse(m.registry)
    assert val(s, "vipcluster_control_requests_total", op="ping", outcome="ok") == 1
    assert val(s, "vipcluster_control_requests_total", op="service.remove", outcome="refused") == 1
    assert val(s, "vipcluster_control_requests_total", op="status", outcome="error") == 1


def test_heartbeat_age_only_for_nodes_logged_in():
    import time

    gw, _ = fake_gateway()
    gw.agents = {"n1": SimpleNamespace(rpc=SimpleNamespace(last_seen=time.monotonic() - 100.0))}
    s = parse(GatewayMetrics(gw).registry)
    assert val(s, "vipcluster_node_heartbeat_age_seconds", node="n1") >= 100.0
    assert val(s, "vipcluster_node_heartbeat_age_seconds", node="n2") is None


def test_metrics_over_tls_want_a_collectors_certificate(tmp_path):
    """metrics_tls: the endpoint speaks TLS 1.3 with the daemon's certificate; a collector
    (or an admin) scrapes, a node's certificate gets 403, no certificate no handshake,
    and a revoked collector 403."""
    import ssl

    from prometheus_client import CollectorRegistry, Counter

    from vipwire import pki, tls

    d = str(tmp_path / "pki")
    pki.init(d, nodes=["n1"], collectors=["prom", "old"])
    gw = pki.paths(d, "gateway")
    registry = CollectorRegistry()
    Counter("vipcluster_probe_total", "a series to find", registry=registry).inc(3)

    def client(role=None, name=""):
        ctx = ssl.create_default_context(cafile=gw.ca_cert)
        if role:
            who = pki.paths(d, role, name)
            ctx.load_cert_chain(who.cert, who.key)
        return ctx

    async def get(ctx):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=tls.SERVER_NAME)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    port = None

    async def main():
        nonlocal port
        import socket
        with socket.socket() as probe:  # a free port (the address must name one)
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        server = await serve(f"127.0.0.1:{free}", registry, tls_files=(gw.cert, gw.key, gw.ca_cert))
        port = server.port
        try:
            out = {"collector": await get(client("collector", "prom")), "node": await get(client("node", "n1"))}
            try:  # TLS 1.3: the server's refusal of the handshake arrives after the client's Finished
                out["none"] = await get(client())
            except (ssl.SSLError, ConnectionError) as e:
                out["none"] = repr(e).encode()
            pki.revoke(d, "collector", "old")
            out["revoked"] = await get(client("collector", "old"))
            return out
        finally:
            server.close()

    out = asyncio.run(main())
    assert out["collector"].startswith(b"HTTP/1.0 200") and b"vipcluster_probe_total 3.0" in out["collector"]
    assert out["node"].startswith(b"HTTP/1.0 403"), out["node"][:80]
    assert not out["none"].startswith(b"HTTP"), out["none"][:80]  # no answer at all
    assert out["revoked"].startswith(b"HTTP/1.0 403"), out["revoked"][:80]
