"""scripts/bench-alternate: the arms run in turns, each in its tree with its environment,
each arm's JSON lines kept and summarised; bad input is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "bench-alternate")
# prints what its arm is: the environment's X, the working directory, one or two rows
FAKE = ("import json, os; x = os.environ.get('X'); "
        "[print(json.dumps({'freeze_ms': 10.0 + i if x else 20.0 + i, 'cwd': os.getcwd(), "
        "'split_ms': {'freeze': {'criu_frozen': 5.0}}})) for i in range(2)]; print('not json')")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_each_arm_runs_in_turn_with_its_environment_and_is_summarised(tmp_path):
    out = str(tmp_path / "ab")
    p = run("--arm", f"plain={REPO}", "--arm", f"with-x={REPO}:X=1", "--rounds", "3", "--out", out,
            "--key", "split_ms.freeze.criu_frozen", "--key", "no.such.key", "--json",
            "--", sys.executable, "-c", FAKE)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["plain"]["moves"] == 6 and result["with-x"]["moves"] == 6
    assert result["plain"]["freeze_ms"] == {"median": 20.5, "min": 20.0, "max": 21.0, "n": 6}
    assert result["with-x"]["freeze_ms"]["median"] == 10.5
    assert result["with-x"]["split_ms.freeze.criu_frozen"]["median"] == 5.0
    assert result["plain"]["no.such.key"] is None and result["plain"]["failed_runs"] == 0
    rows = [json.loads(line) for line in open(out + "-with-x.jsonl")]
    assert len(rows) == 6 and {r["cwd"] for r in rows} == {REPO}
    # in turns: the progress lines alternate between the arms
    order = [line.split("arm ")[1].split(":")[0] for line in p.stderr.splitlines() if "arm " in line]
    assert order == ["plain", "with-x"] * 3


def test_a_command_that_fails_is_counted_not_retried(tmp_path):
    p = run("--arm", f"a={REPO}", "--arm", f"b={REPO}", "--rounds", "2", "--out", str(tmp_path / "ab"),
            "--", sys.executable, "-c", "import sys; sys.exit(3)")
    assert p.returncode == 1
    assert "a: 0 moves, 2 failed runs" in p.stdout and "rc 3" in p.stderr


def test_bad_arms_and_rounds_are_one_line_errors(tmp_path):
    for args, why in ((["--arm", f"a={REPO}"], "two or more arms"),
                      (["--arm", f"a={REPO}", "--arm", f"a={REPO}"], "different names"),
                      (["--arm", "a", "--arm", f"b={REPO}"], "want NAME=TREE"),
                      (["--arm", f"a={tmp_path}", "--arm", f"b={REPO}"], "not a vipcluster checkout"),
                      (["--arm", f"a={REPO}:NOEQUALS", "--arm", f"b={REPO}"], "is not VAR=VALUE"),
                      (["--arm", f"a={REPO}", "--arm", f"b={REPO}", "--rounds", "0"], "1-100")):
        p = run(*args, "--", "true")
        assert p.returncode == 2 and why in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
    p = run("--arm", f"a={REPO}", "--arm", f"b={REPO}")
    assert p.returncode == 2 and "no command" in p.stderr
