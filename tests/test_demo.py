"""``bridge demo``, the first command a new user runs, as a user runs it."""

import subprocess
import sys

from bridge.host.demo import calculator, search
from tests.conftest import ROOT


def test_demo_prints_the_whole_conversation():
    out = subprocess.run([sys.executable, "-m", "bridge", "demo"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.strip().startswith("tool call") for line in lines) == 3
    assert any("calculator(expression='330 - 93')" in line for line in lines)
    assert any(line.strip() == "observed    237" for line in lines)
    assert sum(line.strip().startswith("thinking") for line in lines) == 4
    assert "237 metres taller" in lines[-1]


def test_demo_tools():
    assert search("Eiffel Tower height") == ["The Eiffel Tower in Paris is 330 metres tall (with antennas)."]
    assert search("nothing here") == []
    assert calculator("2 * (3 + 4) - -1") == 15
    try:
        calculator("__import__('os')")
    except ValueError as exc:
        assert "not arithmetic" in str(exc)
    else:
        raise AssertionError("the calculator evaluated a call")
