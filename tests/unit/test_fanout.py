"""The hold spread over several queues: which queue a packet goes to (the u32 rules and
their Python twin), the rules that send a migrating service there, and the config."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, raw

from clustercore.config import node_config_from_dict
from clustercore.errors import ConfigError
from clustercore.fastpath import (FANOUT_BYPASS_CHAIN, FANOUT_CHAIN, fanout_queue, fanout_rules,
                                  rules_for, to_iptables)
from clustercore.kinds import builtin_spec
from clustercore.ownership import Service
from clustercore.packet import TCP as P_TCP
from clustercore.packet import UDP as P_UDP

VIP = "203.0.113.10"
CLIENT = "198.51.100.2"
ECHO = Service("echo", "n1", ((P_TCP, 7), (P_UDP, 7)), builtin_spec("echo"))
NODE = {"name": "n1", "vip": VIP, "gateway_address": "192.0.2.1",
        "tls_ca": "/ca", "tls_cert": "/c", "tls_key": "/k"}


@given(st.integers(1, 65535), st.integers(1, 65535), st.sampled_from([1, 2, 4, 8, 16]))
def test_one_flow_one_queue_chosen_by_the_low_bits_of_the_source_port(sport, dport, count):
    for pkt in (IP(src=CLIENT, dst=VIP) / UDP(sport=sport, dport=dport) / b"x",
                IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=dport, flags="PA") / b"data"):
        assert fanout_queue(raw(pkt), 10, count) == 10 + sport % count


def test_ip_options_shift_the_port_and_the_twin_follows():
    pkt = raw(IP(src=CLIENT, dst=VIP, options=b"\x01\x01\x01\x01") / UDP(sport=7, dport=53))
    assert pkt[0] & 0x0F == 6 and fanout_queue(pkt, 0, 4) == 3


def test_what_has_no_ports_goes_to_the_first_queue():
    assert fanout_queue(raw(IP(src=CLIENT, dst=VIP) / ICMP()), 3, 4) == 3
    later_fragment = raw(IP(src=CLIENT, dst=VIP, frag=100, proto=17) / (b"\x00\x03" * 8))
    assert fanout_queue(later_fragment, 3, 4) == 3
    first_fragment = raw(IP(src=CLIENT, dst=VIP, flags="MF") / UDP(sport=3, dport=53) / b"x")
    assert fanout_queue(first_fragment, 3, 4) == 6
    assert fanout_queue(b"\x45\x00", 3, 4) == 3  # truncated: the u32 match fails too


def test_the_fanout_chain_has_a_rule_per_extra_queue_and_a_default():
    rules = fanout_rules(8, 4, False)
    assert rules == [
        '-m u32 --u32 "6&0x1FFF00FF=6,17&&0>>22&0x3C@0>>16&0x3=1" -j NFQUEUE --queue-num 9',
        '-m u32 --u32 "6&0x1FFF00FF=6,17&&0>>22&0x3C@0>>16&0x3=2" -j NFQUEUE --queue-num 10',
        '-m u32 --u32 "6&0x1FFF00FF=6,17&&0>>22&0x3C@0>>16&0x3=3" -j NFQUEUE --queue-num 11',
        "-j NFQUEUE --queue-num 8",
    ]
    assert all(r.endswith("--queue-bypass") for r in fanout_rules(8, 4, True))
    assert fanout_rules(8, 1, False) == ["-j NFQUEUE --queue-num 8"]
    with pytest.raises(ValueError):
        fanout_rules(0, 3, False)


def test_a_migrating_service_jumps_to_the_fanout_chains():
    lines = to_iptables(rules_for("n1", [ECHO], "n1", {"echo"}), 0, queue_count=4)
    assert f'-p tcp --dport 7 -m comment --comment "vip:echo" -j {FANOUT_CHAIN}' in lines
    # the owner's UDP port keeps its fail-open (the service's own socket holds the datagrams)
    assert f'-p udp --dport 7 -m comment --comment "vip:echo" -j {FANOUT_BYPASS_CHAIN}' in lines
    # IPv6: the fan-out's u32 reads an IPv4 header, so ip6tables rules use the first queue
    six = to_iptables(rules_for("n1", [ECHO], "n1", {"echo"}), 0, 6, queue_count=4)
    assert '-p tcp --dport 7 -m comment --comment "vip:echo" -j NFQUEUE --queue-num 0' in six
    one = to_iptables(rules_for("n1", [ECHO], "n1", {"echo"}), 0, queue_count=1)
    assert '-p udp --dport 7 -m comment --comment "vip:echo" -j NFQUEUE --queue-num 0 --queue-bypass' in one


def test_queue_count_config():
    cfg = node_config_from_dict(dict(NODE))
    assert cfg.queue_count == 4 and cfg.queue_nums == range(0, 4)
    assert node_config_from_dict({**NODE, "queue_num": 6, "queue_count": 8}).queue_nums == range(6, 14)
    for bad, needle in ((3, "power of two"), (0, "from 1 to 16"), (32, "from 1 to 16"), (True, "integer")):
        with pytest.raises(ConfigError, match=needle) as e:
            node_config_from_dict({**NODE, "queue_count": bad})
        assert e.value.field == "queue_count"
    with pytest.raises(ConfigError, match="past 65535"):
        node_config_from_dict({**NODE, "queue_num": 65534, "queue_count": 4})


GW = {"vip": VIP, "client_interface": "eth0", "cluster_interface": "eth1", "listen_address": "192.0.2.1",
      "tls_ca": "/ca", "tls_cert": "/c", "tls_key": "/k",
      "nodes": [{"name": "n1", "address": "192.0.2.11", "mac": "02:00:00:00:01:01"}]}


def test_migration_timeouts_in_the_gateway_config():
    from clustercore.config import gateway_config_from_dict
    from clustercore.migration_messages import MigrationTimeouts

    assert gateway_config_from_dict(GW).migration_timeouts == ()
    cfg = gateway_config_from_dict({**GW, "migration_timeouts": {"restoring": 60, "freezing": 2.5}})
    t = MigrationTimeouts(**dict(cfg.migration_timeouts))
    assert (t.restoring, t.freezing, t.releasing) == (60.0, 2.5, MigrationTimeouts().releasing)
    for bad, field in (({"restorin": 5}, "migration_timeouts.restorin"), ({"restoring": 0}, "migration_timeouts.restoring"),
                       ({"restoring": "5"}, "migration_timeouts.restoring"), (5, "migration_timeouts")):
        with pytest.raises(ConfigError) as e:
            gateway_config_from_dict({**GW, "migration_timeouts": bad})
        assert e.value.field == field
