"""``bench/icount.py``'s drivers, run without valgrind: each scenario's requests must succeed
and be counted, or the driver exits non-zero (a count taken of a failing run would mislead)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

ICOUNT = str(ROOT / "bench" / "icount.py")


def run_child(scenario: str, n: int, source: str = ICOUNT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, source, "--child", scenario, str(n)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("scenario", ["echo", "echo1", "tool", "stream"])
def test_each_driver_runs_its_requests_to_success(scenario):
    done = run_child(scenario, 640)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_driver_whose_requests_fail_exits_non_zero(tmp_path):
    """A host answering each call with the wrong value makes ``rpc_loop`` fail: the driver says so."""
    with open(ICOUNT) as f:
        source = f.read()
    assert '"result": i - 1}' in source
    broken = tmp_path / "icount.py"
    broken.write_text(source.replace('"result": i - 1}', '"result": i}'))
    done = run_child("tool", 640, str(broken))
    assert done.returncode != 0
    assert "the tool driver's requests failed" in done.stderr


@pytest.mark.parametrize("scenario", ["echo", "stream"])
def test_whole_runs_answer_every_request_from_the_floor_and_the_worker(scenario):
    """``--whole``'s run, without valgrind: both peers answer all of it; a worker that cannot
    (no ``--diagnostics``: ``stream_count`` is unknown) is caught."""
    from bench.icount import whole_run

    floor = whole_run([sys.executable, "-m", "bench.floor"], str(ROOT), scenario, 500, warm=False)
    worker = whole_run([sys.executable, "-m", "bridge", "serve", "--diagnostics"], str(ROOT), scenario, 500, warm=True)
    assert floor[:2] == (0, True) and worker[:2] == (0, True), (floor[2][-2000:], worker[2][-2000:])
    if scenario == "stream":
        lacking = whole_run([sys.executable, "-m", "bridge", "serve"], str(ROOT), scenario, 500, warm=True)
        assert lacking[1] is False
