"""Bad input to vipctl that needs no root to try: one `vipctl: ...` line on stderr, exit 1
(usage errors: exit 2), never a traceback. Config files are read and checked before
`gateway run` / `node run` ask for root, so these run as any user."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTURE = os.path.join(ROOT, "captures", "migration.pcap")


def run_vipctl(*args):
    return subprocess.run([sys.executable, "-m", "vipctl", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def one_line_error(r, needle, code=1):
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vipctl: ") and needle in lines[0], lines[0]


# ---------------------------------------------------------------- config files


GW_NO_NODES = ('vip = "203.0.113.10"\nclient_interface = "eth0"\ncluster_interface = "eth1"\n'
               'listen_address = "192.0.2.1"\ntls_ca = "/ca"\ntls_cert = "/c"\ntls_key = "/k"\n')
NODE = 'name = "n1"\nvip = "203.0.113.10"\ngateway_address = "192.0.2.1"\ntls_ca = "/ca"\ntls_cert = "/c"\ntls_key = "/k"\n'


@pytest.mark.parametrize("daemon, content, needle", [
    ("gateway", GW_NO_NODES, "config field 'nodes': missing"),
    ("gateway", 'vip = "not-an-ip"\nclient_interface = "eth0"\ncluster_interface = "eth1"\n', "'vip'"),
    ("gateway", GW_NO_NODES + 'delivery = "sometimes"\n[[nodes]]\nname = "n1"\naddress = "192.0.2.11"\n'
                'mac = "02:00:00:00:01:01"\n', "config field 'delivery': must be one of broadcast, selective"),
    ("node", NODE + 'queue_num = "zero"\n', "config field 'queue_num'"),
    ("node", NODE + 'datapath = "turbo"\n', "config field 'datapath': must be one of fast, queue, got 'turbo'"),
    ("node", "this is [not toml", "not valid TOML"),
    ("node", b'name = "\xff\xfe"\n', "not UTF-8 text"),
    ("gateway", b"a = " + b"[" * 100_000, "nested too deeply"),
])
def test_config_errors_name_the_field(tmp_path, daemon, content, needle):
    cfg = tmp_path / "x.toml"
    if isinstance(content, bytes):
        cfg.write_bytes(content)
    else:
        cfg.write_text(content)
    r = run_vipctl(daemon, "run", "--config", str(cfg))
    one_line_error(r, needle)
    assert str(cfg) in r.stderr


def test_config_path_that_is_not_a_readable_file(tmp_path):
    one_line_error(run_vipctl("node", "run", "--config", str(tmp_path)), f"{tmp_path} is a directory, not a config file")
    one_line_error(run_vipctl("gateway", "run", "--config", str(tmp_path / "missing.toml")), "does not exist")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    one_line_error(run_vipctl("node", "run", "--config", str(big)), "not a config file")


# ---------------------------------------------------------------- replay arguments


@pytest.mark.parametrize("args, needle", [
    (["--migrate", "echo:n2@\u00b2"], "config field '--migrate': malformed 'echo:n2@\u00b2'"),  # superscript two
    (["--migrate", "echo:n2@\u0663"], "malformed"),  # Arabic-Indic three: int() takes it, a frame number is 0-9
    (["--migrate", "echo:n2@" + "1" * 5000], "malformed"),  # beyond int()'s digit limit
    (["--migrate", "echo@n2"], "--migrate"),
    (["--lag", "n2=\u00b2"], "config field '--lag': malformed 'n2=\u00b2'"),
    (["--lag", "n2=" + "9" * 5000], "--lag"),
    (["--vip", "1.2.3"], "'--vip'"),
])
def test_replay_arguments(args, needle):
    one_line_error(run_vipctl("replay", CAPTURE, *args), needle)


def test_replay_capture_and_sidecar_that_cannot_be_read(tmp_path):
    one_line_error(run_vipctl("replay", str(tmp_path)), "is a directory")
    pcap = tmp_path / "kv.pcap"
    pcap.write_bytes(open(os.path.join(ROOT, "captures", "kv.pcap"), "rb").read())
    side = tmp_path / "kv.json"
    side.write_bytes(b'{"nodes": "\xff"}')
    one_line_error(run_vipctl("replay", str(pcap)), "not UTF-8 text")
    side.write_text("[" * 100_000)
    one_line_error(run_vipctl("replay", str(pcap)), "not valid JSON: nested too deeply")
    side.unlink()
    side.mkdir()
    one_line_error(run_vipctl("replay", str(pcap)), "cannot read the sidecar")


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize("args, needle", [
    (["lab", "up", "--delivery", "sometimes"], "Invalid value for '--delivery'"),
    (["lab", "up", "--datapath", "turbo"], "'turbo' is not one of 'fast', 'queue'"),
    (["statu"], "No such command 'statu'"),
    (["migrate", "echo"], "Missing option '--to'"),
    (["replay"], "Missing argument 'PCAP'"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    one_line_error(run_vipctl(*args), needle, code=2)


def _tls_config(tmp_path, daemon, **override):
    from vipwire import pki
    d = str(tmp_path / "pki")
    pki.init(d, nodes=["n1"])
    p = pki.paths(d, "gateway") if daemon == "gateway" else pki.paths(d, "node", "n1")
    files = {"tls_ca": p.ca_cert, "tls_cert": p.cert, "tls_key": p.key, **override}
    head = (GW_NO_NODES.split("tls_ca")[0] if daemon == "gateway" else NODE.split("tls_ca")[0])
    body = head + "".join(f'{k} = "{v}"\n' for k, v in files.items())
    if daemon == "gateway":
        body += 'control_socket = "/nonexistent/c.sock"\n[[nodes]]\nname = "n1"\naddress = "192.0.2.11"\nmac = "02:00:00:00:01:01"\n'
    cfg = tmp_path / "x.toml"
    cfg.write_text(body)
    return str(cfg), p


@pytest.mark.parametrize("daemon", ["gateway", "node"])
def test_tls_file_errors_name_the_field(tmp_path, daemon):
    if os.geteuid() != 0:
        pytest.skip("the daemons ask for root before they read the TLS files")
    cfg, p = _tls_config(tmp_path, daemon, tls_cert=str(tmp_path / "missing.crt"))
    one_line_error(run_vipctl(daemon, "run", "--config", cfg), "config field 'tls_cert': TLS certificate")
    cfg, p = _tls_config(tmp_path, daemon, tls_ca=str(tmp_path))
    one_line_error(run_vipctl(daemon, "run", "--config", cfg), "config field 'tls_ca'")
    cfg, p = _tls_config(tmp_path, daemon)
    os.chmod(p.key, 0o640)
    one_line_error(run_vipctl(daemon, "run", "--config", cfg), "config field 'tls_key'")
    os.chmod(p.key, 0o600)
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"\xff\xfe not a certificate")
    cfg, p = _tls_config(tmp_path, daemon, tls_cert=str(garbage))
    one_line_error(run_vipctl(daemon, "run", "--config", cfg), "do not load")


def test_the_old_key_file_and_key_generate_say_what_to_do(tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text(NODE + 'key_file = "/etc/vipcluster/cluster.key"\n')
    one_line_error(run_vipctl("node", "run", "--config", str(cfg)), "config field 'key_file': the shared cluster key is gone")
    one_line_error(run_vipctl("key", "generate", str(tmp_path / "k")), "vipctl pki init")


# ---------------------------------------------------------------- health checks and graceful drain


@pytest.mark.parametrize("args, needle, code", [
    (["--check", "ping"], "--check must be tcp, http:PATH, dns:NAME or exec:CMD", 1),
    (["--check", "http:index.html"], "needs a path starting with '/'", 1),
    (["--check", "tcp", "--check-interval", "0"], "--check-interval must be between", 1),
    (["--check", "tcp", "--check-failures", "0"], "--check-failures must be between", 1),
    (["--failover", "restart"], "need --check", 2),
    (["--check-interval", "2"], "need --check", 2),
    (["--check", "tcp", "--failover", "migrate"], "Invalid value for '--failover'", 2),
])
def test_bad_health_check_options(args, needle, code):
    r = run_vipctl("--socket", "/nonexistent/control.sock", "service", "add", "web", "--node", "n1",
                   "--port", "tcp:80", "--exec", "builtin:echo", *args)
    one_line_error(r, needle, code)


@pytest.mark.parametrize("args, needle, code", [
    (["migrate", "web", "--to", "n2", "--timeout", "5"], "--timeout is for --graceful", 2),
    (["migrate", "web", "--to", "n2", "--graceful", "--timeout", "0"], "--timeout must be between", 1),
    (["node", "drain", "n1", "--graceful", "--timeout", "-3"], "--timeout must be between", 1),
])
def test_bad_graceful_options(args, needle, code):
    one_line_error(run_vipctl("--socket", "/nonexistent/control.sock", *args), needle, code)
