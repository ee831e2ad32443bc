"""``bridge stats [--watch]``: the stats table rebuilt from a transcript, recorded or still being written."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bridge.observe.metrics import LmUsage
from bridge.transcripts import watch
from bridge.wire import framing
from tests.conftest import ROOT

FIXTURES = ROOT / "fixtures"
REFUSALS = {"unknown_command", "overloaded", "shutting_down"}


def bridge(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bridge", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def expected(path: Path) -> dict[str, Counter]:
    """Counted straight from the file: finished requests per command, error frames per type,
    LM records per request's session."""
    requests, errors, lm = Counter(), Counter(), Counter()
    commands: dict = {}
    for record in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
        frame = record.get("frame") or {}
        if "transcript" in record:
            commands = {}
        elif "lm" in record:
            lm[commands.get(record["lm"]["id"], (None, "default"))[1]] += 1
        elif record.get("dir") == "in" and frame.get("type") == "request":
            commands[frame["id"]] = (frame["command"], frame.get("session_id", "default"))
        elif record.get("dir") == "out" and frame.get("type") in ("result", "error"):
            kind = frame["error"]["type"] if frame["type"] == "error" else None
            if kind:
                errors[kind] += 1
            if frame["id"] is not None and kind not in REFUSALS:
                requests[commands[frame["id"]][0]] += 1
    return {"command": requests, "error": errors, "LM": lm}


def sections(table: str) -> dict[str, Counter]:
    """The table's blocks by their first header word, each row's name -> its first number."""
    blocks = table.strip().split("\n\n")[1:]
    found = {"command": Counter(), "error": Counter(), "LM": Counter()}
    for head, *rows in (block.splitlines() for block in blocks):
        found[head.split()[0]] = Counter({row.split()[0]: int(row.split()[1]) for row in rows})
    return found


@pytest.mark.parametrize("name", ["bad_frames", "cancel_mid_stream", "restart_program"])
def test_stats_of_a_recorded_transcript(name):
    path = FIXTURES / f"{name}.jsonl"
    proc = bridge("stats", str(path))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    segments = path.read_text(encoding="utf-8").count('{"transcript":1,')
    assert out.startswith(f"{path}: segment {segments},")
    assert "exited 0" in out.splitlines()[0]
    found, want = sections(out), expected(path)
    assert found["command"] == want["command"] and found["error"] == want["error"]


def test_watch_follows_a_live_replay_and_stops_when_its_worker_exits(tmp_path):
    """The watcher starts before the file exists, and ends by itself after the worker's exit."""
    live = tmp_path / "live.jsonl"
    watcher = bridge("stats", "--watch", str(live), "--interval", "0.2")
    try:
        replay = bridge("replay", str(FIXTURES / "react_tools.jsonl"), "--record", str(live))
        replayed, replay_err = replay.communicate(timeout=60)
        assert replay.returncode == 0, replayed + replay_err
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    tables = [f"{live}: segment{t}" for t in out.split(f"{live}: segment")[1:]]
    assert tables and "exited 0" in tables[-1].splitlines()[0]
    found, want = sections(tables[-1]), expected(live)
    assert found["command"] == want["command"] == expected(FIXTURES / "react_tools.jsonl")["command"]
    assert found["error"] == want["error"]
    assert found["LM"] == want["LM"] and sum(want["LM"].values()) == 5  # meta.lm agrees with the LM records


def wire(t: float, direction: str, frame: dict) -> dict:
    return {"t": t, "dir": direction, "frame": frame}


def test_tally_follows_requests_tool_calls_errors_and_lm_usage():
    tally = watch.Tally()
    lm = {"calls": 2, "input_tokens": 10, "output_tokens": 5, "cost_usd": None, "cache_hits": 1}
    ins = [{"type": "request", "id": 1, "command": "dspy.predict", "session_id": "s1"},
           {"type": "request", "id": 2, "command": "echo"},
           {"type": "rpc_response", "rpc_id": 7, "ok": True, "result": 1},
           {"type": "request", "id": 3, "command": "nope"}]
    tally.add({"transcript": 1})
    tally.add(wire(0.1, "in", ins[0]))
    tally.add(wire(0.2, "in", ins[1]))
    tally.add(wire(0.21, "out", {"type": "rpc_request", "rpc_id": 7, "id": 1, "tool": "t", "args": [], "kwargs": {}}))
    assert set(tally.inflight) == {1, 2} and tally.parked == {7}
    tally.add(wire(0.22, "in", ins[2]))
    assert tally.parked == set()
    tally.add(wire(0.25, "out", {"type": "error", "id": 2, "error": {"type": "handler_error", "message": "x"}}))
    tally.add(wire(0.5, "out", {"type": "result", "id": 1, "data": {}, "meta": {"duration_ms": 123.0, "lm": lm}}))
    tally.add(wire(0.6, "out", {"type": "error", "id": None, "error": {"type": "bad_frame", "message": "x"}}))
    tally.add(wire(0.7, "in", ins[3]))
    tally.add(wire(0.7, "out", {"type": "error", "id": 3, "error": {"type": "unknown_command", "message": "x"}}))
    tally.add({"t": 0.8, "lm": {"id": 1}})
    snap = tally.metrics.snapshot(now=tally.now)
    assert tally.inflight == {} and tally.frames == {"in": 4, "out": 5} and tally.lm_records == 1
    assert tally.bytes["in"] == sum(len(framing.encode(frame)) for frame in ins)
    assert snap["requests"] == {"dspy.predict": 1, "echo": 1}
    assert snap["errors"] == {"handler_error": 1, "bad_frame": 1, "unknown_command": 1}
    assert snap["latency_ms"]["dspy.predict"]["total"]["max"] == 123.0  # meta's duration wins
    assert snap["latency_ms"]["echo"]["total"]["max"] == pytest.approx(50.0)  # else arrival to answer
    # a transcript from before the cancelled/failed/cached counts: those read as 0
    assert {k: u.as_dict() for k, u in tally.lm.items()} == {"s1": {**LmUsage().as_dict(), **lm}}
    assert tally.exit is None
    tally.add({"t": 0.9, "exit": 3})
    assert tally.exit == 3 and "exited 3" in watch.render(tally, "x.jsonl")
    tally.add({"transcript": 1})
    tally.add(wire(0.0, "in", ins[1]))
    assert tally.segments == 2 and tally.exit is None and tally.now == pytest.approx(0.9)
    assert "running" in watch.render(tally, "x.jsonl") and set(tally.inflight) == {2}


def test_histograms_stay_bounded_over_100k_requests():
    tally = watch.Tally()
    tally.add({"transcript": 1})
    sizes = []
    for i in range(100_000):
        t = i * 0.001  # 100 s of transcript time: the sliding window rotates
        tally.add(wire(t, "in", {"type": "request", "id": i, "command": "echo"}))
        tally.add(wire(t + 0.0005, "out", {"type": "result", "id": i, "data": None, "meta": {"duration_ms": i % 97}}))
        if i in (0, 99_999):
            sizes.append(tally.metrics.snapshot(now=tally.now)["histogram_buckets"])
    snap = tally.metrics.snapshot(now=tally.now)
    assert sizes[0] == sizes[1] > 0 and tally.inflight == {}
    assert snap["requests"] == {"echo": 100_000}
    assert 0 < snap["latency_ms"]["echo"]["window"]["count"] < 100_000


def test_a_file_that_is_not_a_transcript_or_is_missing_is_refused(tmp_path, capsys):
    bad = tmp_path / "not.jsonl"
    bad.write_text('{"t": 0, "dir": "in", "frame": {}}\n')
    assert watch.run(str(bad)) == 2
    assert "the first line must be a header" in capsys.readouterr().err
    assert watch.run(str(tmp_path / "missing.jsonl")) == 2
    assert "No such file" in capsys.readouterr().err


def test_a_partial_last_line_waits_for_its_newline(tmp_path):
    path = tmp_path / "live.jsonl"
    path.write_text('{"transcript": 1}\n{"t": 0.5, "ex')
    follower = watch.Follower(str(path))
    assert follower.read() == [{"transcript": 1}]
    with open(path, "a") as f:
        f.write('it": 0}\n')
    assert follower.read() == [{"t": 0.5, "exit": 0}]
