"""Lab fixtures: a real cluster in uniquely named namespaces, always torn down."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from vipctl import lab as labmod

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _missing():
    if os.geteuid() != 0:
        return "lab tests need root"
    for tool in ("iptables", "nft", "tcpdump", "nc"):
        if shutil.which(tool) is None:
            return f"lab tests need {tool} (run scripts/setup)"
    return None


def pytest_collection_modifyitems(config, items):
    why = _missing()
    for item in items:
        if "/tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


def unique_prefix(tag: str) -> str:
    return f"vt{tag}{os.getpid() % 100000}"


class LabHandle:
    def __init__(self, lab: labmod.Lab):
        self.lab = lab
        self.socket = lab.control_socket

    def vipctl(self, *args, check=True, timeout=60):
        r = subprocess.run([sys.executable, "-m", "vipctl", "--socket", self.socket, *args],
                           capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and r.returncode != 0:
            raise AssertionError(f"vipctl {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def status(self):
        return json.loads(self.vipctl("status", "--json").stdout)

    def counters(self, service):
        """{node: accepted} for one service, from every shim."""
        st = self.status()
        svc = next(s for s in st["services"] if s["name"] == service)
        return {n: c["accepted"] for n, c in svc["counters"].items()}, svc

    def client(self, argv, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 30)
        return labmod.exec_in(self.lab.client_ns, argv, **kw)

    def client_popen(self, argv, **kw):
        return labmod.popen_in(self.lab.client_ns, argv, **kw)

    def pyclient(self, *args, timeout=60):
        """Run tests/lab/clients.py inside vip-client; it prints one JSON object."""
        r = self.client([sys.executable, os.path.join(HERE, "clients.py"), *map(str, args)], timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"client {args} failed: {r.stderr.decode()}")
        return json.loads(r.stdout)


@contextlib.contextmanager
def lab_with_services(tag: str, **options):
    """A lab of its own (unique prefix) with echo (tcp:7, udp:7) on n1 and kv (tcp:6379)
    on n2; always torn down."""
    spec = labmod.Lab(unique_prefix(tag), 3, **options)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        h = LabHandle(spec)
        h.vipctl("service", "add", "echo", "--node", "n1", "--port", "tcp:7", "--port", "udp:7", "--exec", "builtin:echo")
        h.vipctl("service", "add", "kv", "--node", "n2", "--port", "tcp:6379", "--exec", "builtin:kv")
        yield h
    finally:
        labmod.down(spec, log=lambda *a: None)


@pytest.fixture(scope="session")
def lab():
    spec = labmod.Lab(unique_prefix("a"), 3)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        yield LabHandle(spec)
    finally:
        labmod.down(spec, log=lambda *a: None)
