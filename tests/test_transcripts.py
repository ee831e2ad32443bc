"""Transcripts: byte-faithful recording, LM calls recorded and replayed, differences and unmatched calls found."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any, Callable

import anyio
import msgpack
import pytest

from bridge import RemoteError, Worker
from bridge.host import replay
from bridge.lm import recording as lm_recording
from bridge.transcripts import format as transcript
from bridge.transcripts.recorder import Recorder
from bridge.wire import framing, jsontags
from bridge.wire.errors import TranscriptError
from tests.conftest import ROOT

FIXTURES = ROOT / "fixtures"


def edited(name: str, tmp_path: Any, edit: Callable[[dict], dict]) -> str:
    """A copy of ``fixtures/NAME.jsonl`` with ``edit`` applied to every record."""
    lines = (FIXTURES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(edit(json.loads(line)), ensure_ascii=False) + "\n" for line in lines),
                    encoding="utf-8")
    return str(path)


def replayed(path: str, **options: Any) -> tuple[int, str]:
    out = io.StringIO()
    return replay.run(path, out=out, **options), out.getvalue()


def frame_of(record: dict) -> dict:
    return record.get("frame") or {}


def wrap(body: bytes) -> bytes:
    return framing.HEADER.pack(len(body)) + body


def echo_says_something_else(record: dict) -> dict:
    data = frame_of(record).get("data")
    if record.get("dir") == "out" and isinstance(data, dict) and "text" in data:
        data["text"] = "what the worker used to say"
    return record


# ---- recording ---------------------------------------------------------------------------

def test_recorded_frames_are_the_bytes_that_crossed_the_pipe(tmp_path):
    """Both directions, re-encoded from the transcript, equal the pipe's bytes: also for msgpack the
    worker would encode differently (float32, a wide int), keys JSON cannot keep, and garbage."""
    wide_id = (b"\x83\xa4type\xa7request\xa2id\xce\x00\x00\x00\x05\xa7command\xa4ping")  # id 5 as uint32
    sent = b"".join([
        framing.encode({"type": "request", "id": 1, "command": "ping"}),
        wrap(msgpack.packb({"type": "request", "id": 2, "command": "echo", "args": {"f": 1.5}},
                           use_single_float=True)),
        framing.encode({"type": "request", "id": 3, "command": "echo",
                        "args": {1: "int key", "tag": {"$bytes": "not base64!"}, "b": b"\x00\xff", "s": "héllo ✓"}}),
        wrap(wide_id),
        wrap(b"\xc1"),
        framing.encode({"type": "request", "id": 4, "command": "echo", "args": {"n": [2**64 - 1, -2**63]}}),
        framing.HEADER.pack(100) + b"cut",
    ])
    path = tmp_path / "pipe.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bridge", "serve", "--record", str(path)],
                          input=sent, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    records = transcript.load(path)[0].records
    host = [r for r in records if r.get("dir") == "in" and not r.get("eof")]
    worker = [r for r in records if r.get("dir") == "out"]
    assert b"".join(map(transcript.wire_bytes, host)) == sent
    assert b"".join(map(transcript.wire_bytes, worker)) == proc.stdout
    assert [frame_of(r).get("id") for r in host if "raw" in r] == [2, 3, 5, None]  # JSON alone would not do
    kinds = [next(k for k in ("partial", "eof", "frame", "exit") if k in r) for r in records[-4:]]
    assert kinds == ["partial", "eof", "frame", "exit"]  # the cut frame is only known at the end of input


def test_bytes_and_non_ascii_survive_a_round_trip(tmp_path):
    path = tmp_path / "echo.jsonl"
    args = {"bytes": bytes(range(256)), "text": "héllo ✓ — 日本語 🚀", "nested": [{"b": b"\x00"}]}
    with Worker.spawn("--record", str(path)) as w:
        assert w.call("echo", args) == args
        assert w.shutdown() == 0
    assert "héllo ✓ — 日本語 🚀" in path.read_text(encoding="utf-8")  # readable, not escaped
    [echo] = [r["frame"] for r in transcript.load(path)[0].frames("in") if r["frame"].get("command") == "echo"]
    assert jsontags.from_json(echo)["args"] == args
    assert replayed(str(path))[0] == 0


def test_credentials_are_not_written_down_and_the_transcript_still_replays(tmp_path):
    path = tmp_path / "provider.jsonl"
    with Worker.spawn("--record", str(path)) as w:
        w.call("lm.configure", {"model": "openai/gpt-4o-mini", "api_key": "sk-secret-123", "max_tokens": 50})
        assert w.shutdown() == 0
    text = path.read_text(encoding="utf-8")
    assert "sk-secret-123" not in text
    [configure] = [r for r in transcript.load(path)[0].frames("in") if r["frame"].get("command") == "lm.configure"]
    assert configure["redacted"] is True and "raw" not in configure
    assert configure["frame"]["args"] == {"model": "openai/gpt-4o-mini", "api_key": "[REDACTED]", "max_tokens": 50}
    assert replayed(str(path))[0] == 0


def test_a_transcript_that_cannot_be_written_is_logged_and_serving_goes_on():
    with Worker.spawn("--record", "/dev/full", stderr=subprocess.PIPE) as w:
        for _ in range(4):  # past the file buffer, so a write reaches the device
            w.call("echo", {"pad": "x" * 100_000})
        assert w.call("ping")["pong"] is True
        assert w.shutdown() == 0
        assert b"cannot write the transcript /dev/full" in w.proc.stderr.read()


def test_stream_deltas_are_recorded_with_their_timing():
    [call] = [r["lm"] for r in transcript.load(FIXTURES / "chain_of_thought_stream.jsonl")[0].lm_calls()]
    times = [t for t, _ in call["deltas"]]
    assert times == sorted(times) and times[-1] >= 0.1  # 16 pieces, 10 ms each
    assert "".join(text for _, text in call["deltas"]) == call["response"]
    assert call["id"] == 2 and call["model"] == "scripted/demo" and call["usage"]["output_tokens"] > 0
    assert call["request"]["messages"][0]["role"] == "system"


def test_cancelled_and_timed_out_lm_calls_are_recorded_as_incomplete():
    for name in ("cancel_mid_stream", "request_timeout"):
        [call] = [r["lm"] for r in transcript.load(FIXTURES / f"{name}.jsonl")[0].lm_calls()]
        assert call["incomplete"] is True, name


def test_the_lm_hook_records_any_engine_dspy_picks(monkeypatch):
    """DummyLM takes DSPy's legacy engine path, not our offline engines: it is recorded too."""
    import dspy
    from dspy.clients import execution
    from dspy.utils.dummies import DummyLM

    monkeypatch.setattr(execution, "_engine", execution._engine)  # undone after the test
    out = io.BytesIO()
    lm_recording.install(Recorder(out, "<memory>"))
    with dspy.context(lm=DummyLM([{"answer": "42"}])):
        dspy.Predict("question -> answer")(question="6 * 7?")
    [call] = [json.loads(line)["lm"] for line in out.getvalue().splitlines()]
    assert call["model"] == "dummy" and "6 * 7?" in call["request"]["messages"][-1]["content"]
    assert "42" in call["response"]


def test_streamed_chunks_on_the_litellm_path_are_recorded_as_deltas():
    """LiteLLM's compatibility path sends its chunks to DSPy's stream itself; the tee notes their text."""
    sent: list[Any] = []

    class Stream:
        async def send(self, item: Any) -> None:
            sent.append(item)

    call = SimpleNamespace(deltas=[])
    call.delta = lambda text: call.deltas.append(text)
    tee = lm_recording._Tee(Stream(), call)  # type: ignore[arg-type]
    chunks = [SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=text))]) for text in ("a", None, "b")]

    async def main() -> None:
        for chunk in chunks:
            await tee.send(chunk)

    anyio.run(main)
    assert sent == chunks and call.deltas == ["a", "b"]


# ---- replay ------------------------------------------------------------------------------

def test_replay_shows_a_changed_worker_output(tmp_path):
    code, out = replayed(edited("ping_echo_stats", tmp_path, echo_says_something_else))
    assert code == 1, out
    assert "request 2 (echo): 1 frame(s) recorded, 1 replayed" in out
    assert [line[0] for line in out.splitlines() if "what the worker used to say" in line] == ["-"]
    assert any(line.startswith("+") and "héllo ✓" in line for line in out.splitlines())
    assert "replay FAILED" in out


def test_update_rewrites_the_transcript_from_the_new_run(tmp_path):
    path = edited("ping_echo_stats", tmp_path, echo_says_something_else)
    code, out = replayed(path, update=True)
    assert code == 0 and f"updated {path}" in out
    assert "what the worker used to say" not in open(path, encoding="utf-8").read()
    assert replayed(path)[0] == 0


def test_an_lm_call_with_no_recorded_match_is_named(tmp_path):
    def ask_something_else(record: dict) -> dict:
        if frame_of(record).get("command") == "dspy.stream":
            record["frame"]["args"]["inputs"]["question"] = "What is 3 * 3?"
        return record

    code, out = replayed(edited("chain_of_thought_stream", tmp_path, ask_something_else))
    assert code == 1
    [problem] = [line for line in out.splitlines() if line.startswith("problem: unmatched LM call")]
    assert "no recorded LM call matches this request" in problem and "What is 3 * 3?" in problem


def test_a_tool_call_with_no_recorded_match_is_named(tmp_path):
    def other_query(record: dict) -> dict:
        if frame_of(record).get("type") == "rpc_request" and record["frame"]["tool"] == "search":
            record["frame"]["kwargs"] = {"query": "Tour Eiffel hauteur"}
        return record

    code, out = replayed(edited("react_tools", tmp_path, other_query))
    assert code == 1
    assert 'problem: unmatched tool call: the worker called search with args [] and kwargs ' \
           '{"query":"Eiffel Tower height"}, which the recording never did' in out
    assert "problem: the recording answers host tool call 1, which this run never made" in out


def test_lm_configure_replay_model_serves_recorded_calls():
    """``replay/<path>`` directly: a recorded stream answers a plain predict; an unknown request fails by name."""
    args = {"signature": "question -> answer", "module": "ChainOfThought"}
    with Worker.spawn("--allow-path", str(FIXTURES)) as w:
        with pytest.raises(RemoteError, match="bad_request: cannot read .*No such file"):
            w.call("lm.configure", {"model": f"replay/{FIXTURES / 'no_such_transcript.jsonl'}"})
        w.call("lm.configure", {"model": f"replay/{FIXTURES / 'chain_of_thought_stream.jsonl'}"})
        assert w.call("dspy.predict", {**args, "inputs": {"question": "What is (2 + 2) * 2?"}})["outputs"]["answer"] == "8"
        with pytest.raises(RemoteError) as exc:
            w.call("dspy.predict", {**args, "inputs": {"question": "What is 3 * 3?"}})
        assert exc.value.type == "lm_error"
        assert "no recorded LM call matches this request" in exc.value.message and "What is 3 * 3?" in exc.value.message
        assert w.shutdown() == 0


def test_a_transcript_recorded_against_a_provider_replays_offline(tmp_path):
    """The model keeps its name, and its connection settings are dropped: no key, no network."""
    def as_openai(record: dict) -> dict:
        record = json.loads(json.dumps(record).replace("scripted/demo", "openai/gpt-4o-mini"))
        if frame_of(record).get("command") == "lm.configure":
            record["frame"]["args"] = {"model": "openai/gpt-4o-mini", "api_key": "sk-not-a-key", "temperature": 0.0}
        return record

    code, out = replayed(edited("chain_of_thought_stream", tmp_path, as_openai))
    assert code == 0, out


def test_show_prints_the_conversation():
    code, out = replayed(str(FIXTURES / "react_tools.jsonl"), show=True)
    assert code == 0, out
    for line in ['← [2] tool call (step 1): search({"query":"Eiffel Tower height"}) [rpc 1]',
                 "→ tool answer [rpc 2]: error ValueError: not arithmetic: x",
                 "← [2] observation (step 2): error ValueError: not arithmetic: x",
                 "← [2] next_thought: 237 metres, so I can answer.",
                 "← [2] answer: 237 metres"]:
        assert line in out.splitlines(), line


def test_speed_replays_with_the_recorded_pacing():
    """At half speed the host's last frame goes out no earlier than twice its recorded time."""
    path = FIXTURES / "chain_of_thought_stream.jsonl"
    last = transcript.load(path)[0].frames("in")[-1]["t"]
    started = time.monotonic()
    assert replayed(str(path), speed=0.5)[0] == 0
    assert time.monotonic() - started >= last / 0.5


def test_transcript_show_prints_every_segment():
    proc = subprocess.run([sys.executable, "-m", "bridge", "transcript", "show", str(FIXTURES / "restart_program.jsonl")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("=== worker 0.1.0") == 2 and proc.stdout.count("=== worker exited with code 0") == 2
    assert "LM scripted/demo for [3]" in proc.stdout


def test_a_file_that_is_not_a_transcript_is_refused(tmp_path):
    path = tmp_path / "not.jsonl"
    path.write_text('{"t": 0, "dir": "in", "frame": {}}\n')
    with pytest.raises(TranscriptError, match="the first line must be a header"):
        transcript.load(path)
