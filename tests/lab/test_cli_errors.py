"""Bad input that needs root (or a running lab) to try: one clear line, a non-zero exit, and
nothing changed. What needs no root is in tests/unit/test_vipctl_errors.py."""

import os
import socket
import subprocess
import sys

from tests.lab.conftest import ROOT


def one_line_error(r, needle):
    assert r.returncode != 0, r
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_bad_service_requests_change_nothing(lab):
    lab.vipctl("service", "add", "svc1", "--node", "n1", "--port", "tcp:2000", "--exec", "builtin:echo")
    try:
        before = lab.vipctl("service", "list", "--json").stdout
        one_line_error(lab.vipctl("service", "add", "x", "--node", "n9", "--port", "tcp:2001", "--exec", "builtin:echo", check=False),
                       "unknown node 'n9'")
        one_line_error(lab.vipctl("service", "add", "svc1", "--node", "n2", "--port", "tcp:2002", "--exec", "builtin:echo", check=False),
                       "service 'svc1' already exists")
        one_line_error(lab.vipctl("service", "add", "svc2", "--node", "n2", "--port", "tcp:2000", "--exec", "builtin:echo", check=False),
                       "port tcp:2000 on the VIP is already taken by service 'svc1'")
        for bad in ("tcp2000", "sctp:1", "tcp:99999", "udp:"):
            one_line_error(lab.vipctl("service", "add", "svc3", "--node", "n2", "--port", bad, "--exec", "builtin:echo", check=False),
                           "malformed port")
        one_line_error(lab.vipctl("service", "add", "svc4", "--node", "n2", "--port", "tcp:2003", "--exec", "builtin:nope", check=False),
                       "unknown builtin")
        one_line_error(lab.vipctl("service", "remove", "ghost", check=False), "unknown service 'ghost'")
        assert lab.vipctl("service", "list", "--json").stdout == before
        # and the refused ports are really free: nothing runs on the nodes for them
        procs = {p for n in lab.status()["nodes"] for p in n["processes"]}
        assert not procs & {"x", "svc2", "svc3", "svc4"}
    finally:
        lab.vipctl("service", "remove", "svc1", check=False)


def run_vipctl(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vipctl", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, **kw)


def test_gateway_not_running(tmp_path):
    one_line_error(run_vipctl("--socket", str(tmp_path / "none.sock"), "status"), "the gateway is not running")


def test_pki_init_errors_and_the_removed_key_generate(tmp_path):
    # (config file errors need no root: tests/unit/test_vipctl_errors.py)
    one_line_error(run_vipctl("key", "generate", str(tmp_path)), "vipctl pki init")
    (tmp_path / "file").write_text("x")
    one_line_error(run_vipctl("pki", "init", str(tmp_path / "file")), "is not a directory")
    one_line_error(run_vipctl("pki", "init", str(tmp_path / "p"), "--node", "no good"), "bad identity")
    r = run_vipctl("pki", "init", str(tmp_path / "p"), "--node", "n1", "--admin", "alice")
    assert r.returncode == 0 and "node n1:" in r.stdout and "admin alice:" in r.stdout, r.stderr
    assert os.stat(tmp_path / "p" / "node-n1.key").st_mode & 0o777 == 0o600


def _as_nobody(fn):
    """Run fn() in a forked child that dropped to uid/gid 65534; return (exit code, stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.dup2(w, 2)
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
            sys.stderr.flush()
            os._exit(0)
        except SystemExit as e:
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 1)
        except BaseException as e:
            os.write(2, f"{type(e).__name__}: {e}\n".encode())
            os._exit(99)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_not_root(lab):
    # vipctl says so in one line, before trying anything
    from vipctl.cli import main

    code, err = _as_nobody(lambda: main(["--socket", lab.socket, "status"]))
    assert code == 1 and err.strip() == "vipctl: must be run as root (the control socket is root-only)", err
    # and the socket itself refuses a non-root peer even if the check were bypassed
    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(lab.socket)

    code, err = _as_nobody(connect)
    assert code == 99 and "PermissionError" in err, err
    st = os.stat(lab.socket)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0
