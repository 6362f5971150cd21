"""scripts/ack-delays: each client request's wait for the server's acknowledgement, and the
client's retransmissions, from a capture (built here with dpkt, as tcpdump writes it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import dpkt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "ack-delays")
CLIENT, VIP = "198.51.100.2", "203.0.113.10"


def _frame(src, dst, sport, dport, seq, ack, data=b"", flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH) -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, data=data)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=dpkt.ip.IP_PROTO_TCP, data=tcp)
    ip.len = len(bytes(ip))
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def _capture(path, packets):
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f)
        for ts, frame in packets:
            w.writepkt(frame, ts=ts)


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_a_request_held_past_the_probe_shows_its_wait_and_its_retransmission(tmp_path):
    t = 1_800_000_000.0
    cap = str(tmp_path / "move.pcap")
    _capture(cap, [
        (t, b"\x00" * 20),  # something not Ethernet/IP first: times still count from it
        (t + 0.100, _frame(CLIENT, VIP, 40000, 7, 1000, 5000, b"c0 m0\n")),
        (t + 0.1002, _frame(VIP, CLIENT, 7, 40000, 5000, 1006)),  # acknowledged at once
        (t + 0.110, _frame(CLIENT, VIP, 40001, 7, 2000, 6000, b"c1 m0\n")),  # held...
        (t + 0.315, _frame(CLIENT, VIP, 40001, 7, 2000, 6000, b"c1 m0\n")),  # ...its loss probe
        (t + 0.360, _frame(VIP, CLIENT, 7, 40001, 6000, 2006)),  # released: acknowledged
        (t + 0.400, _frame(CLIENT, VIP, 40002, 7, 3000, 7000, b"c2 m0\n")),  # never acknowledged
    ])
    done = _run(cap, "--json", "--bin", "50")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows[0] == {"from_s": 0.1, "requests": 2, "ack_ms_min": 0.2, "ack_ms_max": 250.0, "retransmitted": 1,
                       "acked_from_s": 0.1002, "acked_to_s": 0.36}
    assert rows[1] == {"unacknowledged": 1}
    # a window: only what was sent in it
    rows = json.loads(_run(cap, "--json", "--from", "0.105", "--to", "0.2").stdout)
    assert [r["requests"] for r in rows if "requests" in r] == [1]


def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path):
    bad = tmp_path / "not.pcap"
    bad.write_bytes(b"hello, this is not a capture")
    done = _run(str(bad))
    assert done.returncode != 0 and "not a pcap capture" in done.stderr and len(done.stderr.splitlines()) == 1
    done = _run(str(tmp_path / "missing.pcap"))
    assert done.returncode == 1 and "No such file" in done.stderr
    assert _run(str(bad), "--port", "0").returncode == 2


def test_a_capture_cut_inside_a_record_is_counted_up_to_there(tmp_path):
    t = 1_800_000_000.0
    cap = tmp_path / "cut.pcap"
    _capture(str(cap), [(t, _frame(CLIENT, VIP, 40000, 7, 1000, 5000, b"c0 m0\n")),
                        (t + 0.01, _frame(VIP, CLIENT, 7, 40000, 5000, 1006))])
    cap.write_bytes(cap.read_bytes() + b"\x01\x02\x03\x04\x05")  # tcpdump killed mid-write
    done = _run(str(cap), "--json")
    assert done.returncode == 0 and "ends inside a record" in done.stderr
    assert json.loads(done.stdout)[0]["requests"] == 1
