"""Daemons die; the data plane and migrations do not (issue 10, points 3-5).

Under live load from the client (vipctl.loadgen: TCP connections, a UDP stream, kv;
exact accounting), daemons are SIGKILLed or SIGTERMed outside and inside migrations, and
the registry is made read-only mid-migration. The lab's supervisor restarts each daemon
within a second (systemd's Restart=always). The oracle: no client sees a reset, a lost or
a duplicated message, every key is intact, every migration ends committed or rolled back
and the registry's owner is where the service really runs.
"""

import os
import signal
import sys
import time

import pytest

from clustercore.config import node_config_from_dict, parse_toml
from clustercore.kinds import Delivery
from tests.lab.conftest import lab_with_services
from tests.lab.test_migration import NEXT, assert_exact, finish_load, migrate, owner, start_load
from vipctl import lab as labmod


@pytest.fixture(scope="module")
def slab():
    with lab_with_services("s", delivery=Delivery.SELECTIVE) as h:
        yield h


def pids(h):
    return labmod.daemon_pids(h.lab)


def service_pid(h, name):
    st = h.status()
    node = owner(h, name)
    return next(n for n in st["nodes"] if n["name"] == node)["processes"][name]["pid"]


def kill(h, daemon, sig=signal.SIGKILL, wait=True):
    """Kill one daemon; the supervisor restarts it. Returns the new pid (once serving)."""
    old = pids(h)[daemon]
    os.kill(old, sig)
    if not wait:
        return None
    return labmod.restart_daemon.__wrapped__(h.lab, daemon, old) if hasattr(labmod.restart_daemon, "__wrapped__") \
        else _wait_back(h, daemon, old)


def _wait_back(h, daemon, old):
    new = labmod.wait_restarted(h.lab, daemon, old, timeout=5.0)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            st = h.status()
            if all(n["state"] == "up" for n in st["nodes"]):
                return new
        except AssertionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{daemon} did not come back")


@pytest.mark.parametrize("daemon, sig", [("owner", signal.SIGKILL), ("owner", signal.SIGTERM),
                                         ("other", signal.SIGKILL), ("gateway", signal.SIGKILL),
                                         ("gateway", signal.SIGTERM)],
                         ids=["owner-agent-kill", "owner-agent-term", "other-agent-kill",
                              "gateway-kill", "gateway-term"])
def test_daemon_death_outside_migrations_is_invisible(slab, tmp_path, daemon, sig):
    echo_owner = owner(slab, "echo")
    target = {"owner": echo_owner, "other": NEXT[echo_owner], "gateway": "gateway"}[daemon]
    before = {name: service_pid(slab, name) for name in ("echo", "kv")}
    p, stop = start_load(slab, tmp_path, f"out-{daemon}")
    try:
        time.sleep(1.0)
        started = time.monotonic()
        kill(slab, target, sig)
        restart_s = time.monotonic() - started
        time.sleep(1.0)
    finally:
        r = finish_load(p, stop)
    assert_exact(r)
    assert restart_s < 10, restart_s
    # nothing was restarted: the same service processes serve, adopted by the new agent
    assert {name: service_pid(slab, name) for name in ("echo", "kv")} == before
    assert owner(slab, "echo") == echo_owner
    # and the adopted service still migrates (the new agent took its sockets back)
    migrate(slab, "echo", NEXT[echo_owner])


def gateway_fault(h, name, what):
    d = os.path.join(h.lab.state_dir, "gateway", "faults")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        f.write(what)


def wait_settled(h, name, timeout=40):
    """Until no migration of `name` is open (a restarted gateway finished or rolled it back)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            svc = next(s for s in h.status()["services"] if s["name"] == name)
            if not svc["migrating"]:
                return svc
        except AssertionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the migration of {name} is still open after {timeout}s")


def serves_once(h, name):
    """The service answers through the VIP, from exactly one node."""
    assert h.pyclient("udp-echo", labmod.VIP, 7, 20)["answered_once"] == 20


def instances(h, name):
    """The lab's processes of service `name` (started by one of its agents: their
    NOTIFY_SOCKET is under the lab's state directory), on every node."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if (env.get(b"VIPCLUSTER_SERVICE") == name.encode()
                and env.get(b"NOTIFY_SOCKET", b"").startswith(h.lab.state_dir.encode())):
            out.append(int(pid))
    return out


def one_instance(h, name, timeout=5.0):
    """Exactly one process of the service is left (a whole handoff's standby whose agent
    died exits on its own: its channel closed before anything came)."""
    deadline = time.time() + timeout
    while len(found := instances(h, name)) != 1 and time.time() < deadline:
        time.sleep(0.1)
    assert len(found) == 1, found


# (the step the gateway dies just before, which side of the point of no return, outcome)
GATEWAY_STEPS = [
    ("migrate.prepare", "rolled_back"),  # journaled, nothing asked of any node yet
    ("migrate.arm", "rolled_back"),      # dest prepared and holding
    ("migrate.freeze", "rolled_back"),   # source armed (counting)
    ("migrate.restore", "rolled_back"),  # source frozen, its sockets dumped
    ("migrate.release", "committed"),    # owner switched and release journaled: past the point
    ("migrate.commit", "committed"),     # destination released, source still frozen
]


@pytest.mark.parametrize("op, outcome", GATEWAY_STEPS, ids=[o.split(".")[1] for o, _ in GATEWAY_STEPS])
def test_gateway_killed_during_a_migration_step(slab, tmp_path, op, outcome):
    source = owner(slab, "echo")
    destination = NEXT[source]
    p, stop = start_load(slab, tmp_path, f"gw-{op}", kv=True)
    try:
        old = pids(slab)["gateway"]
        gateway_fault(slab, op, "die")
        report, res = migrate(slab, "echo", destination, check=False)
        assert res.returncode != 0  # the gateway died under vipctl
        labmod.wait_restarted(slab.lab, "gateway", old, timeout=5.0)
        svc = wait_settled(slab, "echo")
        time.sleep(1.0)
    finally:
        r = finish_load(p, stop)
    assert_exact(r)
    assert svc["owner"] == (destination if outcome == "committed" else source), svc
    serves_once(slab, "echo")
    # and the next migration works
    migrate(slab, "echo", NEXT[svc["owner"]])


# Steps the gateway sends only on some paths (not in GATEWAY_STEPS: the soak picks from
# that list, with neither the connections nor the failure these need):
# (step, what brings it about, outcome)
MANY_CONNS = 300  # more than one chunk (clustercore.handoff.CHUNK = 256): the dump is streamed
GATEWAY_PATH_STEPS = [
    ("migrate.chunk", "many connections", "rolled_back"),  # relayed during the source's freeze
    ("migrate.abort", "restore fails", "rolled_back"),     # the destination refuses its restore
    ("migrate.rollback", "restore fails", "rolled_back"),  # the abort went out, the rollback not
]


@pytest.mark.parametrize("op, how, outcome", GATEWAY_PATH_STEPS, ids=[o.split(".")[1] for o, _, _ in GATEWAY_PATH_STEPS])
def test_gateway_killed_at_a_step_of_some_paths(slab, tmp_path, op, how, outcome):
    source = owner(slab, "echo")
    destination = NEXT[source]
    conns = MANY_CONNS if how == "many connections" else 50
    armed = os.path.join(slab.lab.state_dir, "gateway", "faults", op)
    p, stop = start_load(slab, tmp_path, f"gwp-{op}", conns=conns, kv=True)
    try:
        old = pids(slab)["gateway"]
        if how == "restore fails":
            agent_fault(slab, destination, "migrate.restore", "fail")
        gateway_fault(slab, op, "die")
        report, res = migrate(slab, "echo", destination, check=False)
        assert res.returncode != 0  # the gateway died under vipctl
        assert not os.path.exists(armed), f"the gateway never reached {op}"
        labmod.wait_restarted(slab.lab, "gateway", old, timeout=5.0)
        svc = wait_settled(slab, "echo")
        time.sleep(1.0)
    finally:
        clear_agent_fault(slab, destination, "migrate.restore")
        if os.path.exists(armed):
            os.unlink(armed)
        r = finish_load(p, stop)
    print(f"gateway killed before {op} ({how}, {conns} connections): {svc['owner']}; "
          f"{r['tcp_sent']} TCP messages, {r['udp_sent']} datagrams")
    assert r["tcp_connected"] == conns, r
    assert_exact(r)
    assert svc["owner"] == (destination if outcome == "committed" else source), svc
    serves_once(slab, "echo")
    one_instance(slab, "echo")
    migrate(slab, "echo", NEXT[svc["owner"]])


def test_registry_read_only_during_a_migration_rolls_back_and_serves(slab, tmp_path):
    source = owner(slab, "echo")
    p, stop = start_load(slab, tmp_path, "ro")
    try:
        time.sleep(0.5)
        gateway_fault(slab, "registry", "readonly")
        report, res = migrate(slab, "echo", NEXT[source], check=False)
        assert res.returncode == 1, res.stdout
        assert report is None or report["outcome"] == "rolled_back", report
        assert "registry" in (res.stdout + res.stderr), (res.stdout, res.stderr)
        time.sleep(1.0)
    finally:
        os.unlink(os.path.join(slab.lab.state_dir, "gateway", "faults", "registry"))
        r = finish_load(p, stop)
    assert_exact(r)
    assert owner(slab, "echo") == source
    serves_once(slab, "echo")
    migrate(slab, "echo", NEXT[source])


def agent_fault(h, node, op, what="die"):
    d = os.path.join(h.lab.state_dir, node, "faults")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, op), "w") as f:
        f.write(what)


def clear_agent_fault(h, node, op):
    try:
        os.unlink(os.path.join(h.lab.state_dir, node, "faults", op))
    except FileNotFoundError:
        pass


# After the handoff moved to the systemd fd store (the new instance starts at the
# release) an agent dying right after a release took that instance with it: the builtin
# said READY=1 to a NOTIFY_SOCKET nobody listened on any more and died of the error. An
# sd_notify failure is now never fatal (nodeshim.builtins.notify, as sd_notify(3)); the
# cases below cover it (they failed with ECONNREFUSED at the clients before).

# (whose agent dies, at which step it receives, the outcome)
# A service with a role on the node (an armed or frozen source; a destination holding, or
# of the last few seconds, whose role is in its grace period) has its packets go through
# the queue. The kernel destroys a dead listener's queue with every packet in it
# (scripts/nfqueue-listener-death), so these cases used to lose the datagrams queued to
# the dying agent (1-4 at a source's arm, 1-2 at its freeze, 5-15 right after a
# destination's release). Now the lab supervisor (systemd's fd store) keeps a copy of
# each queue's socket: the queue and its packets outlive the agent, and the restarted
# agent takes it over (nodeshim.queuekeep): every packet gets its verdict, none is lost.
# The dying agent still writes its queue's length (`died.queued`): how many packets the
# kept queue carried over; the new agent's log says what it did with them.
AGENT_STEPS = [
    ("source", "migrate.arm", "rolled_back"),
    ("source", "migrate.freeze", "rolled_back"),
    ("source", "migrate.commit", "committed"),
    ("destination", "migrate.prepare", "rolled_back"),
    ("destination", "migrate.restore", "rolled_back"),
    # past the point of no return (owner switched, release sent): the gateway is in doubt
    # until the restarted agent says it released nothing; then owner back, source rolls back
    ("destination", "migrate.release", "rolled_back"),
    # released (the new instance serves the moved connections), dead before its reply:
    # the restarted agent adopts the instance and, finding its predecessor's release
    # marker, refuses the resent Release: the gateway goes forward (committed)
    ("destination", "migrate.release.done", "committed"),
    # a chunk of the streamed dump (more than CHUNK connections) arrives at the destination
    # while the source is frozen: the source holds everything, rolls back
    ("destination", "migrate.chunk", "rolled_back"),
]


def _log_size(h, daemon):
    try:
        return os.path.getsize(os.path.join(h.lab.state_dir, "logs", f"{daemon}.log"))
    except FileNotFoundError:
        return 0


def _log_since(h, daemon, offset):
    with open(os.path.join(h.lab.state_dir, "logs", f"{daemon}.log"), errors="replace") as f:
        f.seek(offset)
        return f.read()


@pytest.mark.parametrize("who, op, outcome", AGENT_STEPS,
                         ids=[f"{v[0]}-{v[1].removeprefix('migrate.')}" for v in
                              (getattr(p, "values", p) for p in AGENT_STEPS)])
def test_agent_killed_during_a_migration_step(slab, tmp_path, who, op, outcome):
    source = owner(slab, "echo")
    destination = NEXT[source]
    node = source if who == "source" else destination
    conns = MANY_CONNS if op == "migrate.chunk" else 50
    p, stop = start_load(slab, tmp_path, f"ag-{who}-{op}", conns=conns, kv=True)
    try:
        old = pids(slab)[node]
        log_at = _log_size(slab, node)
        agent_fault(slab, node, op)
        report, res = migrate(slab, "echo", destination, check=False)
        clear_agent_fault(slab, node, op)
        assert report is not None and report["outcome"] == outcome, (res.stdout, res.stderr)
        _wait_back(slab, node, old)
        svc = wait_settled(slab, "echo")
        time.sleep(1.5)
    finally:
        clear_agent_fault(slab, node, op)
        r = finish_load(p, stop)
    lost_udp = r["udp_sent"] - r["udp_answered_once"]
    died = os.path.join(slab.lab.state_dir, node, "faults", "died.queued")
    with open(died) as f:
        queued = int(f.read())
    os.unlink(died)
    taken = [line.split(" INFO ", 1)[-1].split(" from the previous agent:")[-1].strip()
             for line in _log_since(slab, node, log_at).splitlines()
             if "taken over from the previous agent" in line]
    print(f"{who} agent killed at {op}: {outcome}; UDP lost: {lost_udp} of {r['udp_sent']}; "
          f"packets in its queue when it died: {queued}; queues taken over: {'; '.join(taken)}")
    # the restarted agent took every queue over (none was bound afresh: its packets kept)
    with open(os.path.join(slab.lab.state_dir, f"{node}.toml"), "rb") as f:
        queues = node_config_from_dict(parse_toml(f.read())).queue_count
    assert len(taken) == queues, taken
    assert lost_udp == 0, r
    assert_exact(r)
    assert r["udp_duplicated"] == 0, r
    assert svc["owner"] == (destination if outcome == "committed" else source), svc
    serves_once(slab, "echo")
    one_instance(slab, "echo")
    migrate(slab, "echo", NEXT[svc["owner"]])


# A straggler: a packet the gateway tagged with the old epoch before its flip that reaches
# the source only after the source handed its late packets over (end of freeze). The
# source holds it and forwards it at its commit; the gateway passes it on to the new owner
# in an Inject. Rare by nature (the lab cannot make the gateway late on demand), so the
# test makes one: the source waits at its commit (a `wait` fault: frozen, holding, its
# verdict loop running), and old-epoch datagrams are written straight onto its switch
# port from the gateway's namespace (from 198.51.100.99, an address nobody has: the echo
# of them goes nowhere; the clients' accounting is untouched).
STRAGGLER_SCRIPT = r"""
import socket, struct, sys
ifname, dst, src, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mac = lambda m: bytes.fromhex(m.replace(":", ""))
def csum(b):
    total = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    total = (total >> 16) + (total & 0xffff)
    return ~(total + (total >> 16)) & 0xffff
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
for i in range(n):
    payload = b"straggler %04d\n" % i
    udp = struct.pack("!HHHH", 40999, 7, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x5a00 + i, 0, 64, 17, 0,
                     socket.inet_aton("198.51.100.99"), socket.inet_aton(sys.argv[5]))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s.send(mac(dst) + mac(src) + b"\x08\x00" + ip + udp)
"""


def send_stragglers(h, node, old_epoch_mac, n=3):
    k = int(node.lstrip("n"))
    r = labmod.exec_in(h.lab.gw_ns, [sys.executable, "-c", STRAGGLER_SCRIPT, f"n{k}", f"02:00:00:00:01:{k:02x}",
                                     old_epoch_mac, str(n), labmod.VIP], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def wait_logged(h, node, since, text, timeout=60):
    path = os.path.join(h.lab.state_dir, "logs", f"{node}.log")
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path, errors="replace") as f:
            f.seek(since)
            if text in f.read():
                return
        time.sleep(0.02)
    raise AssertionError(f"{node} never logged {text!r}")


def log_size(h, node):
    path = os.path.join(h.lab.state_dir, "logs", f"{node}.log")
    return os.path.getsize(path) if os.path.exists(path) else 0


@pytest.mark.parametrize("who", ["destination", "gateway"])
def test_killed_at_the_inject_of_stragglers(slab, tmp_path, who):
    """The destination's agent dies as the Inject of the source's stragglers arrives (it
    had released: the successor adopts the new instance, the migration is committed; the
    stragglers are lost with it), or the gateway dies just before sending it (committed:
    the owner switch is durable; the restarted gateway's repeated Commit gets the same
    stragglers back from the source and injects them, once). The stragglers are the
    test's own datagrams, outside the clients' accounting; the clients lose nothing but
    what a destination agent's queue held when it died."""
    import threading

    source = owner(slab, "echo")
    destination = NEXT[source]
    old_epoch = next(s for s in slab.status()["services"] if s["name"] == "echo")["epoch"]
    victim = destination if who == "destination" else "gateway"
    armed = os.path.join(slab.lab.state_dir, "gateway" if who == "gateway" else destination, "faults",
                         "migrate.inject")
    p, stop = start_load(slab, tmp_path, f"inj-{who}", kv=True)
    try:
        old = pids(slab)[victim]
        since, dest_since = log_size(slab, source), log_size(slab, destination)
        agent_fault(slab, source, "migrate.commit", "wait")
        if who == "destination":
            agent_fault(slab, destination, "migrate.inject", "die")
        else:
            gateway_fault(slab, "migrate.inject", "die")
        done = {}
        t = threading.Thread(target=lambda: done.update(out=migrate(slab, "echo", destination, check=False)))
        t.start()
        try:
            wait_logged(slab, source, since, "fault injection at migrate.commit: wait")
            send_stragglers(slab, source, old_epoch)
            time.sleep(0.3)
        finally:
            open(os.path.join(slab.lab.state_dir, source, "faults", "migrate.commit.go"), "w").close()
            t.join(180)
        report, res = done["out"]
        assert not os.path.exists(armed), "no Inject was sent (the stragglers did not reach the source?)"
        if who == "destination":
            assert report is not None and report["outcome"] == "committed", (res.stdout, res.stderr)
            _wait_back(slab, destination, old)
        else:
            labmod.wait_restarted(slab.lab, "gateway", old, timeout=5.0)
        svc = wait_settled(slab, "echo")
        if who == "gateway":
            # the restarted gateway's Commit got the same stragglers back, and injected them
            wait_logged(slab, destination, dest_since, "step=inject epoch=", timeout=30)
            with open(os.path.join(slab.lab.state_dir, "logs", f"{destination}.log"), errors="replace") as f:
                f.seek(dest_since)
                injects = [line for line in f if "migration.step" in line and "step=inject" in line]
            assert len(injects) == 1 and "outcome=ok" in injects[0], injects
        time.sleep(1.5)
    finally:
        clear_agent_fault(slab, source, "migrate.commit")
        clear_agent_fault(slab, destination, "migrate.inject")
        if os.path.exists(armed):
            os.unlink(armed)
        r = finish_load(p, stop)
    lost_udp = r["udp_sent"] - r["udp_answered_once"]
    queued = 0
    died = os.path.join(slab.lab.state_dir, destination, "faults", "died.queued")
    if who == "destination":
        with open(died) as f:
            queued = int(f.read())
        os.unlink(died)
    print(f"{who} killed at the inject of stragglers: owner {svc['owner']}; UDP lost: {lost_udp}; "
          f"packets in the dead agent's queue: {queued}; load {r['tcp_sent']} TCP, {r['udp_sent']} UDP")
    # the dead agent's queue is kept and taken over (nodeshim.queuekeep): nothing lost
    assert lost_udp == 0, r
    assert_exact(r)
    assert r["udp_duplicated"] == 0, r
    assert svc["owner"] == destination, svc
    serves_once(slab, "echo")
    migrate(slab, "echo", NEXT[svc["owner"]])


def test_in_the_grace_after_a_move_a_successor_would_accept_at_the_destination_and_drop_at_the_source(slab, tmp_path):
    """After a migration both roles stay for their grace period (5 s). An agent killed
    then leaves packets read and not decided; its successor gives them the one verdict
    the record (roles.json) names. The released destination owns the service: accept
    (its datagram was lost before); the committed source does not: drop."""
    import json

    source = owner(slab, "echo")
    destination = NEXT[source]
    migrate(slab, "echo", destination)
    records = {}
    for node in (source, destination):
        with open(os.path.join(slab.lab.state_dir, node, "roles.json")) as f:
            records[node] = json.load(f).get("echo")
    assert records[destination] is not None and records[destination]["undecided"] == "accept", records
    assert records[source] is not None and records[source]["undecided"] == "drop", records
    assert records[destination]["phase"] == "released" and records[source]["phase"] == "committed", records


def test_destination_agent_killed_between_starting_and_adopting_the_new_instance(slab, tmp_path):
    """Inside the release, the handoff's new instance started (serving the moved
    connections) and not yet adopted when the destination's agent dies (`handoff.start`
    die). The restarted agent adopts that instance from its record (nodeshim.leftovers)
    and refuses the resent Release: committed, TCP exact, the same instance serves.
    Before, the instance was unknown to the successor, whose reconcile could not bind the
    service's ports (EADDRINUSE) while the orphan kept serving.

    UDP: before the queue take-over (nodeshim.queuekeep) this case lost 108-421
    datagrams (of 665-1818; the dead agent's queue died with it); with it, none."""
    source = owner(slab, "echo")
    destination = NEXT[source]
    p, stop = start_load(slab, tmp_path, "ag-handoff-start", kv=True)
    try:
        old = pids(slab)[destination]
        agent_fault(slab, destination, "handoff.start")
        report, res = migrate(slab, "echo", destination, check=False)
        assert report is not None and report["outcome"] == "committed", (res.stdout, res.stderr)
        assert not os.path.exists(os.path.join(slab.lab.state_dir, destination, "faults", "handoff.start"))
        _wait_back(slab, destination, old)
        svc = wait_settled(slab, "echo")
        time.sleep(1.5)
        started = service_pid(slab, "echo")
    finally:
        clear_agent_fault(slab, destination, "handoff.start")
        r = finish_load(p, stop)
    with open(os.path.join(slab.lab.state_dir, "logs", f"{destination}.log"), errors="replace") as f:
        adopted = [line for line in f if "adopted the handed-over instance of echo" in line]
    died = os.path.join(slab.lab.state_dir, destination, "faults", "died.queued")
    with open(died) as f:
        queued = int(f.read())
    os.unlink(died)
    print(f"destination agent killed after starting the new instance: committed; UDP lost: "
          f"{r['udp_sent'] - r['udp_answered_once']} of {r['udp_sent']}; "
          f"in its queue when it died: {queued}; TCP {r['tcp_ok']}/{r['tcp_sent']}, resets {r['resets']}")
    assert len(adopted) == 1 and f"(pid {started})" in adopted[0], adopted  # the very instance serves
    assert_exact(r)  # TCP, UDP (the kept queue), kv: exact
    assert r["udp_duplicated"] == 0, r
    assert svc["owner"] == destination, svc
    serves_once(slab, "echo")
    migrate(slab, "echo", NEXT[svc["owner"]])


# ---------------------------------------------------------------- soak

def daemon_footprint(h):
    """{daemon: (open fds, RSS in MB)} of each daemon (by name: a restarted one is new)."""
    out = {}
    for name, pid in pids(h).items():
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        out[name] = (fds, round(rss, 1))
    return out


def rule_counts(h):
    """Kernel rules: nft lines at the gateway, iptables mangle rules on each node."""
    lab = h.lab
    counts = {"gateway": len(labmod.exec_in(lab.gw_ns, ["nft", "list", "ruleset"], capture_output=True,
                                            text=True).stdout.splitlines())}
    for k in range(1, lab.nodes + 1):
        counts[lab.node_name(k)] = len(labmod.exec_in(lab.node_ns(k), ["iptables", "-w", "-t", "mangle", "-S"],
                                                      capture_output=True, text=True).stdout.splitlines())
    return counts


SOAK_MIGRATIONS = int(os.environ.get("VIPCLUSTER_SOAK_MIGRATIONS", "30"))


def test_soak_migrations_round_the_nodes_with_random_daemon_kills(slab, tmp_path):
    """SOAK_MIGRATIONS migrations (echo and kv in turn, round the nodes) under load, with a
    daemon SIGKILLed at random between them and the gateway killed at a random step of
    some: nothing lost, duplicated or reset; fds, rules and RSS flat (first and last
    printed). `scripts/soak` runs it with 200."""
    import random

    seed = int(os.environ.get("VIPCLUSTER_SOAK_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    p, stop = start_load(slab, tmp_path, "soak", duration=3600.0, conns=30)
    outcomes, kills, agent_kills = {"committed": 0, "rolled_back": 0}, [], 0
    events = []  # (monotonic, what): lined up with the client's unanswered datagrams below
    try:
        time.sleep(1.0)
        first, first_rules = daemon_footprint(slab), rule_counts(slab)
        for i in range(SOAK_MIGRATIONS):
            name = ("echo", "kv")[i % 2]
            src = owner(slab, name)
            roll = rng.random()
            events.append((time.monotonic(), f"#{i} migrate {name} {src} -> {NEXT[src]}"))
            if roll < 0.15:  # the gateway dies at a random step of this migration
                op, _ = rng.choice(GATEWAY_STEPS)
                old = pids(slab)["gateway"]
                gateway_fault(slab, op, "die")
                migrate(slab, name, NEXT[src], check=False)
                labmod.wait_restarted(slab.lab, "gateway", old, timeout=5.0)
                kills.append(f"#{i} gateway at {op}")
            else:
                report, _ = migrate(slab, name, NEXT[src], check=False)
                assert report is not None and report["outcome"] in outcomes, report
            svc = wait_settled(slab, name)
            outcomes["committed" if svc["owner"] != src else "rolled_back"] += 1
            if roll > 0.75:  # a daemon dies between migrations
                victim = rng.choice(sorted(set(pids(slab)) - {"supervisor"}))
                events.append((time.monotonic(), f"#{i} kill {victim}"))
                kill(slab, victim)
                events.append((time.monotonic(), f"#{i} {victim} back"))
                kills.append(f"#{i} {victim} between migrations")
                if victim != "gateway":
                    agent_kills += 1
        time.sleep(1.0)
        last, last_rules = daemon_footprint(slab), rule_counts(slab)
    finally:
        r = finish_load(p, stop)
    print(f"\nsoak: seed {seed}, {SOAK_MIGRATIONS} migrations: {outcomes}; kills: {kills}")
    print(f"load: {r['tcp_sent']} TCP messages, {r['udp_sent']} datagrams, resets {r['resets']}, "
          f"kv bad {r['kv_bad']}")
    for name in sorted(first):
        print(f"  {name:10s} fds {first[name][0]:4d} -> {last.get(name, ('-',))[0]!s:>4s}   "
              f"RSS {first[name][1]:6.1f} -> {last.get(name, (0, 0.0))[1]:6.1f} MB")
    print(f"  rules first {first_rules}\n  rules last  {last_rules}")
    # an agent killed within a role's grace period used to lose the datagrams in its
    # queue (17 over 44 agent kills in one 200-migration soak); the queues now outlive it
    lost_udp = r["udp_sent"] - r["udp_answered_once"]
    print(f"  UDP lost: {lost_udp} ({agent_kills} agent kills); client errors: {r['errors']}")
    for n, sent in r.get("udp_missing_sent", []):
        before = [e for e in events if e[0] <= sent][-3:]
        print(f"  datagram {n} (unanswered) sent at {sent:.3f}, after: "
              + "; ".join(f"{what} at {t - sent:+.3f} s" for t, what in before))
    assert_exact(r)
    assert r["udp_duplicated"] == 0, r
    for name, (fds, rss) in last.items():
        if name in first:
            assert fds <= first[name][0] + 16, (name, first[name], last[name])
            assert rss <= first[name][1] + 40, (name, first[name], last[name])
    # one rule per service port whatever happened, plus the fixed ones
    assert last_rules == first_rules, (first_rules, last_rules)


def test_cleanup_commands_take_down_what_exited_daemons_leave():
    """With the daemons stopped, services, rules, VIP and the delivery table stay (the
    data plane outlives the control plane) until the operator's cleanup commands."""
    import sys

    from tests.lab.conftest import ROOT, LabHandle, unique_prefix

    spec = labmod.Lab(unique_prefix("c"), 1)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        h = LabHandle(spec)
        h.vipctl("service", "add", "echo", "--node", "n1", "--port", "udp:7", "--exec", "builtin:echo")
        service = service_pid(h, "echo")
        supervisor = pids(h)["supervisor"]
        os.kill(supervisor, signal.SIGTERM)  # it stops the agent, then the gateway
        deadline = time.time() + 20
        while labmod._alive(supervisor) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(labmod._alive(p) for p in pids(h).values())

        def run_in(ns, *argv):
            return labmod.exec_in(ns, list(argv), capture_output=True, text=True)
        assert labmod._alive(service)  # the service still runs ...
        assert "NFQUEUE" in run_in(spec.node_ns(1), "iptables", "-t", "mangle", "-S").stdout
        assert "vipcluster-mute" in run_in(spec.node_ns(1), "iptables", "-t", "mangle", "-S").stdout
        assert labmod.VIP in run_in(spec.node_ns(1), "ip", "addr", "show", "lo").stdout
        assert "table" in run_in(spec.gw_ns, "nft", "list", "ruleset").stdout
        # ... until the operator cleans up
        cli = [sys.executable, "-m", "vipctl"]
        r = labmod.exec_in(spec.node_ns(1), cli + ["node", "cleanup", "--config",
                                                   os.path.join(spec.state_dir, "n1.toml")],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "stopped echo" in r.stdout, (r.stdout, r.stderr)
        deadline = time.time() + 5
        while labmod._alive(service) and time.time() < deadline:
            time.sleep(0.05)
        assert not labmod._alive(service)
        left = run_in(spec.node_ns(1), "iptables", "-t", "mangle", "-S").stdout
        assert "VIPCLUSTER" not in left and "vipcluster-mute" not in left, left
        assert labmod.VIP not in run_in(spec.node_ns(1), "ip", "addr", "show", "lo").stdout
        r = labmod.exec_in(spec.gw_ns, cli + ["gateway", "cleanup", "--config",
                                              os.path.join(spec.state_dir, "gateway.toml")],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "vipcluster" not in run_in(spec.gw_ns, "nft", "list", "ruleset").stdout
    finally:
        labmod.down(spec, log=lambda *a: None)


TERM_STEPS = [("source", "migrate.freeze"), ("source", "migrate.commit"),
              ("destination", "migrate.restore"), ("destination", "migrate.release")]


@pytest.mark.parametrize("who, op", TERM_STEPS, ids=[
    f"{v[0]}-{v[1].split('.')[1]}" for v in (getattr(p, "values", p) for p in TERM_STEPS)])
def test_agent_sigterm_during_a_migration_finishes_it_first(slab, tmp_path, who, op):
    """SIGTERM reaches an agent just as a step arrives. A stop is not a crash: the agent
    lets the gateway finish the open migration (committed), then exits; the supervisor
    starts it again. At the source's commit this is the double-serving case: the stopping
    agent used to end the migration from its own table, which still names the source the
    owner (the gateway publishes the switch only when it is over), so it resumed the old
    instance while the destination served (3060 of 7300 TCP messages answered)."""
    source = owner(slab, "echo")
    destination = NEXT[source]
    node = source if who == "source" else destination
    p, stop = start_load(slab, tmp_path, f"term-{who}-{op}", kv=True)
    try:
        old = pids(slab)[node]
        agent_fault(slab, node, op, "term")
        report, res = migrate(slab, "echo", destination, check=False)
        clear_agent_fault(slab, node, op)
        assert report is not None and report["outcome"] == "committed", (res.stdout, res.stderr)
        _wait_back(slab, node, old)
        svc = wait_settled(slab, "echo")
        time.sleep(1.5)
    finally:
        clear_agent_fault(slab, node, op)
        r = finish_load(p, stop)
    print(f"{who} agent SIGTERMed at {op}: {report['outcome']} ({report.get('reason')!r}); load {r}")
    assert_exact(r)
    # no node's stack met the service's packets without its socket (an ICMP port
    # unreachable: the stopping source's rules had accepted them from its stale table)
    assert not r["errors"], r["errors"]
    assert svc["owner"] == destination, svc
    serves_once(slab, "echo")
    migrate(slab, "echo", NEXT[svc["owner"]])
