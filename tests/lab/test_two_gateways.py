"""Two gateways (issue 11): keepalived moves the next hops, etcd holds the registry.

A lab of its own with gw1 and gw2 (`vipctl lab up --gateways 2`), echo on n1 and kv on
n2, under live load from the client (vipctl.loadgen: 50 TCP connections, a UDP stream,
kv; exact accounting) plus tests/lab/gapprobe.py, which measures the longest time the
client got no answer. Each failure is injected while the load runs; the oracle is the
migration tests': no TCP message lost or duplicated, no reset, every kv key intact, no
UDP datagram answered twice; and the next migration commits with nothing lost.

UDP datagrams sent while no gateway holds the clients' next hop after a link failure (the
failover gap) are lost on the wire: no transport retransmits them. They are counted and printed, and the
test checks that they are no more than the gap explains (a longer outage would show).
When a gateway daemon dies with its links up, nothing may be lost at all: its kernel
rules keep forwarding until keepalived has moved the addresses. The gap itself is
printed, not asserted (2 shared cores; the target is <= 1.5 s).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.lab.conftest import HERE, LabHandle, unique_prefix
from tests.lab.test_migration import NEXT, assert_exact, finish_load, migrate, owner, start_load, wait_ready
from vipctl import lab as labmod
from vipctl import labha

OTHER = {"gw1": "gw2", "gw2": "gw1"}


@pytest.fixture(scope="module")
def ha(request):
    spec = labmod.Lab(unique_prefix("g"), 3, gateways=2)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        h = LabHandle(spec)
        h.vipctl("service", "add", "echo", "--node", "n1", "--port", "tcp:7", "--port", "udp:7", "--exec", "builtin:echo")
        h.vipctl("service", "add", "kv", "--node", "n2", "--port", "tcp:6379", "--exec", "builtin:kv")
        yield h
    finally:
        for g in labha.GATEWAYS:
            labmod.release_daemon(spec, g)
        labmod.down(spec, log=lambda *a: None)


SPLIT_BRAIN_S = 1.0  # both holding the next hop for longer than a handover takes


def master(h):
    """The gateway that holds the clients' next hop. While VRRP hands it over both hold it
    for a moment (the new master adds it on its first advertisement, the old one removes
    it on receiving that: a full CI run once read both in between); both for longer than
    SPLIT_BRAIN_S is a split brain and fails."""
    deadline = time.monotonic() + SPLIT_BRAIN_S
    while True:
        roles = {g: labha.vrrp_role(h.lab, g) for g in labha.GATEWAYS}
        masters = [g for g, r in roles.items() if r == "master"]
        if len(masters) <= 1:
            return masters[0] if masters else None
        assert time.monotonic() < deadline, roles  # never both, but for a handover
        time.sleep(0.05)


def wait_serving(h, gw, timeout=20):
    """Until `gw` holds the next hops and every node agent is logged in there."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if master(h) == gw:
            try:
                r = h.vipctl("status", "--json", check=False, timeout=10)
                st = json.loads(r.stdout) if r.returncode == 0 else None
                pong = labmod.call("ping", labha.control_socket(h.lab.state_dir, gw), timeout=2.0)
                if st and all(n["state"] == "up" for n in st["nodes"]) and pong["agents"] == h.lab.nodes:
                    return
            except Exception:  # noqa: BLE001 - a gateway in the middle of its move: ask again
                pass
        time.sleep(0.1)
    raise AssertionError(f"{gw} does not serve all nodes after {timeout}s (master: {master(h)})")


def fault(h, name, action):
    r = subprocess.run([sys.executable, "-m", "vipctl", "lab", "fault", name, action, "--prefix", h.lab.prefix],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def start_gap(h, tmp_path, tag, vip=labmod.VIP):
    ready, stop = tmp_path / f"{tag}.gap.ready", tmp_path / f"{tag}.gap.stop"
    p = h.client_popen([sys.executable, os.path.join(HERE, "gapprobe.py"), vip, "7",
                        "--ready-file", str(ready), "--stop-file", str(stop)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_ready(p, ready, 30)
    return p, stop


def assert_exact_but_gap(r, gap):
    """TCP and kv exact, UDP never duplicated; UDP lost only inside the failover gap."""
    assert r["tcp_ok"] == r["tcp_sent"] and r["tcp_bad"] == 0 and r["tcp_missing"] == 0, r
    assert r["resets"] == 0 and r["tcp_errors"] == 0, r
    assert r["udp_duplicated"] == 0 and gap["duplicated"] == 0, (r, gap)
    assert r["kv_bad"] == 0, r
    # the loadgen sends 200 datagrams/s: what it lost fits in the gap the probe saw (+0.5 s)
    assert r["udp_missing"] <= 200 * ((gap["longest_gap_ms"] or 0) / 1000 + 0.5), (r, gap)


def report(what, gap, r):
    line = (f"[two gateways] {what}: client's longest gap {gap['longest_gap_ms']} ms; probe lost "
            f"{gap['missing']}/{gap['sent']}; load: tcp {r['tcp_ok']}/{r['tcp_sent']} ok, resets {r['resets']}, "
            f"udp lost {r['udp_missing']}/{r['udp_sent']} dup {r['udp_duplicated']}, kv bad {r['kv_bad']}, "
            f"max tcp rtt {r['max_rtt_ms']} ms")
    print(line)


def test_lab_lists_both_gateways_one_master(ha):
    st = labmod.status(labmod.Lab(ha.lab.prefix))  # found as a two-gateway lab by its prefix alone
    assert st["healthy"], st
    gws = {g["name"]: g for g in st["gateways"]}
    assert set(gws) == {"gw1", "gw2"} and all(g["alive"] and g["pid"] for g in gws.values()), gws
    assert sorted(g["vrrp"] for g in gws.values()) == ["backup", "master"], gws
    assert {"etcd", "keepalived-gw1", "keepalived-gw2"} <= set(st["daemons"]), st["daemons"]
    r = subprocess.run([sys.executable, "-m", "vipctl", "lab", "status", "--prefix", ha.lab.prefix, "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and {g["name"] for g in json.loads(r.stdout)["gateways"]} == {"gw1", "gw2"}
    # the standby has the master's delivery rules (from the shared table)
    for g in labha.GATEWAYS:
        rules = labmod.exec_in(labha.gw_ns(ha.lab, g), ["nft", "list", "ruleset"], capture_output=True, text=True)
        assert labmod.VIP in rules.stdout and "02:00:00:00:01:03" in rules.stdout, (g, rules.stdout[-500:])


def _failover(h, tmp_path, tag, down):
    up = OTHER[down]
    p, stop = start_load(h, tmp_path, tag, kv=True, duration=120.0)
    g, gstop = start_gap(h, tmp_path, tag)
    try:
        time.sleep(1.0)
        labha.fault(h.lab, down, "down")  # in-process: the moment is known to ~1 ms
        t_down = time.time()
        wait_serving(h, up)
        relogin_s = agents_relogin_s(h, t_down)
        time.sleep(0.5)
        echo = owner(h, "echo")
        rep, _ = migrate(h, "echo", NEXT[echo])  # a migration right after commits, nothing lost
        time.sleep(1.0)
    finally:
        gstop.touch()
        r = finish_load(p, stop)
        gout, gerr = g.communicate(timeout=30)
    gap = json.loads(gout)
    report(f"{down} links down, {up} took over, every agent logged in there {relogin_s:.2f} s after; "
           f"migration {rep['outcome']} lost {rep['lost']}", gap, r)
    assert_exact_but_gap(r, gap)
    assert owner(h, "echo") == NEXT[echo]
    fault(h, down, "up")
    # the one that was down follows the shared table again: the epoch tags it would write
    # are the serving one's (it delivers correctly the moment the address comes back)
    deadline = time.time() + 10
    while epoch_tags(h, down) != epoch_tags(h, up) and time.time() < deadline:
        time.sleep(0.2)
    assert epoch_tags(h, down) == epoch_tags(h, up) and epoch_tags(h, up), (epoch_tags(h, down), epoch_tags(h, up))


def agents_relogin_s(h, since):
    """Seconds from `since` (epoch time) until the last node agent logged in again (from
    the agents' own log lines, local time to the millisecond)."""
    last = since
    for k in range(1, h.lab.nodes + 1):
        with open(os.path.join(h.lab.state_dir, "logs", f"n{k}.log")) as f:
            stamps = [time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
                      for line in f if " login gateway=" in line or "registered with gateway" in line]
        after = [t for t in stamps if t >= since]
        assert after, f"n{k} did not log in again"
        last = max(last, min(after))
    return last - since


def epoch_tags(h, gw):
    """The epoch tags (source MACs 02:76:63:...) in a gateway's delivery rules, by port."""
    rules = labmod.exec_in(labha.gw_ns(h.lab, gw), ["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    return sorted(line.strip() for line in rules.splitlines() if "02:76:63" in line)


def test_master_down_the_other_takes_over_and_migrates(ha, tmp_path):
    first = master(ha)
    assert first is not None
    _failover(ha, tmp_path, "first", first)


def test_first_back_second_down_the_same(ha, tmp_path):
    second = master(ha)
    first = OTHER[second]
    time.sleep(2.0)  # the first is back as backup and follows the table again
    assert master(ha) == second  # nopreempt: coming back does not take the address
    _failover(ha, tmp_path, "second", second)
    time.sleep(1.5)
    assert master(ha) == first


def wait_settled(h, name, timeout=40):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = h.vipctl("status", "--json", check=False, timeout=10)
        if r.returncode == 0:
            svc = next(s for s in json.loads(r.stdout)["services"] if s["name"] == name)
            if not svc["migrating"]:
                return svc
        time.sleep(0.2)
    raise AssertionError(f"the migration of {name} is still open after {timeout}s")


@pytest.mark.parametrize("op, outcome", [("migrate.restore", "rolled_back"), ("migrate.release", "committed"),
                                         ("migrate.commit", "committed")],
                         ids=["before-point-of-no-return", "after-owner-switch", "after-release"])
def test_driver_killed_mid_migration_the_other_ends_it(ha, tmp_path, op, outcome):
    driver = master(ha)
    other = OTHER[driver]
    wait_serving(ha, driver)
    source = owner(ha, "echo")
    dest = NEXT[source]
    p, stop = start_load(ha, tmp_path, f"kill-{op}", kv=True, duration=120.0)
    g, gstop = start_gap(ha, tmp_path, f"kill-{op}")
    try:
        held = os.path.join(ha.lab.state_dir, "held")
        os.makedirs(held, exist_ok=True)
        open(os.path.join(held, driver), "w").close()  # it stays dead: the other must end it
        faults = os.path.join(ha.lab.state_dir, driver, "faults")
        os.makedirs(faults, exist_ok=True)
        with open(os.path.join(faults, op), "w") as f:
            f.write("die")
        _, res = migrate(ha, "echo", dest, check=False)
        assert res.returncode != 0  # its driver died under vipctl
        wait_serving(ha, other)
        svc = wait_settled(ha, "echo")
        time.sleep(1.0)
    finally:
        gstop.touch()
        r = finish_load(p, stop)
        gout, _ = g.communicate(timeout=30)
        labmod.release_daemon(ha.lab, driver)
    gap = json.loads(gout)
    log = open(os.path.join(ha.lab.state_dir, "logs", f"{other}.log")).read()
    report(f"{driver} killed before {op}: {other} ended it {svc['owner'] == dest and 'committed' or 'rolled back'}",
           gap, r)
    assert "taking it over" in log
    # no link failed: the dead gateway's nft rules and forwarding carried the traffic until
    # the addresses moved, so nothing at all may be lost, UDP included
    assert_exact(r)
    assert gap["missing"] == 0 and gap["duplicated"] == 0, gap
    assert svc["owner"] == (dest if outcome == "committed" else source), svc
    assert ha.pyclient("udp-echo", labmod.VIP, 7, 20)["answered_once"] == 20
    # the killed gateway comes back (as backup) and the next migration commits
    deadline = time.time() + 20
    while not (labmod.status(ha.lab)["healthy"]) and time.time() < deadline:
        time.sleep(0.2)
    migrate(ha, "echo", NEXT[svc["owner"]])


def test_etcd_restarted_under_load_service_continues(ha, tmp_path):
    p, stop = start_load(ha, tmp_path, "etcd", kv=True, duration=120.0)
    try:
        time.sleep(1.0)
        old = labmod.daemon_pids(ha.lab)["etcd"]
        os.kill(old, signal.SIGKILL)
        labmod.wait_restarted(ha.lab, "etcd", old, timeout=10)
        time.sleep(3.0)
        rep, _ = migrate(ha, "echo", NEXT[owner(ha, "echo")])
        time.sleep(0.5)
    finally:
        r = finish_load(p, stop)
    print(f"[two gateways] etcd SIGKILLed and restarted: migration after {rep['outcome']}, load {r}")
    assert_exact(r)  # no failover: nothing may be lost, UDP included


def test_driver_killed_and_restarted_mid_migration_finishes_it(ha, tmp_path):
    """The driver dies after the owner switch and its supervisor starts it again at once
    (it may keep the addresses: its track script can miss so short a death). Whichever
    gateway gets both agents and the expired lease finishes the migration: committed."""
    driver = master(ha)
    wait_serving(ha, driver)
    source = owner(ha, "echo")
    dest = NEXT[source]
    old = labmod.daemon_pids(ha.lab)[driver]
    p, stop = start_load(ha, tmp_path, "restart", kv=True, duration=120.0)
    try:
        faults = os.path.join(ha.lab.state_dir, driver, "faults")
        os.makedirs(faults, exist_ok=True)
        with open(os.path.join(faults, "migrate.release"), "w") as f:
            f.write("die")
        _, res = migrate(ha, "echo", dest, check=False)
        assert res.returncode != 0
        labmod.wait_restarted(ha.lab, driver, old, timeout=10)
        svc = wait_settled(ha, "echo")
        time.sleep(1.0)
    finally:
        r = finish_load(p, stop)
    logs = "".join(open(os.path.join(ha.lab.state_dir, "logs", f"{g}.log")).read() for g in labha.GATEWAYS)
    print(f"[two gateways] {driver} killed before migrate.release and restarted: owner {svc['owner']}; load {r}")
    assert "taking it over" in logs
    assert svc["owner"] == dest, svc
    assert_exact(r)
    migrate(ha, "echo", NEXT[dest])


def test_etcd_down_under_load_writes_are_refused_cleanly_service_continues(ha, tmp_path):
    """etcd stopped (held: not restarted) under load: the data plane and the sessions go
    on; a migration and a service add are refused with one line naming etcd, nothing
    changes; once etcd is back the next migration commits."""
    p, stop = start_load(ha, tmp_path, "etcd-down", kv=True, duration=120.0)
    source = owner(ha, "echo")
    try:
        time.sleep(0.5)
        labmod.hold_daemon(ha.lab, "etcd")
        time.sleep(1.0)
        _, res = migrate(ha, "echo", NEXT[source], check=False)
        assert res.returncode == 1 and "etcd" in res.stderr and res.stderr.count("\n") == 1, res.stderr
        res = ha.vipctl("service", "add", "late", "--node", "n3", "--port", "tcp:8", "--exec", "builtin:echo",
                        check=False)
        assert res.returncode == 1 and "etcd" in res.stderr, res.stderr
        time.sleep(1.0)
        old = labmod.daemon_pids(ha.lab)["etcd"]
        labmod.release_daemon(ha.lab, "etcd")
        labmod.wait_restarted(ha.lab, "etcd", old, timeout=10)
        time.sleep(2.0)
        assert owner(ha, "echo") == source
        assert "late" not in [s["name"] for s in json.loads(ha.vipctl("status", "--json").stdout)["services"]]
        rep, _ = migrate(ha, "echo", NEXT[source])
        time.sleep(0.5)
    finally:
        labmod.release_daemon(ha.lab, "etcd")
        r = finish_load(p, stop)
    print(f"[two gateways] etcd down under load: migrate and service add refused ({res.stderr.strip()}); "
          f"after it came back the migration {rep['outcome']}; load lost nothing: tcp {r['tcp_ok']}/{r['tcp_sent']}, "
          f"udp {r['udp_answered_once']}/{r['udp_sent']}")
    assert_exact(r)


def test_dual_stack_two_gateways_fail_over_ipv6_clients(tmp_path):
    """`lab up --gateways 2 --ipv6`: keepalived moves the IPv6 next hops with the IPv4
    ones (one sync group), so IPv6 clients of the VIP6 live through the master's loss as
    IPv4 clients do: TCP exact, no reset, UDP lost only inside the gap, and a migration
    right after commits."""
    from tests.lab.test_health_drain import finish, loadgen
    from vipctl.lab6 import VIP6

    spec = labmod.Lab(unique_prefix("g6"), 3, gateways=2, ipv6=True)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        h = LabHandle(spec)
        h.vipctl("service", "add", "echo", "--node", "n1", "--port", "tcp:7", "--port", "udp:7", "--exec", "builtin:echo")
        down = master(h)
        assert down is not None
        wait_serving(h, down)
        p = loadgen(h, tmp_path, "six", "--conns", 20, "--rate", 20, "--udp-port", 7, "--duration", 8, vip=VIP6)
        g, gstop = start_gap(h, tmp_path, "six", vip=VIP6)
        try:
            time.sleep(1.0)
            labha.fault(h.lab, down, "down")
            wait_serving(h, OTHER[down])
            time.sleep(0.5)
            rep, _ = migrate(h, "echo", "n2")
        finally:
            gstop.touch()
            r = finish(p)
            gout, _ = g.communicate(timeout=30)
        gap = json.loads(gout)
        report(f"IPv6 clients: {down} links down, {OTHER[down]} took over; migration {rep['outcome']}", gap, r)
        assert r["tcp_connected"] == r["tcp_conns"] == 20 and r["tcp_sent"] > 0, r
        r.setdefault("kv_bad", 0)
        assert_exact_but_gap(r, gap)
        assert gap["sent"] > 0 and gap["missing"] < gap["sent"], gap
        assert master(h) == OTHER[down] and owner(h, "echo") == "n2"
    finally:
        for gw in labha.GATEWAYS:
            labmod.release_daemon(spec, gw)
        labmod.down(spec, log=lambda *a: None)


def test_etcd_down_in_the_middle_of_a_migration_ends_it_cleanly(ha, tmp_path):
    """etcd stops while a migration waits at the destination's restore (an armed `wait`
    fault): the driver's next journal write fails. The migration must end, committed or
    rolled back, with the clients' accounting exact and the registry (once etcd is back)
    naming the node that serves; then the next migration commits."""
    source = owner(ha, "echo")
    dest = NEXT[source]
    faults = os.path.join(ha.lab.state_dir, dest, "faults")
    os.makedirs(faults, exist_ok=True)
    p, stop = start_load(ha, tmp_path, "etcd-mid", kv=True, duration=120.0)
    old = labmod.daemon_pids(ha.lab)["etcd"]
    try:
        with open(os.path.join(faults, "migrate.restore"), "w") as f:
            f.write("wait")
        mig = subprocess.Popen([sys.executable, "-m", "vipctl", "--socket", ha.socket, "migrate", "echo", "--to",
                                dest, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        log = os.path.join(ha.lab.state_dir, "logs", f"{dest}.log")
        deadline = time.time() + 20
        while "fault injection at migrate.restore" not in open(log).read() and time.time() < deadline:
            time.sleep(0.05)
        labmod.hold_daemon(ha.lab, "etcd")  # (the fault file is gone: it fires once)
        open(os.path.join(faults, "migrate.restore.go"), "w").close()
        out, err = mig.communicate(timeout=120)
        report = json.loads(out) if out.strip().startswith(b"{") else None
        labmod.release_daemon(ha.lab, "etcd")
        labmod.wait_restarted(ha.lab, "etcd", old, timeout=10)
        svc = wait_settled(ha, "echo")
        time.sleep(1.0)
    finally:
        labmod.release_daemon(ha.lab, "etcd")
        for name in ("migrate.restore", "migrate.restore.go"):
            try:
                os.unlink(os.path.join(faults, name))
            except FileNotFoundError:
                pass
        r = finish_load(p, stop)
    print(f"[two gateways] etcd stopped mid-migration (destination at restore): rc {mig.returncode}, "
          f"outcome {report and report.get('outcome')}, stderr {err.decode().strip()!r}; owner after {svc['owner']}; "
          f"load tcp {r['tcp_ok']}/{r['tcp_sent']}, udp {r['udp_answered_once']}/{r['udp_sent']}, resets {r['resets']}")
    assert report is None or report["outcome"] in ("committed", "rolled_back"), report
    assert err.decode().count("\n") <= 1, err  # a clean one-line error at most
    assert svc["owner"] in (source, dest)
    assert_exact(r)
    serving = [k for k in range(1, ha.lab.nodes + 1)
               if "echo" in next(n for n in ha.status()["nodes"] if n["name"] == f"n{k}").get("processes", {})]
    assert serving == [int(svc["owner"][1:])], (serving, svc)
    # the journal entry the rollback could not close while etcd was down is found open once
    # etcd is back, and a gateway ends it (rolls it back again): until then a new
    # migration is refused as "already being migrated". Then the next one commits.
    deadline, refused = time.time() + 40, 0
    while True:
        rep, res = migrate(ha, "echo", NEXT[svc["owner"]], check=False)
        if res.returncode == 0 or "already being migrated" not in res.stderr or time.time() > deadline:
            break
        refused += 1
        time.sleep(0.5)
    print(f"[two gateways] the next migration: refused {refused} times while the stale journal entry was ended")
    assert rep and rep["outcome"] == "committed" and rep["lost"] == 0, (res.stdout, res.stderr)
