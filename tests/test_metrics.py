"""Terminal frames' ``meta``, telemetry frames and ``stats`` metrics, through a real worker."""

from __future__ import annotations

import time

import pytest

from bridge import Call, RemoteError
from bridge.observe.metrics import BOUNDS, SLOT_S, WINDOW_SLOTS, Histogram, LmUsage
from bridge.wire import framing
from tests.conftest import new_session_id, spawn
from tests.test_react import SCRIPT as REACT_SCRIPT
from tests.test_react import TOOLS, react_args

META_KEYS = {"duration_ms", "queue_ms", "first_chunk_ms", "chunks", "bytes_out", "tool_calls", "tool_ms"}


def slow_echo(x):
    time.sleep(0.1)
    return x


def host_tools() -> dict:
    return {"slow_echo": slow_echo, "search": lambda query: {"hits": ["330 m"]},
            "calc": lambda expression: round(eval(expression, {"__builtins__": {}}), 1)}


@pytest.fixture(scope="module")
def w():
    with spawn(tools=host_tools()) as worker:
        yield worker


def timed(w, command: str, args: dict, **fields):
    """The call (finished) and its round trip as the host measured it, in ms."""
    started = time.perf_counter()
    call = w.request(command, args, **fields)
    try:
        call.result()
    except RemoteError:
        pass
    return call, (time.perf_counter() - started) * 1000


def events(call) -> list[str]:
    return [f["event"] for f in call.frames if f["type"] == "telemetry"]


# ---- meta ------------------------------------------------------------------------------

def test_inline_request_has_meta(w):
    call, host_ms = timed(w, "echo", {"a": 1})
    meta = call.terminal["meta"]
    assert set(meta) == META_KEYS
    assert meta["chunks"] == meta["bytes_out"] == meta["tool_calls"] == 0 and meta["first_chunk_ms"] is None
    assert 0 <= meta["queue_ms"] <= meta["duration_ms"] <= host_ms


def test_duration_agrees_with_the_host(w):
    call, host_ms = timed(w, "sleep", {"seconds": 0.2})
    meta = call.terminal["meta"]
    assert 200 <= meta["duration_ms"] <= host_ms < meta["duration_ms"] + 50
    assert meta["queue_ms"] < 50


def test_stream_counts_chunks_and_bytes_exactly(w):
    call, _ = timed(w, "stream_count", {"n": 5, "size": 100})
    chunks = [f for f in call.frames if f["type"] == "chunk"]
    meta = call.terminal["meta"]
    assert meta["chunks"] == 5
    assert meta["bytes_out"] == sum(len(framing.encode(f)) for f in chunks)
    assert 0 < meta["first_chunk_ms"] <= meta["duration_ms"]


def test_tool_time_is_the_time_parked_on_the_host(w):
    call, host_ms = timed(w, "test.tool", {"tool": "slow_echo", "args": [7]})
    meta = call.terminal["meta"]
    assert call.terminal["data"] == 7
    assert meta["tool_calls"] == 1
    assert 100 <= meta["tool_ms"] < 160 and meta["tool_ms"] <= meta["duration_ms"] <= host_ms


def test_error_frames_have_meta(w):
    call, host_ms = timed(w, "sleep", {"seconds": 0.5}, timeout_ms=100)
    assert call.terminal["error"]["type"] == "timeout"
    assert 100 <= call.terminal["meta"]["duration_ms"] <= host_ms
    call, _ = timed(w, "test.raise", {})
    assert call.terminal["type"] == "error" and set(call.terminal["meta"]) == META_KEYS


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_request_never_times_out_before_its_timeout_ms(loop):
    """Measured from the read that carried it (``meta``), on either loop: uvloop's clock and timers
    count whole milliseconds, so its deadlines need slack (``Server.deadline_slack``)."""
    calls = []
    with spawn("--loop", loop) as worker:
        for _ in range(150):  # one at a time: each deadline is set at its own point of the loop's clock
            calls.append(worker.request("sleep", {"seconds": 0.01}, timeout_ms=3))
            with pytest.raises(RemoteError):
                calls[-1].result()
        durations = [call.terminal["meta"]["duration_ms"] for call in calls]
    assert all(call.terminal["error"]["type"] == "timeout" for call in calls)
    assert min(durations) >= 3, sorted(durations)[:5]


def test_scripted_lm_usage_is_reported(w):
    sid = new_session_id()
    configure, _ = timed(w, "lm.configure", {"model": "scripted/m", "script": [
        {"answer": "1"}, {"answer": "2"}, {"answer": "3"}, {"answer": "4"}]}, session_id=sid)
    assert configure.terminal["meta"]["lm"] == {"calls": 0, "input_tokens": 0, "output_tokens": 0,
                                                "cost_usd": None, "cache_hits": 0, "cancelled": 0, "failed": 0}
    call, _ = timed(w, "dspy.predict", {"signature": "question -> answer", "inputs": {"question": "q"}},
                    session_id=sid)
    lm = call.terminal["meta"]["lm"]
    assert lm["calls"] == 1 and lm["input_tokens"] > 0 and lm["output_tokens"] > 0
    assert lm["cost_usd"] is None and lm["cache_hits"] == 0  # nobody prices a scripted model
    call, _ = timed(w, "dspy.batch", {"signature": "question -> answer",
                                      "items": [{"question": "a"}, {"question": "b"}]}, session_id=sid)
    assert call.terminal["meta"]["lm"]["calls"] == 2
    call, _ = timed(w, "dspy.stream", {"signature": "question -> answer", "inputs": {"question": "q"}},
                    session_id=sid)
    assert call.terminal["meta"]["lm"]["calls"] == 1 and call.terminal["meta"]["lm"]["output_tokens"] > 0
    stats = w.call("stats")
    assert stats["lm_by_session"][sid]["calls"] == 4
    assert stats["lm"]["calls"] >= 4 and stats["lm"]["input_tokens"] >= 4 * lm["input_tokens"] - 10


def test_a_declared_price_makes_a_cost(w):
    sid = new_session_id()
    w.call("lm.configure", {"model": "scripted/m", "script": [{"answer": "one two three"}],
                            "price": {"input_per_mtok": 2.0, "output_per_mtok": 10.0}}, session_id=sid)
    call, _ = timed(w, "dspy.predict", {"signature": "question -> answer", "inputs": {"question": "q"}},
                    session_id=sid)
    lm = call.terminal["meta"]["lm"]
    assert lm["cost_usd"] == pytest.approx((lm["input_tokens"] * 2.0 + lm["output_tokens"] * 10.0) / 1e6)
    assert w.call("stats")["lm_by_session"][sid]["cost_usd"] == pytest.approx(lm["cost_usd"])
    with pytest.raises(RemoteError) as bad:
        w.call("lm.configure", {"model": "scripted/m", "price": {"input_per_mtok": -1}}, session_id=sid)
    assert bad.value.type == "bad_request"


# ---- telemetry -------------------------------------------------------------------------

def test_react_events_in_order(w):
    sid = new_session_id()
    script = [REACT_SCRIPT[0], REACT_SCRIPT[2], *REACT_SCRIPT[3:]]  # search, calc, finish, extract
    w.call("lm.configure", {"model": "scripted/agent", "script": script}, session_id=sid)
    call, _ = timed(w, "dspy.react", react_args(tools=TOOLS), session_id=sid, telemetry=True)
    assert call.terminal["type"] == "result"
    lm = ["lm_start", "lm_end"]
    tool = ["tool_start", "tool_end"]
    assert events(call) == ["start", *lm, *tool, *lm, *tool, *lm, *lm, "stop"]
    assert call.frames[-2]["event"] == "stop" and call.frames[-2]["measurements"] == call.terminal["meta"]
    tool_ends = [f for f in call.frames if f.get("event") == "tool_end"]
    assert [f["metadata"]["tool"] for f in tool_ends] == ["search", "calc"]
    assert call.terminal["meta"]["lm"]["calls"] == 4 and call.terminal["meta"]["tool_calls"] == 2
    seqs = [f["seq"] for f in call.frames if f["type"] == "chunk"]
    assert seqs == list(range(len(seqs)))


def test_slow_chunk_fires_for_a_delayed_stream_only(w):
    call, _ = timed(w, "test.async_gen", {"n": 3, "delay": 0.15}, telemetry=True)
    slow = [f for f in call.frames if f.get("event") == "slow_chunk"]
    assert [f["metadata"]["seq"] for f in slow] == [1, 2]
    assert all(f["measurements"]["gap_ms"] >= 100 for f in slow)
    call, _ = timed(w, "stream_count", {"n": 200}, telemetry=True)
    assert events(call) == ["start", "stop"]


def test_exception_event_and_no_frames_without_opt_in(w):
    call, _ = timed(w, "test.raise", {}, telemetry=True)
    assert events(call) == ["start", "exception"]
    assert call.frames[-2]["metadata"]["error_type"] == "handler_error"
    call, _ = timed(w, "stream_count", {"n": 3})
    assert events(call) == []


def test_worker_wide_telemetry_flag():
    with spawn("--telemetry", "--slow-chunk-ms", "10") as w:
        call, _ = timed(w, "echo", {})
        assert events(call) == ["start", "stop"]
        call, _ = timed(w, "test.async_gen", {"n": 2, "delay": 0.05})
        assert events(call) == ["start", "slow_chunk", "stop"]


# ---- stats -----------------------------------------------------------------------------

def test_stats_counts_and_histograms_stay_bounded():
    with spawn() as w:
        w.call("echo", {})
        with pytest.raises(RemoteError):
            w.call("nope")
        w.call("stats")  # now every command of the test has its histogram
        before = w.call("stats")
        n = 100_000
        w.send_raw(b"".join(framing.encode({"type": "request", "id": f"b{i}", "command": "echo"}) for i in range(n)))
        after = w.call("stats")
        assert after["requests"]["echo"] == before["requests"]["echo"] + n
        assert after["errors"]["unknown_command"] == 1
        assert after["histogram_buckets"] == before["histogram_buckets"]
        echo = after["latency_ms"]["echo"]
        assert echo["total"]["count"] == n + 1
        assert echo["total"]["p50"] <= echo["total"]["p90"] <= echo["total"]["p99"] <= echo["total"]["max"]
        assert after["rss_bytes"] > 0 and after["frames_in"] >= n


def test_histogram_quantiles_and_window():
    hist = Histogram(now=0.0)
    for ms in range(1, 101):
        hist.add(float(ms), now=1.0)
    total = hist.summary(now=1.0)["total"]
    assert total["count"] == 100 and total["max"] == 100.0
    for name, exact in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert exact <= total[name] <= exact * 1.2
    later = SLOT_S * (WINDOW_SLOTS + 1)
    hist.add(5.0, now=later)
    summary = hist.summary(now=later)
    assert summary["window"]["count"] == 1 and summary["window"]["max"] == 5.0
    assert summary["total"]["count"] == 101
    assert hist.buckets == (len(BOUNDS) + 1) * (WINDOW_SLOTS + 1)


# ---- inline replies: grouped, each with meta -------------------------------------------

def pipelined(w, n: int, command: str = "echo") -> list:
    """``n`` requests in one write under PIPE_BUF (so one read for the worker); their finished calls."""
    calls = [Call(w, f"p{i}") for i in range(n)]
    for call in calls:
        w._calls[call.id] = call
    args = (lambda i: {"i": i}) if command == "echo" else (lambda i: {})  # only echo takes any argument
    w.send_raw(b"".join(framing.encode({"type": "request", "id": c.id, "command": command, "args": args(i)})
                        for i, c in enumerate(calls)))
    for call in calls:
        call.result()
    return calls


def test_pipelined_inline_replies_each_carry_consistent_meta(w):
    calls = pipelined(w, 40)
    metas = [c.terminal["meta"] for c in calls]
    assert [c.terminal["data"] for c in calls] == [{"i": i} for i in range(40)]
    assert all(set(m) == META_KEYS and m["chunks"] == m["tool_calls"] == 0 for m in metas)
    assert all(0 <= m["queue_ms"] <= m["duration_ms"] for m in metas)
    # later requests of one read waited longer: times never go backwards in arrival order
    assert [m["duration_ms"] for m in metas] == sorted(m["duration_ms"] for m in metas)
    assert [m["queue_ms"] for m in metas] == sorted(m["queue_ms"] for m in metas)


def test_stats_counts_every_reply_sent_before_it(w):
    before = w.call("stats")["requests"].get("ping", 0)
    pipelined(w, 37, "ping")
    assert w.call("stats")["requests"]["ping"] == before + 37


def test_failing_inline_requests_have_their_own_meta(w):
    for command, kind in (("test.inline_raise", "handler_error"), ("test.inline_unserializable", "handler_error")):
        call, host_ms = timed(w, command, {})
        assert call.terminal["error"]["type"] == kind
        assert set(call.terminal["meta"]) == META_KEYS and call.terminal["meta"]["duration_ms"] <= host_ms


def test_no_meta_switch():
    with spawn("--no-meta") as w:
        for command, args in (("echo", {}), ("stream_count", {"n": 2}), ("test.raise", {})):
            call, _ = timed(w, command, args)
            assert "meta" not in call.terminal
        stats = w.call("stats")
        assert stats["requests"]["echo"] == 1 and stats["errors"]["handler_error"] == 1


def test_lm_usage_counts_each_outcome_and_spends_nothing_on_a_cache_hit():
    usage = LmUsage()
    usage.add(100, 10, 0.5)
    usage.add(0, 0, 0.0, hit=True)
    usage.add(0, 0, None, outcome="failed")
    usage.add(0, 0, None, outcome="cancelled")
    assert usage.as_dict() == {"calls": 4, "input_tokens": 100, "output_tokens": 10, "cost_usd": 0.5,
                               "cache_hits": 1, "cancelled": 1, "failed": 1}
    total = LmUsage()
    total.merge(usage.as_dict())
    total.merge({"calls": 1, "cost_usd": None, "failed": True, "input_tokens": "x"})  # not numbers: 0
    assert total.as_dict() == {**usage.as_dict(), "calls": 5}
