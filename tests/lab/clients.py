"""Test clients run inside the lab's client namespace; each prints one JSON object.

    clients.py tcp-echo HOST PORT MESSAGES     numbered lines over one connection
    clients.py tcp-connections HOST PORT N     N connections, one numbered line echoed on each
    clients.py udp-echo HOST PORT DATAGRAMS    numbered datagrams, answers counted
    clients.py kv HOST PORT KEYS               SET then GET every key
    clients.py tcp-silent HOST PORT            connect: refused (RST), timeout or open?
    clients.py udp-silent HOST PORT            one datagram: any answer?
"""

import json
import socket
import sys
import time


def tcp_echo(host, port, n):
    s = socket.create_connection((host, port), timeout=5)
    f = s.makefile("rwb")
    got = []
    for i in range(n):
        f.write(b"msg %d\n" % i)
        f.flush()
        got.append(f.readline().decode().strip())
    s.close()
    return {"sent": n, "ok": sum(1 for i, g in enumerate(got) if g == f"msg {i}"), "bad": [g for i, g in enumerate(got) if g != f"msg {i}"][:5]}


def tcp_connections(host, port, n):
    ok, bad = 0, []
    for i in range(n):
        with socket.create_connection((host, port), timeout=5) as s:
            f = s.makefile("rwb")
            f.write(b"conn %d\n" % i)
            f.flush()
            got = f.readline().decode().strip()
        ok += got == f"conn {i}"
        if got != f"conn {i}":
            bad.append(got)
    return {"sent": n, "ok": ok, "bad": bad[:5]}


def udp_echo(host, port, n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    answers = {}
    for i in range(n):
        s.sendto(b"dgram %d" % i, (host, port))
        try:
            data, _ = s.recvfrom(2048)
            answers[data] = answers.get(data, 0) + 1
        except socket.timeout:
            pass
    deadline = time.time() + 1.0
    s.settimeout(0.2)
    while time.time() < deadline:  # late or duplicated answers
        try:
            data, _ = s.recvfrom(2048)
            answers[data] = answers.get(data, 0) + 1
        except socket.timeout:
            break
    once = sum(1 for i in range(n) if answers.get(b"dgram %d" % i) == 1)
    dup = sum(1 for v in answers.values() if v > 1)
    return {"sent": n, "answered_once": once, "duplicated": dup}


def kv(host, port, n):
    s = socket.create_connection((host, port), timeout=5)
    f = s.makefile("rwb")
    ok = 0
    for i in range(n):
        f.write(b"SET key%d value%d\n" % (i, i))
        f.flush()
        ok += f.readline() == b"OK\n"
    got = 0
    for i in range(n):
        f.write(b"GET key%d\n" % i)
        f.flush()
        got += f.readline() == b"value%d\n" % i
    f.write(b"GET missing\n")
    f.flush()
    missing = f.readline().decode().strip()
    s.close()
    return {"set_ok": ok, "get_ok": got, "missing": missing}


def tcp_silent(host, port):
    s = socket.socket()
    s.settimeout(2.0)
    try:
        s.connect((host, port))
        return {"result": "open"}
    except ConnectionRefusedError:
        return {"result": "refused"}
    except socket.timeout:
        return {"result": "timeout"}
    except OSError as e:
        return {"result": f"error {e.errno}"}
    finally:
        s.close()


def udp_silent(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))  # connected: an ICMP unreachable would show as ECONNREFUSED
    s.settimeout(1.5)
    s.send(b"anyone?")
    try:
        return {"result": "answered", "data": s.recv(2048).decode(errors="replace")}
    except socket.timeout:
        return {"result": "silent"}
    except ConnectionRefusedError:
        return {"result": "refused"}


def main(argv):
    cmd, host, port = argv[0], argv[1], int(argv[2])
    fn = {"tcp-echo": tcp_echo, "tcp-connections": tcp_connections, "udp-echo": udp_echo, "kv": kv, "tcp-silent": tcp_silent, "udp-silent": udp_silent}[cmd]
    print(json.dumps(fn(host, port, *map(int, argv[3:]))))





def bulk_echo(host, port, nbytes, ready_file, go_file):
    """Fill both directions: send without reading until the kernel stops us, say how much,
    wait for go_file, then read everything back and check it byte for byte."""
    pattern = bytes(range(256)) * 256
    s = socket.create_connection((host, port), timeout=10)
    s.setblocking(False)
    sent = 0
    deadline = time.time() + 10
    stalled_since = None
    while sent < nbytes and time.time() < deadline:
        try:
            chunk = pattern[sent % 256: sent % 256 + 65536]
            n = s.send(chunk[: nbytes - sent])
            sent += n
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.time()
            if time.time() - stalled_since > 1.0:
                break  # both directions are full
            time.sleep(0.01)
    _ready_then_wait(s, sent, ready_file, go_file, deadline + 60)
    # send a little more after the migration, then read all of it back
    tail = b"after-migration" * 100
    s.sendall(tail)
    want_len = sent + len(tail)
    got = bytearray()
    while len(got) < want_len:
        data = s.recv(1 << 20)
        if not data:
            break
        got += data
    s.close()
    expect = bytearray()
    while len(expect) < sent:
        expect += pattern[len(expect) % 256: len(expect) % 256 + 65536][: sent - len(expect)]
    expect += tail
    same = bytes(got) == bytes(expect)
    first_diff = next((i for i in range(min(len(got), len(expect))) if got[i] != expect[i]), None) if not same else None
    return {"sent": sent, "received": len(got), "expected": len(expect), "byte_exact": same, "first_diff": first_diff}


def _ready_then_wait(s, sent, ready_file, go_file, until):
    """Tell the test how much we sent, wait for its go (the migration happened), then
    read blocking."""
    import os
    with open(ready_file, "w") as f:
        f.write(str(sent))
    while not os.path.exists(go_file) and time.time() < until:
        time.sleep(0.02)
    s.setblocking(True)
    s.settimeout(10)


def half_closed(host, port, nbytes, ready_file, go_file):
    """Send a lot without reading, then shut our side (FIN): the server stays CLOSE_WAIT
    while it still owes us data. After go_file, read everything; it must be byte-exact and
    end with a clean EOF (no reset)."""
    payload = bytes(range(256)) * (nbytes // 256)
    s = socket.create_connection((host, port), timeout=10)
    s.setblocking(False)
    sent = 0
    deadline = time.time() + 10
    while sent < len(payload) and time.time() < deadline:
        try:
            sent += s.send(payload[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
            if time.time() > deadline - 8:
                break
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.5)  # let the FIN reach the server: it is CLOSE_WAIT while it owes us data
    _ready_then_wait(s, sent, ready_file, go_file, deadline + 60)
    got = bytearray()
    reset = False
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += data
    except ConnectionResetError:
        reset = True
    s.close()
    return {"sent": sent, "received": len(got), "byte_exact": bytes(got) == payload[:sent], "reset": reset}


def _main2(argv):  # noqa: E302
    if argv and argv[0] == "half-closed":
        print(json.dumps(half_closed(argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5])))
        return True
    if argv and argv[0] == "bulk-echo":
        print(json.dumps(bulk_echo(argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5])))
        return True
    return False


if __name__ == "__main__":
    if not _main2(sys.argv[1:]):
        main(sys.argv[1:])
