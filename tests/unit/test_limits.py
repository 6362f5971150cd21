"""nodeshim.limits.grow_fd_table: the descriptor table is grown once, at start, and no
descriptor is left behind (its growth inside a freeze waits for an RCU grace period)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

CHILD = r"""
import os, resource, sys, json
from nodeshim.limits import fd_table_size, grow_fd_table
upto = int(sys.argv[1])
before_fds = sorted(os.listdir("/proc/self/fd"))
before = fd_table_size()
after = grow_fd_table(upto)
print(json.dumps({"before": before, "after": after, "reported": fd_table_size(),
                  "same_fds": sorted(os.listdir("/proc/self/fd")) == before_fds,
                  "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
"""


def _run(upto: int) -> dict:
    import json
    out = subprocess.run([sys.executable, "-c", CHILD, str(upto)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return json.loads(out.stdout)


def test_the_table_is_grown_and_no_descriptor_is_left_open():
    r = _run(4096)
    want = min(4096, r["soft"])
    assert r["before"] < want <= r["after"] == r["reported"]
    assert r["same_fds"]


def test_never_past_the_descriptor_limit():
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    r = _run(soft * 4)
    assert r["after"] >= soft and r["same_fds"]
    assert r["after"] < soft * 4 or soft * 4 <= 1024  # capped at the limit, not at `upto`
