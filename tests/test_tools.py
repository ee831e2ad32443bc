"""The tool bridge through a real worker: parked host calls, answered by hand or by host tools."""

from __future__ import annotations

import time

import pytest

from bridge import RemoteError
from tests.conftest import spawn


@pytest.fixture
def host():
    """A worker whose rpc_requests wait in ``host.rpc_requests`` for a hand-written answer."""
    with spawn("--tool-timeout-ms", "5000") as w:
        yield w


def parked(w, n: int, timeout: float = 5.0) -> list[dict]:
    return [w.rpc_requests.get(timeout=timeout) for _ in range(n)]


def test_rpc_request_frame_and_answers_out_of_order(host):
    calls = [host.request("test.tool", {"tool": "lookup", "args": [i], "kwargs": {"k": "v"}}) for i in range(3)]
    requests = sorted(parked(host, 3), key=lambda f: f["args"][0])
    first = requests[0]
    assert first["type"] == "rpc_request" and first["tool"] == "lookup"
    assert first["id"] == calls[0].id and first["kwargs"] == {"k": "v"} and first["timeout_ms"] == 5000
    assert len({r["rpc_id"] for r in requests}) == 3
    for r in reversed(requests):
        host.respond(r["rpc_id"], {"answer": r["args"][0] * 10})
    assert [c.result() for c in calls] == [{"answer": 0}, {"answer": 10}, {"answer": 20}]


def test_error_answer_raises_tool_error(host):
    call = host.request("test.tool", {"tool": "db"})
    (req,) = parked(host, 1)
    host.respond(req["rpc_id"], error={"type": "not_found", "message": "no such row"})
    with pytest.raises(RemoteError) as exc:
        call.result()
    assert exc.value.type == "tool_error" and exc.value.message == "no such row"
    assert exc.value.details == {"tool_error": "not_found"}


def test_unanswered_call_times_out_and_is_cancelled_on_the_host(host):
    started = time.perf_counter()
    call = host.request("test.tool", {"tool": "slow", "timeout_ms": 100})
    (req,) = parked(host, 1)
    assert req["timeout_ms"] == 100
    with pytest.raises(RemoteError) as exc:
        call.result()
    assert exc.value.details == {"exception": "TimeoutError"} and "100 ms" in exc.value.message
    assert 0.1 <= time.perf_counter() - started < 1
    assert host.rpc_cancels.get(timeout=1) == {"type": "rpc_cancel", "rpc_id": req["rpc_id"]}
    # a late answer, a duplicate and an invented rpc_id are ignored
    host.respond(req["rpc_id"], "late")
    host.respond(req["rpc_id"], "late again")
    host.respond(987654, "invented")
    assert host.call("ping")["pong"] and host.unrouted.empty()


def test_duplicate_answer_is_ignored(host):
    call = host.request("test.tool", {"tool": "t"})
    (req,) = parked(host, 1)
    host.respond(req["rpc_id"], 1)
    host.respond(req["rpc_id"], 2)
    assert call.result() == 1
    assert host.call("ping")["pong"] and host.unrouted.empty()


def test_cancelling_the_parent_cancels_its_three_parked_calls(host):
    call = host.request("rpc_loop", {"n": 3, "concurrency": 3})
    requests = parked(host, 3)
    call.cancel()
    with pytest.raises(RemoteError, match="cancelled"):
        call.result()
    cancels = {host.rpc_cancels.get(timeout=1)["rpc_id"] for _ in range(3)}
    assert cancels == {r["rpc_id"] for r in requests}
    assert host.call("stats")["tool_calls_parked"] == 0


def test_cancelling_a_thread_parked_in_the_blocking_twin(host):
    call = host.request("test.tool_blocking", {"tool": "t"})
    (req,) = parked(host, 1)
    call.cancel()
    with pytest.raises(RemoteError, match="cancelled"):
        call.result()
    assert host.rpc_cancels.get(timeout=1)["rpc_id"] == req["rpc_id"]
    blocking = host.request("test.tool_blocking", {"tool": "t", "args": [5]})
    (req,) = parked(host, 1)
    host.respond(req["rpc_id"], 5)
    assert blocking.result() == 5


def test_eof_while_parked_cancels_the_calls_and_exits_0(host):
    call = host.request("rpc_loop", {"n": 2, "concurrency": 2})
    requests = parked(host, 2)
    host.close_input()
    with pytest.raises(RemoteError):
        call.result()
    assert {host.rpc_cancels.get(timeout=1)["rpc_id"] for _ in range(2)} == {r["rpc_id"] for r in requests}
    assert host.wait(5) == 0


def test_a_thousand_parked_calls_across_fifty_requests_leave_nothing_behind(host):
    calls = [host.request("rpc_loop", {"n": 20, "concurrency": 20}) for _ in range(50)]
    requests = parked(host, 1000)
    stats = host.call("stats")
    assert stats["tool_calls_parked"] == 1000 and stats["in_flight"] == 50
    for r in reversed(requests):
        host.respond(r["rpc_id"], r["args"][0])
    assert all(c.result()["n"] == 20 for c in calls)
    stats = host.call("stats")
    assert stats["tool_calls_parked"] == 0 and stats["in_flight"] == 0


def test_reentrant_request_while_a_call_is_parked():
    """The host's tool asks the worker for something else before it answers."""
    holder = {}

    def ask(question):
        return {"echoed": holder["w"].call("echo", {"q": question})}

    with spawn(tools={"ask": ask, "echo": lambda i: i}) as w:
        holder["w"] = w
        assert w.call("test.tool", {"tool": "ask", "args": ["why"]}) == {"echoed": {"q": "why"}}
        assert w.call("rpc_loop", {"n": 200, "concurrency": 10})["n"] == 200


def test_unknown_host_tool_is_an_error_answer():
    with spawn(tools={}) as w:
        with pytest.raises(RemoteError) as exc:
            w.call("test.tool", {"tool": "missing"})
        assert exc.value.details == {"tool_error": "LookupError"}
