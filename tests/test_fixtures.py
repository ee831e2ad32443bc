"""Every transcript in ``fixtures/`` replays against the current worker: a new fixture is a new test.

Re-record them with ``python fixtures/record.py``, or accept a deliberate change
of the worker's output with ``bridge replay --update fixtures/NAME.jsonl``.
"""

from __future__ import annotations

import io

import pytest

from bridge.host import replay
from tests.conftest import ROOT

FIXTURES = sorted((ROOT / "fixtures").glob("*.jsonl"))
SCENARIOS = {"ping_echo_stats", "chain_of_thought_stream", "batch_one_failing", "react_tools",
             "cancel_mid_stream", "request_timeout", "bad_frames", "restart_program"}


def test_the_fixture_folder_holds_every_scenario():
    assert SCENARIOS <= {path.stem for path in FIXTURES}


@pytest.mark.parametrize("path", FIXTURES, ids=[path.stem for path in FIXTURES])
def test_fixture_replays(path):
    out = io.StringIO()
    assert replay.run(str(path), out=out) == 0, out.getvalue()
    assert "replay OK" in out.getvalue()
