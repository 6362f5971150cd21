"""Reading captures: empty, truncated and corrupt files give one clear error naming the
file and the byte offset; frames that are not IPv4/IPv6 to the VIP are counted and
skipped, never a crash; sessions are rebuilt by sequence number."""

import json
import struct
import subprocess
import sys

import dpkt
import pytest
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1Q, Ether, IPv6, raw
from scapy.layers.l2 import CookedLinux

from clustercore.capture import (Frame, classify, packet_digest, parse_migrate_spec, parse_service_spec,
                                 sidecar_from_dict)
from clustercore.errors import CaptureError, ConfigError
from clustercore.packet import UDP as P_UDP
from clustercore.sessions import rebuild
from vipctl import replay as rp
from vipctl.pcapio import read_frames, write_pcapng

from .conftest import ROOT, capture

VIP, CLIENT = "203.0.113.10", "198.51.100.2"


def write_pcap(path, packets, linktype=1, snaplen=65535):
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=snaplen, linktype=linktype)
        for i, p in enumerate(packets):
            w.writepkt(p, ts=1000.0 + i * 0.01)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vipctl", "replay", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def one_error(r, *words):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vipctl: capture "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------- broken files


def test_empty_capture(tmp_path):
    p = tmp_path / "empty.pcap"
    p.write_bytes(b"")
    with pytest.raises(CaptureError) as e:
        read_frames(str(p))
    assert e.value.offset == 0 and str(p) in str(e.value) and "empty" in str(e.value)
    one_error(cli(str(p), "--service", "e=udp:7@n1"), str(p), "offset 0", "empty")


def test_missing_and_directory(tmp_path):
    one_error(cli(str(tmp_path / "nope.pcap"), "--service", "e=udp:7@n1"), "no such file")
    one_error(cli(str(tmp_path), "--service", "e=udp:7@n1"), "directory")


def test_not_a_capture(tmp_path):
    p = tmp_path / "text.pcap"
    p.write_bytes(b"this is not a capture at all, just text\n")
    one_error(cli(str(p), "--service", "e=udp:7@n1"), "offset 0", "magic")


def test_truncated_file_header(tmp_path):
    src = open(capture("echo-tcp"), "rb").read()
    p = tmp_path / "head.pcap"
    p.write_bytes(src[:10])
    one_error(cli(str(p), "--service", "e=udp:7@n1"), "offset 10", "truncated file header")


@pytest.mark.parametrize("cut", ["in-record-header", "in-packet"])
def test_truncated_capture_names_the_record_offset(tmp_path, cut):
    path = capture("echo-tcp")
    frames, _ = read_frames(path)
    src = open(path, "rb").read()
    victim = frames[20]
    end = victim.offset + (8 if cut == "in-record-header" else 16 + len(victim.data) // 2)
    p = tmp_path / "cut.pcap"
    p.write_bytes(src[:end])
    with pytest.raises(CaptureError) as e:
        read_frames(str(p))
    assert e.value.offset == victim.offset and e.value.path == str(p)
    assert "after 20 frames" in str(e.value)
    one_error(cli(str(p), "--service", "e=tcp:7@n1"), f"offset {victim.offset}", "truncated")


def test_corrupt_record_header(tmp_path):
    path = capture("kv")
    frames, _ = read_frames(path)
    data = bytearray(open(path, "rb").read())
    victim = frames[5]
    struct.pack_into("<I", data, victim.offset + 8, 0x7FFFFFF0)  # caplen: 2 GB
    p = tmp_path / "corrupt.pcap"
    p.write_bytes(bytes(data))
    one_error(cli(str(p), "--service", "kv=tcp:6379@n1"), f"offset {victim.offset}", "corrupt record header")


def test_pcapng_truncated_and_corrupt_blocks(tmp_path):
    path = capture("udp-echo")
    assert path.endswith(".pcapng")
    frames, fmt = read_frames(path)
    assert fmt == "pcapng" and len(frames) > 20
    src = open(path, "rb").read()
    p = tmp_path / "cut.pcapng"
    p.write_bytes(src[:frames[10].offset + 20])
    with pytest.raises(CaptureError) as e:
        read_frames(str(p))
    assert e.value.offset == frames[10].offset and "truncated block" in str(e.value)
    bad = bytearray(src)
    struct.pack_into("<I", bad, frames[3].offset + 4, 13)  # a block length that is not a multiple of 4
    p2 = tmp_path / "corrupt.pcapng"
    p2.write_bytes(bytes(bad))
    one_error(cli(str(p2), "--service", "e=udp:7@n1"), f"offset {frames[3].offset}", "corrupt block")


def test_pcapng_round_trip_keeps_frames(tmp_path):
    frames, _ = read_frames(capture("kv"))
    write_pcapng(str(tmp_path / "kv.pcapng"), frames, frames[0].linktype)
    again, fmt = read_frames(str(tmp_path / "kv.pcapng"))
    assert fmt == "pcapng" and [f.data for f in again] == [f.data for f in frames]
    assert [round(f.ts, 6) for f in again] == [round(f.ts, 6) for f in frames]


# ---------------------------------------------------------------- frames that are not for the VIP


def test_only_non_vip_traffic():
    r = rp.run_pure(rp.load(capture("non-vip")), ["n1", "n2", "n3"], [], [])
    assert r["ok"] and r["vip_packets"] == 0 and r["skipped"] == r["packets"] > 0
    assert r["skipped_reasons"].get("arp", 0) >= 1
    assert r["sessions_total"] == 0 and r["per_node"] == {"n1": 0, "n2": 0, "n3": 0}


def test_every_kind_of_frame_is_counted_never_raised_on(tmp_path):
    to_vip = IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=7) / b"hello"
    frames = [
        Ether() / ARP(pdst=CLIENT),
        Ether() / IPv6(dst="ff02::1") / ICMP(),
        Ether() / IP(src=CLIENT, dst="198.51.100.1") / UDP(dport=9),
        Ether() / Dot1Q(vlan=5) / to_vip,
        Ether(type=0x88CC) / b"lldp-ish",
        Ether() / IP(src=VIP, dst=CLIENT) / UDP(sport=7, dport=5000),
        Ether() / to_vip,
    ]
    data = [raw(f) for f in frames] + [b"\x01\x02", raw(Ether(type=0x0800)) + b"\x45\x00"]  # runts
    p = tmp_path / "kinds.pcap"
    write_pcap(str(p), data)
    lo = rp.load(str(p))
    assert len(lo.capture.to_vip) == 2  # plain and VLAN-tagged
    assert lo.capture.skipped == {"arp": 1, "ipv6 to another address": 1, "ipv4 to another address": 1,
                                  "not ip": 1, "from the vip (replies)": 1, "too short to be ip": 2}
    r = rp.run_pure(lo, ["n1", "n2"], [parse_service_spec("e=udp:7@n2")], [])
    assert r["ok"] and r["per_node"] == {"n1": 0, "n2": 2}
    # the same packets behind other link types
    sll = tmp_path / "sll.pcap"
    write_pcap(str(sll), [raw(CookedLinux(proto=0x0800) / to_vip)], linktype=113)
    raw_ip = tmp_path / "raw.pcap"
    write_pcap(str(raw_ip), [raw(to_vip)], linktype=101)
    odd = tmp_path / "odd.pcap"
    write_pcap(str(odd), [raw(to_vip)], linktype=147)
    assert len(rp.load(str(sll)).capture.to_vip) == 1
    assert len(rp.load(str(raw_ip)).capture.to_vip) == 1
    assert rp.load(str(odd)).capture.skipped == {"unsupported link type": 1}


def test_garbage_to_the_vip_is_delivered_and_dropped_everywhere():
    bad = bytearray(raw(IP(src=CLIENT, dst=VIP) / TCP(dport=7)))
    bad[32] = 0x10  # TCP data offset below 5 words: unreadable
    cap = classify([Frame(0, 0.0, 101, bytes(bad), len(bad))], VIP)
    assert len(cap.to_vip) == 1 and cap.to_vip[0].packet is None
    from clustercore.sim import Cluster
    r = Cluster(["n1", "n2"], [parse_service_spec("e=tcp:7@n1")]).run([(0, bytes(bad), 0.0)])
    assert r.ok and r.silenced == 1 and r.report.packets == 0


def test_snaplen_cut_packets_are_judged_but_not_rebuilt(tmp_path):
    pkts = [IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=7, flags="S", seq=100),
            IP(src=VIP, dst=CLIENT) / TCP(sport=7, dport=40000, flags="SA", seq=500, ack=101),
            IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=7, flags="PA", seq=101, ack=501) / (b"x" * 500)]
    p = tmp_path / "snap.pcap"
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 96, 101)  # pcap header, snaplen 96, raw IP
    for i, pk in enumerate(pkts):
        b = raw(pk)
        data += struct.pack("<IIII", 1 + i, 0, min(96, len(b)), len(b)) + b[:96]
    p.write_bytes(data)
    lo = rp.load(str(p))
    assert [x.truncated for x in lo.capture.to_vip] == [False, True]
    assert lo.tcp[0].complete is False  # its bytes have a hole: not replayable
    r = rp.run_pure(lo, ["n1"], [parse_service_spec("e=tcp:7@n1")], [])
    assert r["ok"] and r["accepted_once"] == 2 and r["sessions_incomplete"] == 1


# ---------------------------------------------------------------- sessions


def test_tcp_streams_survive_retransmission_overlap_and_reordering():
    c, s = 1000, 5000
    seg = lambda seq, data, flags="PA": IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=7, flags=flags, seq=seq) / data
    ans = lambda seq, data, flags="PA": IP(src=VIP, dst=CLIENT) / TCP(sport=7, dport=40000, flags=flags, seq=seq) / data
    pkts = [IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=7, flags="S", seq=c),
            IP(src=VIP, dst=CLIENT) / TCP(sport=7, dport=40000, flags="SA", seq=s, ack=c + 1),
            seg(c + 1, b"hello "), seg(c + 7, b"world\n"), seg(c + 1, b"hello "),  # retransmission
            ans(s + 1, b"HELLO "), ans(s + 7, b"WORLD\n"),
            seg(c + 19, b"third\n"), seg(c + 13, b"second"),  # out of order
            ans(s + 13, b"SECOND"), ans(s + 19, b"THIRD\n"), ans(s + 16, b"OND"),  # overlap
            seg(c + 25, b"", "FA"), ans(s + 25, b"", "FA")]
    frames = [Frame(i, float(i), 101, raw(p), len(raw(p))) for i, p in enumerate(pkts)]
    tcp, udp = rebuild(classify(frames, VIP))
    assert udp == [] and len(tcp) == 1
    t = tcp[0]
    assert t.complete and t.answered and t.closed and t.server_closed and t.close_index == 12
    assert [(bytes(x.send), bytes(x.expect)) for x in t.turns] == [
        (b"hello world\n", b"HELLO WORLD\n"), (b"second" + b"third\n", b"SECONDTHIRD\n")]
    assert t.turns[1].index == 8  # the turn starts where its bytes became contiguous


def test_udp_exchanges_keep_identical_datagrams_apart():
    d = IP(src=CLIENT, dst=VIP, id=0, flags="DF") / UDP(sport=6000, dport=7) / b"same"
    a = IP(src=VIP, dst=CLIENT) / UDP(sport=7, dport=6000) / b"same"
    frames = [Frame(i, float(i), 101, raw(p), len(raw(p))) for i, p in enumerate([d, d, a, d, a, a])]
    _, udp = rebuild(classify(frames, VIP))
    assert len(udp) == 1 and [i for i, _, _ in udp[0].sends] == [0, 1, 3] and len(udp[0].answers) == 3
    assert packet_digest(raw(d)) == packet_digest(raw(d.copy()))
    routed = d.copy()
    routed.ttl = 12
    assert packet_digest(raw(routed)) == packet_digest(raw(d))  # TTL and checksum do not count


# ---------------------------------------------------------------- specs and sidecars


@pytest.mark.parametrize("spec", ["echo", "echo=tcp:7", "=tcp:7@n1", "e=@n1", "e=tcp:70000@n1", "e=sctp:7@n1",
                                  "e=tcp:7,tcp:7@n1"])
def test_bad_service_specs(spec):
    with pytest.raises(ConfigError) as e:
        parse_service_spec(spec)
    assert "--service" in str(e.value)


def test_service_spec():
    s = parse_service_spec("echo=tcp:7,udp:7@n2")
    assert (s.name, s.owner, s.ports) == ("echo", "n2", ((6, 7), (P_UDP, 7)))
    m = parse_migrate_spec("echo:n3@120")
    assert (m.service, m.dest, m.index) == ("echo", "n3", 120)
    for bad in ("echo:n3", "echo@12", "echo:n3@x", ":n3@1", "echo:@1"):
        with pytest.raises(ConfigError):
            parse_migrate_spec(bad)


@pytest.mark.parametrize("doc, field", [
    ([], "(top level)"), ({"nodes": 0}, "nodes"), ({"nodes": True}, "nodes"), ({"vip": "nope"}, "vip"),
    ({"services": [{"name": "e"}]}, "services[0]"),
    ({"services": [{"name": "e", "owner": "n1", "ports": ["tcp:x"]}]}, "services[0].ports"),
    ({"services": [{"name": "e", "owner": "n9", "ports": ["tcp:7"]}]}, "services"),
    ({"migrations": [{"service": "e", "to": "n2"}]}, "migrations[0]"), ({"covers": [1]}, "covers"),
])
def test_bad_sidecars_name_the_field(doc, field):
    with pytest.raises(ConfigError) as e:
        sidecar_from_dict(doc, "x.json")
    assert e.value.field == field and "x.json" in str(e.value)


def test_a_capture_without_a_sidecar_needs_services(tmp_path):
    p = tmp_path / "bare.pcap"
    p.write_bytes(open(capture("echo-tcp"), "rb").read())
    r = cli(str(p))
    assert r.returncode == 1 and "--service" in r.stderr and "sidecar" in r.stderr
    r = cli(str(p), "--service", "echo=tcp:7@n3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["per_node"]["n3"] == 45
    (tmp_path / "bare.json").write_text("{not json")
    r = cli(str(p))
    assert r.returncode == 1 and "bare.json" in r.stderr and "not valid JSON" in r.stderr
