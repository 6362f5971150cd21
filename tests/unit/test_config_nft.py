"""Config validation (errors name the field) and the nft delivery script. The control
transport is tested in tests/unit/test_wire.py."""

import copy

import pytest

from clustercore.config import gateway_config_from_dict, node_config_from_dict
from clustercore.errors import ConfigError
from gateway.nft import epoch_mac, render_ruleset

GW = {
    "vip": "203.0.113.10", "client_interface": "eth0", "cluster_interface": "eth1",
    "listen_address": "192.0.2.1", "tls_ca": "/etc/vipcluster/pki/ca.crt", "tls_cert": "/etc/vipcluster/pki/gateway.crt", "tls_key": "/etc/vipcluster/pki/gateway.key",
    "nodes": [{"name": "n1", "address": "192.0.2.11", "mac": "02:00:00:00:01:01"},
              {"name": "n2", "address": "192.0.2.12", "mac": "02:00:00:00:01:02"}],
}
NODE = {"name": "n1", "vip": "203.0.113.10", "gateway_address": "192.0.2.1", "tls_ca": "/ca", "tls_cert": "/c", "tls_key": "/k"}


def test_valid_configs_and_defaults():
    g = gateway_config_from_dict(GW)
    assert g.listen_port == 7400 and g.control_socket == "/run/vipcluster/control.sock"
    assert g.node("n2").mac == "02:00:00:00:01:02" and g.node("nx") is None
    n = node_config_from_dict(NODE)
    assert n.queue_num == 0 and n.gateway_port == 7400


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("vip"), "vip"),
    (lambda d: d.update(vip="203.0.113.300"), "vip"),
    (lambda d: d.update(listen_port=70000), "listen_port"),
    (lambda d: d.update(nodes=[]), "nodes"),
    (lambda d: d["nodes"][1].update(mac="01:00:5e:00:00:01"), "nodes[1].mac"),
    (lambda d: d["nodes"][1].update(mac="nonsense"), "nodes[1].mac"),
    (lambda d: d["nodes"][1].update(name="n1"), "nodes[1].name"),
    (lambda d: d["nodes"][0].pop("address"), "nodes[0].address"),
    (lambda d: d.update(cluster_interface="eth0"), "cluster_interface"),
    (lambda d: d.update(colour="blue"), "colour"),
])
def test_gateway_config_errors_name_the_field(mutate, field):
    d = copy.deepcopy(GW)
    mutate(d)
    with pytest.raises(ConfigError) as e:
        gateway_config_from_dict(d, "gw.toml")
    assert e.value.field == field
    assert f"'{field}'" in str(e.value) and "gw.toml" in str(e.value)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("name"), "name"),
    (lambda d: d.update(name="bad name"), "name"),
    (lambda d: d.update(gateway_address="gw"), "gateway_address"),
    (lambda d: d.update(queue_num=-1), "queue_num"),
    (lambda d: d.update(queue_num=True), "queue_num"),
])
def test_node_config_errors_name_the_field(mutate, field):
    d = copy.deepcopy(NODE)
    mutate(d)
    with pytest.raises(ConfigError) as e:
        node_config_from_dict(d)
    assert e.value.field == field


def test_nft_ruleset_copies_to_every_node_and_tags_epochs():
    script = render_ruleset(vip="203.0.113.10", client_interface="eth0", cluster_interface="eth1",
                            gateway_mac="02:aa:00:00:00:01", node_macs=["02:00:00:00:01:01", "02:00:00:00:01:02"],
                            epochs={(6, 7): 3})
    assert 'hook ingress device "eth0"' in script
    assert 'ether daddr set 02:00:00:00:01:01 dup to "eth1"' in script
    assert 'ether daddr set 02:00:00:00:01:02 fwd to "eth1"' in script
    assert "    elements = { tcp . 7 : jump port_tcp_7 }" in script
    assert f"  chain port_tcp_7 {{\n    ether saddr set {epoch_mac(3)}\n  }}" in script
    # the nft 1.0.6 pitfall: no one-line rule sets ending in '}' after a statement
    assert all(not line.rstrip().endswith("; }") for line in script.splitlines())
    assert epoch_mac(1) != epoch_mac(2) and int(epoch_mac(7)[:2], 16) & 1 == 0


def _chain(script, name):
    lines = script.splitlines()
    start = lines.index(f"  chain {name} {{")
    return lines[start + 1:lines.index("  }", start)]


def test_service_ports_are_one_lookup_whatever_their_number():
    """The `vip` chain has the same rules for 1 or 200 service ports (one verdict-map
    lookup); each port's chain has its epoch tag and, when selective, its copies."""
    macs = ["02:00:00:00:01:01", "02:00:00:00:01:02", "02:00:00:00:01:03"]
    common = dict(vip="203.0.113.10", client_interface="eth0", cluster_interface="eth1",
                  gateway_mac="02:aa:00:00:00:01", node_macs=macs)
    one = render_ruleset(epochs={(6, 7): 2}, **common)
    many = render_ruleset(epochs={(p, 1000 + i): 1 for i in range(100) for p in (6, 17)},
                          targets={(6, 1000): macs[1:2]}, **common)
    assert _chain(one, "vip") == _chain(many, "vip") == [
        "    ether saddr set 02:aa:00:00:00:01", "    meta l4proto . th dport vmap @ports",
        '    ether daddr set 02:00:00:00:01:01 dup to "eth1"', '    ether daddr set 02:00:00:00:01:02 dup to "eth1"',
        '    ether daddr set 02:00:00:00:01:03 fwd to "eth1"']
    assert many.count(" : jump port_") == 200
    assert _chain(many, "port_tcp_1000") == [
        f'    ether saddr set {epoch_mac(1)} ether daddr set 02:00:00:00:01:02 fwd to "eth1"']
    assert _chain(many, "port_udp_1099") == [f"    ether saddr set {epoch_mac(1)}"]  # back to every node
    none = render_ruleset(epochs={}, **common)
    assert "map ports" not in none and "vmap" not in none
