"""Bounds and faults through the worker process (issue 13): credit, threads, ids, errors in task groups,
sessions, orphans, strict arguments, throttled logs, expression limits."""

from __future__ import annotations

import os
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    seen = {}
    for chunk in call.chunks(timeout=10):
        seen[chunk["index"]] = chunk["outputs"]["answer"]
        w.send({"type": "credit", "id": call.id, "n": 1})
    assert call.result() == {"total": 12, "succeeded": 12, "failed": 0}
    assert seen == {i: q.upper() for i, q in enumerate(questions)}


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


# ---- a true thread bound ------------------------------------------------------------------------

def thread_names(pid: int) -> list[str]:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass  # the thread exited meanwhile
    return names


def warmed_up(w) -> None:
    """Returns once the DSPy warm-up (which holds a worker thread) is over: DSPy commands wait for it."""
    w.call("lm.configure", {"model": "scripted/demo", "script": []})


def until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` (a round trip to the worker) until it holds: for what sends no frame."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def barrier(w) -> None:
    """Returns once every request sent before has started: request tasks start in arrival order."""
    w.call("test.emit", {"n": 0})


def test_a_cancelled_thread_counts_against_max_threads_until_it_returns():
    with spawn("--max-threads", "2") as w:
        warmed_up(w)
        blocked = [w.request("test.sync_gen", {"n": 2, "delay": 2.0}) for _ in range(2)]
        for call in blocked:
            assert next(call.chunks()) == 0  # its thread runs, and now sleeps 2 s
        waiting = w.request("sleep", {"seconds": 0})
        barrier(w)
        assert w.call("stats")["threads"] == {"busy": 2, "abandoned": 0, "queued": 1}
        for call in blocked:
            call.cancel()
            with pytest.raises(RemoteError, match="cancelled"):
                call.result()
        assert w.call("stats")["threads"] == {"busy": 2, "abandoned": 2, "queued": 1}
        assert waiting.result() == {"slept": 0}  # only once an abandoned thread returned
        assert waiting.terminal["meta"]["queue_ms"] > 500
        until(lambda: w.call("stats")["threads"] == {"busy": 0, "abandoned": 0, "queued": 0})
        assert sum(name.startswith("bridge-thread") for name in thread_names(w.proc.pid)) <= 2


def test_calls_beyond_the_thread_queue_are_overloaded():
    with spawn("--max-threads", "1", "--max-thread-queue", "2") as w:
        warmed_up(w)
        running = w.request("test.sync_gen", {"n": 1, "delay": 0.5})
        assert next(running.chunks()) == 0
        queued = [w.request("sleep", {"seconds": 0}) for _ in range(2)]
        barrier(w)
        with pytest.raises(RemoteError) as info:
            w.call("sleep", {"seconds": 0})
        assert info.value.type == "overloaded"
        assert info.value.details == {"max_threads": 1, "max_thread_queue": 2, "busy": 1, "abandoned": 0,
                                      "queued": 2}
        assert running.result() == {"done": 1}
        assert [call.result() for call in queued] == [{"slept": 0}] * 2


# ---- strict arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("command, args, details", [
    ("sleep", {"ms": 200}, {"argument": "ms", "known": ["seconds"]}),
    ("session.create", {"session_id": "x"}, {"argument": "session_id", "known": ["ttl_s"]}),
    ("dspy.predict", {"signatur": QA, "inputs": {"question": "q"}},
     {"argument": "signatur", "did_you_mean": "signature",
      "known": ["config", "inputs", "instructions", "max_iters", "module", "signature", "tools"]}),
    ("ping", {"x": 1}, {"argument": "x", "known": []}),
    ("test.declared", {"alpha": 1, "betta": 2}, {"argument": "betta", "did_you_mean": "beta", "known": ["alpha", "beta"]}),
])
def test_an_unknown_argument_is_a_bad_request_naming_it(w, command, args, details):
    with pytest.raises(RemoteError) as info:
        w.call(command, args, session_id=new_session_id())
    assert info.value.type == "bad_request" and info.value.details == details
    assert repr(details["argument"]) in info.value.message


def test_free_form_arguments_stay_free(w):
    assert w.call("echo", {"anything": 1, "at": "all"}) == {"anything": 1, "at": "all"}
    assert w.call("test.declared", {"alpha": 1}) == {"alpha": 1}
    assert w.call("test.emit", {"n": 1, "extra": True}) == {"emitted": 1}  # declares nothing: free-form


# ---- bounded sessions ----------------------------------------------------------------------------

def test_one_session_more_than_max_sessions_is_overloaded():
    with spawn("--max-sessions", "3") as w:
        for sid in ("a", "b", "c"):
            w.call("session.create", {}, session_id=sid)
        with pytest.raises(RemoteError) as info:
            w.call("session.create", {}, session_id="d")
        assert info.value.type == "overloaded" and info.value.details == {"max_sessions": 3}
        w.call("session.close", {}, session_id="a")
        assert w.call("session.create", {}, session_id="d") == {"session_id": "d", "ttl_s": None}
        assert w.call("stats")["sessions"] == 3


def test_an_implicit_session_expires_and_says_so_once():
    with spawn("--session-ttl", "0.2") as w:
        configure(w, "implicit", [{"answer": "a"}])
        w.call("session.create", {}, session_id="explicit")  # no ttl_s: kept until closed
        until(lambda: w.call("stats")["sessions"] == 1)  # the sweep ended the implicit one
        predict = {"signature": QA, "inputs": {"question": "q"}}
        with pytest.raises(RemoteError) as info:
            w.call("dspy.predict", predict, session_id="implicit")
        assert info.value.type == "unknown_session"
        assert info.value.details == {"session_id": "implicit", "reason": "expired"}
        with pytest.raises(RemoteError) as info:  # said once: now a fresh session, with no LM
            w.call("dspy.predict", predict, session_id="implicit")
        assert info.value.type == "lm_not_configured"


@pytest.mark.parametrize("opener, args", [
    ("lm.configure", {"model": "scripted/demo", "script": []}),
    ("session.create", {"ttl_s": 60}),
    ("program.load", {"module": "Predict", "signature": QA}),
])
def test_commands_that_open_a_session_start_a_closed_one_afresh(w, opener, args):
    if opener == "program.load":
        ref = w.call("program.create", {"module": "Predict", "signature": QA})["ref"]
        args = {**args, "state": w.call("program.save", {"ref": ref})["state"]}
    session = new_session_id()
    w.call("session.create", {}, session_id=session)
    w.call("session.close", {}, session_id=session)
    w.call(opener, args, session_id=session)  # no unknown_session
    assert w.call("session.close", {}, session_id=session) == {"closed": True}


@pytest.mark.parametrize("fields, args", [
    ({"session_id": ""}, {}),
    ({"session_id": "x" * 257}, {}),
    ({"session_id": "é" * 129}, {}),  # 258 bytes
    ({}, {"ttl_s": float("nan")}),
    ({}, {"ttl_s": float("inf")}),
    ({}, {"ttl_s": 0}),
])
def test_bad_session_ids_and_ttls_are_bad_requests(w, fields, args):
    with pytest.raises(RemoteError) as info:
        w.call("session.create", args, **{"session_id": new_session_id(), **fields})
    assert info.value.type == "bad_request"


# ---- no orphans ------------------------------------------------------------------------------------

def process_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1]), fields[19]


def ended(pid: int, started: str) -> bool:
    now = process_stat(pid)
    return now is None or now[0] == "Z" or now[2] != started  # gone, dead, or its pid reused


def test_double_forked_and_thread_spawned_descendants_end_with_the_worker():
    with spawn() as w:
        grandchild = w.call("test.double_fork")["grandchild_pid"]
        state = process_stat(grandchild)
        assert state is not None and state[0] != "Z"
        assert state[1] == w.proc.pid  # adopted by the worker, a child subreaper, not by init
        children = w.call("test.spawn_from_threads", {"n": 3})["pids"]
        started = {pid: process_stat(pid)[2] for pid in [grandchild, *children]}
        w.close_input()
        assert w.wait(10) == 0
    until(lambda: all(ended(pid, start) for pid, start in started.items()))


def test_an_adopted_orphan_that_exits_is_reaped():
    with spawn() as w:
        grandchild = w.call("test.double_fork", {"seconds": 0})["grandchild_pid"]
        until(lambda: process_stat(grandchild) is None)  # no zombie left under the worker
        assert w.proc.poll() is None


def test_reaping_never_takes_the_exit_status_of_a_child_user_code_waits_for(w):
    assert w.call("test.child_status") == {"returncode": 7}


UV_SUBPROCESS = """
import asyncio, os, signal, time, uvloop
from bridge.worker import children

async def main():
    children.track_spawns()
    proc = await asyncio.create_subprocess_exec("sleep", "60")  # libuv's spawn: not recorded
    # Ended only now, with the loop blocked from here on: libuv cannot reap it before the sweep
    # (a child that exits by itself may be reaped during the spawn's own awaits, and never seen).
    os.kill(proc.pid, signal.SIGTERM)
    while children._state(proc.pid) != "Z":
        time.sleep(0.005)  # the loop is blocked: libuv cannot reap it yet
    first = children.reap_adopted()  # the sweep sees an unrecorded zombie for the first time
    status = await proc.wait()  # the loop runs: libuv reaps its own child
    print(first, children.reap_adopted(), status)

uvloop.run(main())
"""


def test_the_sweep_leaves_a_child_of_uvloop_to_its_own_wait():
    """uvloop spawns from C, so its children look adopted: the sweep reaps an adopted zombie only on
    its second sighting, after libuv has waited for its own."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", UV_SUBPROCESS], capture_output=True, text=True, timeout=30,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]", str(-signal.SIGTERM)]


# ---- throttled logs ----------------------------------------------------------------------------------

def test_stray_rpc_responses_are_logged_at_most_once_a_second_with_a_count(tmp_path):
    with open(tmp_path / "stderr", "w+") as log, spawn(stderr=log) as w:
        started = time.monotonic()
        for i in range(2000):
            w.send({"type": "rpc_response", "rpc_id": 10_000 + i, "ok": True, "result": None})
        assert w.call("ping")["pong"]  # every stray answer was read before it
        elapsed = time.monotonic() - started

        def counted() -> bool:  # one more stray answer, until a line with the count is logged
            w.send({"type": "rpc_response", "rpc_id": 1, "ok": True})
            w.call("ping")
            log.seek(0)
            return "more like it since the last one logged" in log.read()

        until(counted)
        log.seek(0)
        lines = [line for line in log if "ignoring rpc_response" in line]
        assert len(lines) <= 2 + elapsed + (time.monotonic() - started)


# ---- smaller faults ------------------------------------------------------------------------------------

@pytest.mark.parametrize("condition, position", [
    ("(" * 1000 + "ok" + ")" * 1000, 64),
    ("n == " + "9" * 5000, 5),
])
def test_an_over_deep_condition_or_a_huge_number_is_a_bad_request_with_its_position(w, condition, position):
    steps = [{"branch": {"if": condition, "then": []}}]
    with pytest.raises(RemoteError) as info:
        w.call("pipeline.create", {"name": "p", "steps": steps}, session_id=new_session_id())
    assert info.value.type == "bad_request"
    assert info.value.details == {"path": "0", "position": position}


# ---- the protocol boundary, through the process ------------------------------------------------------

packable = st.integers(min_value=-2**63, max_value=2**64 - 1)  # every int msgpack can carry
ids = st.one_of(st.booleans(), st.none(), st.floats(allow_nan=False), packable,
                st.text(max_size=300), st.binary(max_size=8), st.lists(packable, max_size=2))


@pytest.fixture(scope="module")
def parked_host():
    """A worker with one call parked as request 1, rpc_id 1: stray ids must leave it alone."""
    with spawn() as worker:
        worker.call("ping")  # takes the client's id 1; the host pings that follow take 2, 3, ...
        call = worker.request("test.tool", {"tool": "t"}, id=1)
        assert worker.rpc_requests.get(timeout=5)["rpc_id"] == 1
        yield worker, call
        worker.respond(1, "still parked")
        assert call.result() == "still parked"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["cancel", "credit", "rpc_response"]), ids)
def test_any_id_in_cancel_credit_or_rpc_response_is_answered_or_ignored_never_misrouted(parked_host, kind, rid):
    w, call = parked_host
    frame = {"type": kind, "n": 1, "ok": True, "result": "stray"}
    frame["rpc_id" if kind == "rpc_response" else "id"] = rid
    if type(rid) is int and rid == 1:  # the real id: that would be a real cancel or answer
        frame["rpc_id" if kind == "rpc_response" else "id"] = 10**12
    w.send(frame)
    assert w.call("ping")["pong"]
    while not w.unrouted.empty():
        error = w.unrouted.get()
        assert error["id"] is None and error["error"]["type"] == "bad_frame"
    assert call.terminal is None and call._queue.empty()  # request 1 is untouched
