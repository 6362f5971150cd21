"""Config files as bytes (parse_toml: not UTF-8, not TOML, too deep -> ConfigError) and the
choices that become enums (delivery, datapath), with errors that name the field."""

import pytest

from clustercore.config import (GatewayConfig, NodeConfig, gateway_config_from_dict, node_config_from_dict,
                                parse_toml)
from clustercore.errors import ConfigError
from clustercore.kinds import Datapath, Delivery

GW = {
    "vip": "203.0.113.10", "client_interface": "eth0", "cluster_interface": "eth1",
    "listen_address": "192.0.2.1", "tls_ca": "/ca", "tls_cert": "/c", "tls_key": "/k",
    "nodes": [{"name": "n1", "address": "192.0.2.11", "mac": "02:00:00:00:01:01"}],
}
NODE = {"name": "n1", "vip": "203.0.113.10", "gateway_address": "192.0.2.1", "tls_ca": "/ca", "tls_cert": "/c", "tls_key": "/k"}


def test_choices_become_enums_with_todays_defaults():
    g = gateway_config_from_dict(GW)
    assert g.delivery is Delivery.BROADCAST and g.delivery == "broadcast"
    assert gateway_config_from_dict(GW | {"delivery": "selective"}).delivery is Delivery.SELECTIVE
    n = node_config_from_dict(NODE)
    assert n.datapath is Datapath.FAST and n.datapath == "fast"
    assert node_config_from_dict(NODE | {"datapath": "queue"}).datapath is Datapath.QUEUE


@pytest.mark.parametrize("value", ["turbo", "Selective", "", 1, True, ["selective"], {"a": 1}])
def test_a_bad_delivery_names_the_field_and_the_choices(value):
    with pytest.raises(ConfigError) as e:
        gateway_config_from_dict(GW | {"delivery": value}, "gw.toml")
    assert e.value.field == "delivery"
    assert "must be one of broadcast, selective" in str(e.value) and "gw.toml" in str(e.value)


@pytest.mark.parametrize("value", ["slow", None, 0])
def test_a_bad_datapath_names_the_field(value):
    with pytest.raises(ConfigError) as e:
        node_config_from_dict(NODE | {"datapath": value}, "n1.toml")
    assert e.value.field == "datapath" and "must be one of fast, queue" in str(e.value)


def test_dataclasses_built_by_hand_hold_enums_too():
    g = GatewayConfig(vip="203.0.113.10", client_interface="a", cluster_interface="b", listen_address="192.0.2.1",
                      tls_ca="/ca", tls_cert="/c", tls_key="/k", nodes=(), delivery="selective")
    assert g.delivery is Delivery.SELECTIVE
    assert NodeConfig(name="n1", vip="203.0.113.10", gateway_address="192.0.2.1", tls_ca="/ca", tls_cert="/c", tls_key="/k",
                      datapath="queue").datapath is Datapath.QUEUE
    with pytest.raises(ConfigError, match="'datapath'"):
        NodeConfig(name="n1", vip="203.0.113.10", gateway_address="192.0.2.1", tls_ca="/ca", tls_cert="/c", tls_key="/k", datapath="x")


def test_parse_toml_reads_a_config():
    assert parse_toml(b'name = "n1"\ndatapath = "queue"\n', "n1.toml") == {"name": "n1", "datapath": "queue"}


@pytest.mark.parametrize("data, needle", [
    (b'name = "\xff\xfe"\n', "not UTF-8 text (byte 8 is 0xff)"),
    (b"this is [not toml", "not valid TOML"),
    (b"a = " + b"[" * 100_000, "nested too deeply"),
    (b"a = 1\x00", "not valid TOML"),
])
def test_unreadable_bytes_are_one_config_error(data, needle):
    with pytest.raises(ConfigError) as e:
        parse_toml(data, "x.toml")
    assert needle in str(e.value) and str(e.value).startswith("x.toml: ")
    assert "\n" not in str(e.value)


def test_the_bpf_fast_path_is_on_unless_turned_off():
    assert gateway_config_from_dict(GW).bpf_fast_path is True
    assert gateway_config_from_dict(GW | {"bpf_fast_path": False}).bpf_fast_path is False
    with pytest.raises(ConfigError) as e:
        gateway_config_from_dict(GW | {"bpf_fast_path": "no"}, "gw.toml")
    assert e.value.field == "bpf_fast_path"
