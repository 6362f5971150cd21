"""The activation wrapper of command-line services (nodeshim.services): the descriptors
reach the program over a socket (not inherited by the launcher) and land on 3.., in
order, however many there are. No root: the wrapper runs as a plain child here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from nodeshim import services

REPORT = ("import json, os, socket\n"
          "n = int(os.environ['LISTEN_FDS'])\n"
          "ports = [socket.socket(fileno=3 + i).getsockname()[1] for i in range(n)]\n"
          "extra = [fd for fd in range(3 + n, 3 + n + 400) if os.path.exists(f'/proc/self/fd/{fd}')]\n"
          "print(json.dumps({'ports': ports, 'pid_ok': os.environ['LISTEN_PID'] == str(os.getpid()),\n"
          "                  'extra': extra, 'leftover_env': 'VIPCLUSTER_PASS_SOCK' in os.environ}))\n")


def test_many_descriptors_land_on_3_in_order_and_nothing_else_is_left_open():
    socks = []
    try:
        for _ in range(300):  # more than 97: the old inherited scheme's 100.. overlapped 3..
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append((f"udp-{s.getsockname()[1]}", s))
        passing = services._pass_over_socket(socks)
        try:
            env = dict(os.environ, LISTEN_FDS=str(len(socks)), VIPCLUSTER_PASS_SOCK=str(passing),
                       VIPCLUSTER_PASS_COUNT=str(len(socks)))
            out = subprocess.run([sys.executable, "-c", services._ACTIVATION_WRAPPER, sys.executable, "-c", REPORT],
                                 env=env, pass_fds=(passing,), capture_output=True, text=True, timeout=30)
        finally:
            os.close(passing)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["ports"] == [s.getsockname()[1] for _, s in socks]
        assert got["pid_ok"] and not got["leftover_env"] and got["extra"] == []
    finally:
        for _, s in socks:
            s.close()


def test_a_short_pass_is_a_clear_failure_not_a_hang():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    passing = services._pass_over_socket([("udp-x", s)])
    try:
        env = dict(os.environ, LISTEN_FDS="2", VIPCLUSTER_PASS_SOCK=str(passing), VIPCLUSTER_PASS_COUNT="2")
        out = subprocess.run([sys.executable, "-c", services._ACTIVATION_WRAPPER, "true"],
                             env=env, pass_fds=(passing,), capture_output=True, text=True, timeout=30)
    finally:
        os.close(passing)
        s.close()
    assert out.returncode != 0 and "1 of 2 descriptors passed" in out.stderr
