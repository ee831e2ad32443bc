"""Bounds, faults and cancellation through the worker process (issue 13)."""

from __future__ import annotations

import pytest

from bridge import RemoteError
from tests.conftest import new_session_id, spawn

QA = "question -> answer"


@pytest.fixture(scope="module")
def w():
    with spawn() as worker:
        yield worker


def configure(w, session: str, script: list, **options) -> None:
    w.call("lm.configure", {"model": "scripted/demo", "script": script, **options}, session_id=session)


# ---- credit ---------------------------------------------------------------------------------

def test_a_batch_with_four_lanes_and_window_1_delivers_every_item(w):
    """Four lanes wait for credit on one request: each must be woken, none lost."""
    session = new_session_id()
    questions = [f"q{i}" for i in range(12)]
    configure(w, session, [{"when": {"question": q}, "reply": {"answer": q.upper()}} for q in questions])
    call = w.request("dspy.batch", {"signature": QA, "items": [{"question": q} for q in questions],
                                    "concurrency": 4}, session_id=session, window=1)
    seen = []
    for chunk in call.chunks(timeout=10):
        seen.append(chunk["index"])
        w.send({"type": "credit", "id": call.id, "n": 1})
    assert call.result() == {"total": 12, "succeeded": 12, "failed": 0}
    assert sorted(seen) == list(range(12))
