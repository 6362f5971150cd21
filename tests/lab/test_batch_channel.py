"""Lab test of a batch's socket path with the real kernel: the running echo builtin hands
connections back over the vip-batch channel, they are dumped (TCP_REPAIR), closed
silently, restored and adopted by a second running instance, whole and in batches
(scripts/bench-batch, which builds and removes its own namespaces). No timing is
asserted: the numbers are printed for the report, noisy on a shared 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.lab.conftest import ROOT


def test_connections_moved_in_batches_by_a_running_program_still_echo():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench-batch"), "200", "16"],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    print(json.dumps(out))
    assert out["served_before"] == 400
    assert out["whole"]["echo_after"] == 200 and out["whole"]["window_ms"]["batches"] == 1
    assert out["batched"]["echo_after"] == 200 and out["batched"]["window_ms"]["batches"] == 13
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "vt-bbatch-" not in leftovers
