"""The foundation, end to end in real namespaces with real daemons and real clients."""

import os
import signal
import subprocess
import time

import dpkt
import pytest

from clustercore.oracle import check_counts
from vipctl.lab import VIP


@pytest.fixture(scope="module")
def services(lab):
    lab.vipctl("service", "add", "echo", "--node", "n1", "--port", "tcp:7", "--port", "udp:7", "--exec", "builtin:echo")
    lab.vipctl("service", "add", "kv", "--node", "n2", "--port", "tcp:6379", "--exec", "builtin:kv")
    lab.vipctl("service", "add", "dgram", "--node", "n3", "--port", "udp:9", "--exec", "builtin:echo")
    yield lab
    for name in ("echo", "kv", "dgram"):
        lab.vipctl("service", "remove", name, check=False)


def test_all_nodes_up_and_services_listed(services):
    st = services.status()
    assert [n["state"] for n in st["nodes"]] == ["up", "up", "up"]
    owners = {s["name"]: s["owner"] for s in st["services"]}
    assert owners == {"dgram": "n3", "echo": "n1", "kv": "n2"}


def test_nc_reaches_echo_over_tcp_and_udp(services):
    r = services.client(["nc", "-q", "1", "-w", "3", VIP, "7"], input=b"hello over tcp\n")
    assert r.stdout == b"hello over tcp\n"
    r = services.client(["nc", "-u", "-w", "1", VIP, "7"], input=b"hello over udp\n")
    assert r.stdout == b"hello over udp\n"


def test_nc_reaches_kv(services):
    r = services.client(["nc", "-q", "1", "-w", "3", VIP, "6379"], input=b"SET color blue\nGET color\nGET nothing\n")
    assert r.stdout == b"OK\nblue\nNONE\n"


def test_python_clients_reach_echo_and_kv(services):
    r = services.pyclient("tcp-echo", VIP, 7, 200)
    assert r["ok"] == 200, r
    r = services.pyclient("udp-echo", VIP, 7, 200)
    assert r["answered_once"] == 200 and r["duplicated"] == 0, r
    r = services.pyclient("kv", VIP, 6379, 100)
    assert r == {"set_ok": 100, "get_ok": 100, "missing": "NONE"}


def test_only_the_owner_accepts_each_datagram_exactly_once(services):
    before, _ = services.counters("dgram")
    r = services.pyclient("udp-echo", VIP, 9, 300)
    assert r["answered_once"] == 300, r
    after, svc = services.counters("dgram")
    delta = {n: after.get(n, 0) - before.get(n, 0) for n in after}
    report = check_counts(300, delta, owner="n3")
    assert report.ok, report.explain()
    assert delta == {"n1": 0, "n2": 0, "n3": 300}
    # the non-owners saw every datagram too (broadcast delivery) and dropped it
    assert all(svc["counters"][n]["dropped"] >= 300 for n in ("n1", "n2"))


def _capture(services, path, filt):
    # --immediate-mode: without it libpcap's ring hands packets over a block at a time (up
    # to a second late), and a SIGINT can end tcpdump before the last block is written
    p = services.client_popen(["tcpdump", "-i", "eth0", "-nn", "-U", "--immediate-mode", "-w", path, filt],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait until tcpdump says it is listening
    deadline = time.time() + 10
    line = b""
    while time.time() < deadline and b"listening" not in line:
        line = p.stderr.readline()
    return p


def _read_pcap(path):
    out = []
    with open(path, "rb") as f:
        try:
            for _, buf in dpkt.pcap.Reader(f):
                ip = dpkt.ethernet.Ethernet(buf).data
                if isinstance(ip, dpkt.ip.IP):
                    src = ".".join(map(str, ip.src))
                    kind = "icmp" if isinstance(ip.data, dpkt.icmp.ICMP) else "rst"
                    out.append((src, kind))
        except dpkt.NeedData:
            pass
    return out


def test_client_never_sees_rst_or_icmp_from_the_vip(services, tmp_path):
    path = str(tmp_path / "rst.pcap")
    os.chmod(tmp_path, 0o777)
    cap = _capture(services, path, "(tcp[tcpflags] & tcp-rst != 0) or icmp")
    try:
        services.pyclient("tcp-echo", VIP, 7, 50)
        services.pyclient("udp-echo", VIP, 7, 50)
        services.pyclient("kv", VIP, 6379, 20)
        services.pyclient("udp-echo", VIP, 9, 50)
        services.client(["nc", "-q", "1", "-w", "3", VIP, "7"], input=b"x\n")
        # prove the capture can see an RST: the gateway's own address has no port 1
        assert services.pyclient("tcp-silent", "198.51.100.1", 1)["result"] == "refused"
        time.sleep(0.5)
    finally:
        cap.send_signal(signal.SIGINT)
        cap.wait(10)
    seen = _read_pcap(path)
    assert ("198.51.100.1", "rst") in seen, f"capture did not work: {seen}"
    from_vip = [s for s in seen if s[0] == VIP]
    assert from_vip == [], f"the client saw RST/ICMP from the VIP: {from_vip}"


def test_removed_service_is_silent(lab):
    lab.vipctl("service", "add", "temp", "--node", "n2", "--port", "tcp:8080", "--port", "udp:8080", "--exec", "builtin:echo")
    assert lab.pyclient("udp-echo", VIP, 8080, 5)["answered_once"] == 5
    lab.vipctl("service", "remove", "temp")
    assert "temp" not in lab.vipctl("service", "list").stdout
    # nothing answers, nobody refuses: no RST, no ICMP port unreachable, on any node
    assert lab.pyclient("tcp-silent", VIP, 8080)["result"] == "timeout"
    assert lab.pyclient("udp-silent", VIP, 8080)["result"] == "silent"
    st = lab.status()
    for n in st["nodes"]:
        assert "temp" not in n["processes"]
