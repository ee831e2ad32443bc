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


# ---- errors keep their type through task groups ---------------------------------------------

@pytest.fixture
def host():
    """A worker whose host calls wait in ``rpc_requests`` for a hand-written answer."""
    with spawn("--tool-timeout-ms", "300") as worker:
        yield worker


def parked(w, n: int) -> list[dict]:
    return [w.rpc_requests.get(timeout=5) for _ in range(n)]


def test_a_failing_host_tool_in_a_task_group_is_a_tool_error(host):
    call = host.request("rpc_loop", {"n": 2, "concurrency": 2})
    first, _ = parked(host, 2)
    host.respond(first["rpc_id"], error={"type": "not_found", "message": "no such row"})
    with pytest.raises(RemoteError) as info:
        call.result()
    assert info.value.type == "tool_error" and info.value.details == {"tool_error": "not_found"}
    assert info.value.message == "no such row"


def test_tool_timeouts_in_a_task_group_keep_their_meaning(host):
    call = host.request("rpc_loop", {"n": 2, "concurrency": 2})
    parked(host, 2)
    with pytest.raises(RemoteError) as info:
        call.result()
    assert info.value.type == "handler_error" and info.value.details == {"exception": "TimeoutError"}
    assert "did not answer within 300 ms" in info.value.message


def test_eof_while_calls_are_parked_is_host_closed(host):
    call = host.request("rpc_loop", {"n": 2, "concurrency": 2})
    parked(host, 2)
    host.close_input()
    with pytest.raises(RemoteError) as info:
        call.result()
    assert info.value.type == "tool_error" and info.value.details == {"tool_error": "host_closed"}
    assert host.wait(5) == 0
