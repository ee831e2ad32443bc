"""The core through a real worker process: frames, invariants, bad input, exits."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import RemoteError, Worker
from bridge.wire import framing
from tests.conftest import ROOT, spawn


def wait_for_text(path, text: str, timeout: float = 3.0) -> None:
    """Handlers in abandoned threads finish on their own time: poll for what they write."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text() == text:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never held {text!r}")


def unrouted(w: Worker, timeout: float = 5.0) -> dict:
    return w.unrouted.get(timeout=timeout)


def assert_well_formed(call) -> None:
    """Chunks in seq order with no gaps, then exactly one terminal frame, nothing after."""
    kinds = [f["type"] for f in call.frames]
    assert kinds.count("result") + kinds.count("error") == 1
    assert kinds[-1] in ("result", "error")
    assert [f["seq"] for f in call.frames if f["type"] == "chunk"] == list(range(kinds.count("chunk")))


# ---- frames and commands -------------------------------------------------------------

def test_ready_is_first_and_describes_the_worker(worker):
    ready = worker.ready
    assert ready["type"] == "ready" and ready["protocol"] == 1
    assert ready["pid"] == worker.proc.pid and isinstance(ready["version"], str)
    assert {"ping", "echo", "stats", "stream_count", "sleep", "rpc_loop", "test.print"} <= set(ready["commands"])
    assert "chunks" in ready["capabilities"]


def test_ping_echo_stats(worker):
    assert worker.call("ping")["pong"] is True
    args = {"b": b"\x00\xff", "s": "héllo ✓", "n": [1, -2**63, 2**64 - 1, 1.5, None, True], "m": {"k": {}}}
    assert worker.call("echo", args) == args
    stats = worker.call("stats")
    for key in ("uptime_s", "in_flight", "frames_in", "frames_out", "rss_bytes"):
        assert key in stats
    assert stats["frames_in"] >= 3 and stats["rss_bytes"] > 0


def test_every_handler_kind_streams_and_returns(worker):
    for command, chunks, result in [
        ("test.async_gen", [{"i": 0}, {"i": 1}, {"i": 2}], None),
        ("test.sync_gen", [0, 1, 2], {"done": 3}),
        ("test.emit", [0, 1, 2], {"emitted": 3}),
        ("stream_count", [0, 1, 2], None),
    ]:
        call = worker.request(command, {"n": 3})
        assert list(call) == chunks
        assert call.result() == result
        assert_well_formed(call)
    call = worker.request("stream_count", {"n": 2, "size": 1024})
    assert list(call) == [bytes(1024)] * 2


def test_string_ids_and_missing_args(worker):
    assert worker.request("echo", id="req-1").result() == {}


def test_two_streams_interleave(worker):
    a = worker.request("test.async_gen", {"n": 5, "delay": 0.02})
    b = worker.request("test.async_gen", {"n": 5, "delay": 0.02})
    assert list(a) == list(b) == [{"i": i} for i in range(5)]
    a.result(), b.result()
    assert_well_formed(a), assert_well_formed(b)
    assert a.arrivals[0] < b.arrivals[-2] and b.arrivals[0] < a.arrivals[-2]  # interleaved, not one after the other


def test_ping_is_answered_while_threads_are_busy(worker):
    sleepers = [worker.request("test.sync_gen", {"n": 1, "delay": 1.0}) for _ in range(4)]
    for s in sleepers:
        assert next(s.chunks()) == 0  # its thread runs: now blocked for 1 s
    started = time.perf_counter()
    worker.call("ping")
    assert time.perf_counter() - started < 0.1
    for s in sleepers:
        s.result()


# ---- invariants under cancel, timeout and crash ----------------------------------------

def test_cancel_closes_an_async_generator(worker, tmp_path):
    marker = tmp_path / "closed"
    call = worker.request("test.async_gen", {"n": 1000, "delay": 0.01, "marker": str(marker)})
    it = call.chunks()
    next(it), next(it)
    call.cancel()
    with pytest.raises(RemoteError) as exc:
        call.result()
    assert exc.value.type == "cancelled"
    assert_well_formed(call)
    assert marker.read_text() == "closed"
    assert worker.call("ping")["pong"]  # frames come in order: anything for the cancelled id came before
    assert worker.unrouted.empty()


def test_cancel_of_a_thread_is_prompt_and_the_sync_generator_is_closed(worker, tmp_path):
    marker = tmp_path / "closed"
    call = worker.request("test.sync_gen", {"n": 100, "delay": 0.05, "marker": str(marker)})
    next(call.chunks())
    started = time.perf_counter()
    call.cancel()
    with pytest.raises(RemoteError, match="cancelled"):
        call.result()
    assert time.perf_counter() - started < 0.1
    wait_for_text(marker, "closed")
    assert_well_formed(call)


def test_timeout_of_a_blocked_thread_is_written_within_100ms(worker):
    started = time.perf_counter()
    call = worker.request("sleep", {"seconds": 5}, timeout_ms=50)
    with pytest.raises(RemoteError) as exc:
        call.result()
    elapsed = time.perf_counter() - started
    assert exc.value.type == "timeout" and exc.value.details == {"timeout_ms": 50}
    assert 0.05 <= elapsed < 0.15
    assert_well_formed(call)


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cooperative_handlers_see_ctx_cancelled(worker, tmp_path, how):
    marker = tmp_path / "noticed"
    fields = {"timeout_ms": 1000} if how == "timeout" else {}
    call = worker.request("test.cooperative", {"marker": str(marker)}, **fields)
    assert next(call.chunks()) == "started"  # the thread runs: a loaded machine cannot skip it
    if how == "cancel":
        call.cancel()
    with pytest.raises(RemoteError, match="cancelled" if how == "cancel" else "timeout"):
        call.result()
    wait_for_text(marker, "noticed")


def test_a_handler_that_returns_once_its_deadline_passed_has_timed_out(worker):
    """``ctx.cancelled`` turns true when ``timeout_ms`` has passed; a handler that returns then,
    before the loop's timer has cancelled it, still ends with ``timeout``, not its result."""
    for _ in range(5):
        with pytest.raises(RemoteError, match="timeout"):
            worker.call("test.cooperative_async", {}, timeout_ms=20)


def test_handler_errors(worker):
    with pytest.raises(RemoteError) as exc:
        worker.call("test.raise", {"message": "kaput"})
    assert exc.value.type == "handler_error" and exc.value.message == "kaput"
    assert exc.value.details == {"exception": "ValueError"}
    assert "ValueError: kaput" in exc.value.frame["error"]["traceback"]
    with pytest.raises(RemoteError) as exc:
        worker.call("test.peer_error")
    assert exc.value.type == "bad_request" and exc.value.details == {"field": "x"}
    assert "traceback" not in exc.value.frame["error"]
    with pytest.raises(RemoteError, match="cannot be sent as msgpack"):
        worker.call("test.unserializable")
    assert worker.call("ping")["pong"]


def test_cancel_for_unknown_or_finished_ids_is_ignored(worker):
    call = worker.request("echo", {"x": 1})
    call.result()
    call.cancel()
    worker.send({"type": "cancel", "id": "never"})
    worker.send({"type": "credit", "id": "never", "n": 1})
    assert worker.call("ping")["pong"]
    assert worker.unrouted.empty()


@pytest.mark.parametrize("frame, field", [
    ({"type": "cancel", "id": True}, "id"),
    ({"type": "cancel", "id": [1]}, "id"),
    ({"type": "credit", "id": 1.0, "n": 1}, "id"),
    ({"type": "credit", "id": "x" * 257, "n": 1}, "id"),
    ({"type": "rpc_response", "rpc_id": True, "ok": True, "result": 1}, "rpc_id"),
    ({"type": "rpc_response", "rpc_id": None, "ok": True}, "rpc_id"),
])
def test_bad_ids_in_cancel_credit_and_rpc_response_are_bad_frames(frame, field):
    """A bool is no id: ``cancel`` with ``id: true`` must not cancel request 1, nor ``rpc_id: true``
    answer parked call 1."""
    with spawn() as w:
        one = w.request("test.tool", {"tool": "t"}, id=1)
        parked = w.rpc_requests.get(timeout=5)
        assert parked["rpc_id"] == 1
        w.send(frame)
        error = unrouted(w)
        assert error["id"] is None and error["error"]["type"] == "bad_frame"
        assert error["error"]["details"]["field"] == field
        w.respond(1, "answered")
        assert one.result() == "answered"


# ---- bad input ----------------------------------------------------------------------------

def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("data, kind, fragment", [
    (raw_frame(b"\xc1\xc1"), "bad_frame", "invalid msgpack"),
    (framing.encode([1, 2, 3]), "bad_frame", "not a map"),
    (framing.encode({"id": 1}), "bad_frame", "no 'type'"),
    (framing.encode({"type": "launch"}), "bad_frame", "unknown frame type"),
    (framing.encode({"type": "request", "id": {"x": 1}, "command": "ping"}), "bad_request", "'id'"),
    (framing.encode({"type": "rpc_response", "ok": "yes"}), "bad_frame", "rpc_response"),
])
def test_bad_frames_get_an_id_less_error_and_the_loop_goes_on(worker, data, kind, fragment):
    worker.send_raw(data)
    frame = unrouted(worker)
    assert frame["type"] == "error" and frame["id"] is None
    assert frame["error"]["type"] == kind and fragment in frame["error"]["message"]
    assert worker.call("ping")["pong"]


@pytest.mark.parametrize("fields, fragment", [
    ({"command": 5}, "'command'"),
    ({"command": "echo", "args": [1]}, "'args'"),
    ({"command": "echo", "timeout_ms": "soon"}, "'timeout_ms'"),
    ({"command": "echo", "session_id": 1}, "'session_id'"),
])
def test_bad_requests_name_their_id(worker, fields, fragment):
    call = worker.request("unused", id="x")  # registers the id; the frame below replaces it
    worker.send({"type": "request", "id": "x", **fields})
    with pytest.raises(RemoteError) as exc:
        call.result()
    assert exc.value.type in ("bad_request", "unknown_command")


def test_unknown_command_lists_the_commands(worker):
    with pytest.raises(RemoteError) as exc:
        worker.call("no.such.command")
    assert exc.value.type == "unknown_command"
    assert "ping" in exc.value.details["available"]


def test_duplicate_id_is_refused_and_the_first_request_is_untouched(worker):
    first = worker.request("sleep", {"seconds": 0.2}, id=42)
    worker.send({"type": "request", "id": 42, "command": "ping"})
    frame = unrouted(worker)
    assert frame["id"] is None and frame["error"]["type"] == "duplicate_id"
    assert frame["error"]["details"] == {"id": 42}
    assert first.result() == {"slept": 0.2}
    assert worker.request("ping", id=42).result()["pong"]  # finished ids can be reused


def test_requests_beyond_max_inflight_are_refused():
    with spawn("--max-inflight", "2") as w:
        running = [w.request("sleep", {"seconds": 0.3}) for _ in range(2)]
        with pytest.raises(RemoteError) as exc:
            w.call("sleep", {"seconds": 0})
        assert exc.value.type == "overloaded" and exc.value.details == {"limit": 2}
        assert w.call("ping")["pong"]  # inline commands are never refused
        for call in running:
            call.result()
        assert w.call("sleep", {"seconds": 0}) == {"slept": 0}


def test_oversize_frame_is_skipped_and_the_stream_stays_in_sync():
    with spawn("--max-frame-bytes", "1000") as w:
        w.send({"type": "request", "id": 1, "command": "echo", "args": {"b": bytes(5000)}})
        frame = unrouted(w)
        assert frame["error"]["type"] == "frame_too_large" and frame["id"] is None
        assert frame["error"]["details"]["limit"] == 1000
        assert w.call("echo", {"ok": 1}) == {"ok": 1}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_random_frame_bodies_never_kill_the_worker(shared_worker, body):
    shared_worker.send_raw(raw_frame(body))
    assert shared_worker.call("ping", timeout=5)["pong"]
    assert shared_worker.proc.poll() is None


@settings(max_examples=8, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_raw_garbage_then_eof_gives_only_valid_frames_and_exit_0(garbage):
    proc = subprocess.run([sys.executable, "-m", "bridge", "serve"], input=garbage, capture_output=True,
                          timeout=20, cwd=ROOT)
    assert proc.returncode == 0
    decoder = framing.Decoder(max_frame_bytes=2**32 - 1)
    events = decoder.feed(proc.stdout) + decoder.close()
    assert all(isinstance(e, framing.Frame) for e in events)
    assert events[0].body["type"] == "ready"
    assert all(e.body["type"] in ("result", "error") for e in events[1:])


@pytest.fixture(scope="module")
def shared_worker():
    with spawn() as w:
        yield w


# ---- stdout protection ----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["test.print", "test.tqdm"])
def test_printing_never_reaches_the_frame_stream(worker, command):
    assert worker.call(command)
    assert worker.call("ping")["pong"]
    assert worker.unrouted.empty()


# ---- shutdown, EOF, signals ----------------------------------------------------------------

def test_shutdown_finishes_in_flight_and_refuses_new_requests(worker):
    slow = worker.request("sleep", {"seconds": 0.3})
    worker.send({"type": "shutdown"})
    late = worker.request("ping")
    with pytest.raises(RemoteError, match="shutting_down"):
        late.result()
    assert slow.result() == {"slept": 0.3}
    assert worker.wait(5) == 0


def test_drain_timeout_ends_stuck_requests_with_a_terminal_frame():
    with spawn("--drain-timeout", "0.2") as w:
        stuck = w.request("sleep", {"seconds": 30})
        started = time.perf_counter()
        w.send({"type": "shutdown"})
        with pytest.raises(RemoteError) as exc:
            stuck.result()
        assert exc.value.type == "shutting_down"
        assert w.wait(5) == 0
        assert time.perf_counter() - started < 1.5


def test_eof_with_output_open_drains_like_a_shell_pipe(worker):
    slow = worker.request("sleep", {"seconds": 0.3})
    worker.close_input()
    assert slow.result() == {"slept": 0.3}
    assert worker.wait(5) == 0


def test_sigterm_is_a_shutdown(worker):
    slow = worker.request("sleep", {"seconds": 0.2})
    assert worker.call("ping")["pong"]  # the sleep request, sent before, has been read and dispatched
    worker.proc.send_signal(signal.SIGTERM)
    assert slow.result() == {"slept": 0.2}
    assert worker.wait(5) == 0


def test_a_native_crash_leaves_every_threads_stack_and_the_host_reports_it(tmp_path):
    """faulthandler writes the stacks to stderr; the host's error gives the status and that stderr."""
    with open(tmp_path / "stderr", "w+") as log, spawn(stderr=log) as w:
        slow = w.request("sleep", {"seconds": 30})
        with pytest.raises(ConnectionError) as info:
            w.call("test.segfault")
        report = str(info.value)
        assert "exit status -11" in report and "Fatal Python error: Segmentation fault" in report, report
        assert "in segfault" in report, report  # the crashing handler's frame
        for failing in (slow.result, lambda: w.call("ping")):
            with pytest.raises(ConnectionError, match="exit status -11"):
                failing()


def test_a_stderr_that_cannot_be_read_back_still_gives_the_exit_status(tmp_path):
    with open(tmp_path / "stderr", "w") as write_only, spawn(stderr=write_only) as w:
        w.proc.send_signal(signal.SIGKILL)
        with pytest.raises(ConnectionError, match="exit status -9"):
            w.call("ping")


def test_port_close_exits_within_200ms_while_a_thread_is_blocked():
    """Both pipes closed, as Erlang's port_close does: no drain, exit at once."""
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "serve", "--diagnostics"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    decoder = framing.Decoder()
    assert decoder.feed(os.read(proc.stdout.fileno(), 65536))[0].body["type"] == "ready"
    proc.stdin.write(framing.encode({"type": "request", "id": 1, "command": "sleep", "args": {"seconds": 30}}))
    proc.stdin.write(framing.encode({"type": "request", "id": 2, "command": "ping"}))
    proc.stdin.flush()
    frames: list = []
    while not frames:  # the ping's reply: the sleep request, sent before it, has been dispatched
        frames = decoder.feed(os.read(proc.stdout.fileno(), 65536))
    assert frames[0].body["id"] == 2
    started = time.perf_counter()
    proc.stdout.close()
    proc.stdin.close()
    proc.wait(5)
    assert time.perf_counter() - started < 0.2


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state, start time) of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], fields[19]


def test_no_child_process_outlives_the_worker(worker):
    child = worker.call("test.spawn_child")["child_pid"]
    state = _process_state(child)
    assert state is not None and state[0] != "Z", "the child should be running"
    worker.close_input()
    assert worker.wait(10) == 0
    deadline = time.time() + 5  # the kill is at once; reaping by init can lag on a loaded machine
    while time.time() < deadline:
        now = _process_state(child)
        if now is None or now[0] == "Z" or now[1] != state[1]:  # gone, dead, or its pid reused
            return
        time.sleep(0.01)
    pytest.fail(f"child {child} outlived the worker: {now}")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_both_event_loops_serve_every_kind_of_frame(loop):
    """``--loop``: uvloop (the default where it is installed) and asyncio's own loop serve the same
    frames: inline replies, a stream, host tool calls, a cancel, and EOF after a shutdown."""
    with spawn("--loop", loop, tools={"echo": lambda i: i}) as w:
        assert w.call("stats")["loop"] == loop
        assert w.call("echo", {"x": [1, "two"]}) == {"x": [1, "two"]}
        assert list(w.request("stream_count", {"n": 50})) == list(range(50))
        assert w.call("rpc_loop", {"n": 20, "concurrency": 4})["n"] == 20
        slow = w.request("sleep", {"seconds": 5})
        slow.cancel()
        with pytest.raises(RemoteError) as info:
            slow.result()
        assert info.value.type == "cancelled"
        assert w.shutdown() == 0


def test_the_shell_pipe_example_from_the_readme():
    line = '{"type":"request","id":1,"command":"ping"}'
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' '{line}' | dspy-bridge encode | dspy-bridge serve | dspy-bridge decode"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert '"type":"ready"' in lines[0] and '"pong":true' in lines[1] and len(lines) == 2


def test_handler_modules_that_fail_to_import_stop_the_worker_with_a_message():
    out = subprocess.run([sys.executable, "-m", "bridge", "--handlers", "no.such.module"], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2 and "no.such.module" in out.stderr and out.stdout == ""
