"""Transcripts read as a chat log: requests, streamed tokens, ReAct thoughts, tool calls and
observations, results and errors, LM calls.  ``bridge replay --show`` prints a live run with
it, ``bridge transcript show`` a whole transcript (with times)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from bridge.transcripts import format as transcript
from bridge.wire import jsontags
from bridge.wire.errors import TranscriptError

WIDTH = 160  # characters of a value shown before it is cut


def brief(value: Any, width: int = WIDTH) -> str:
    """A value on one line (compact JSON; a string as is, newlines shown as ``\\n``), cut to ``width``."""
    text = value.replace("\n", "\\n") if isinstance(value, str) else jsontags.dumps(value)
    return text if len(text) <= width else text[:width - 1] + "…"


class ChatLog:
    """Prints records as they come; consecutive tokens of one field stay on one line."""

    def __init__(self, out: TextIO, times: bool = False) -> None:
        self.out = out
        self.times = times
        self._tokens: tuple[Any, Any] | None = None  # (request id, field) of the open token line

    def record(self, record: dict[str, Any]) -> None:
        """Any transcript record: a header, a frame either way, an LM call, end of input, exit."""
        if "transcript" in record:
            self._line(None, f"=== worker {record.get('worker')} (dspy {record.get('dspy')}), started "
                             f"{record.get('started')}; bridge serve {' '.join(transcript.serve_argv(record))}")
        elif "lm" in record:
            self._line(record.get("t"), self._lm(record["lm"]))
        elif "exit" in record:
            self._line(record.get("t"), f"=== worker exited with code {record['exit']}")
        elif "frame" in record:
            self.frame(record["dir"], record["frame"], record.get("t"))
        else:
            self._line(record.get("t"), "→ " + _wire_event(record))

    def frame(self, direction: str, frame: dict[str, Any], t: float | None = None) -> None:
        if direction == "in":
            self._line(t, "→ " + _host_frame(frame))
            return
        data = frame.get("data")
        if frame.get("type") == "chunk" and isinstance(data, dict) and data.get("event") == "token":
            self._token(t, frame.get("id"), data)
        else:
            self._line(t, "← " + _worker_frame(frame))

    def _token(self, t: float | None, rid: Any, data: dict[str, Any]) -> None:
        if self._tokens != (rid, data.get("field")):
            self._line(t, f"← [{rid}] {data.get('field')}: ", end="")
            self._tokens = (rid, data.get("field"))
        self.out.write(str(data.get("text", "")))
        self.out.flush()

    def _line(self, t: float | None, text: str, end: str = "\n") -> None:
        if self._tokens is not None:
            self.out.write("\n")
            self._tokens = None
        stamp = f"{t:9.3f}  " if self.times and t is not None else ("           " if self.times else "")
        self.out.write(stamp + text + end)
        self.out.flush()

    def close(self) -> None:
        """End an open token line."""
        if self._tokens is not None:
            self.out.write("\n")
            self._tokens = None

    @staticmethod
    def _lm(call: dict[str, Any]) -> str:
        messages = call.get("request", {}).get("messages") or [{}]
        asked = brief(messages[-1].get("content", ""), 100)
        head = f"  LM {call.get('model')}" + (f" for [{call['id']}]" if "id" in call else "")
        if "error" in call:
            outcome = f"error {call['error'].get('type')}: {brief(call['error'].get('message', ''), 100)}"
        else:
            outcome = brief(call.get("response", ""), 100)
        timing = f"{len(call.get('deltas', []))} deltas, " if call.get("deltas") else ""
        unfinished = ", never finished" if call.get("incomplete") else ""
        return f"{head}: {asked} ⇒ {outcome} ({timing}{call.get('elapsed', 0):.3f} s{unfinished})"


def _host_frame(frame: dict[str, Any]) -> str:
    kind, rid = frame.get("type"), frame.get("id")
    if kind == "request":
        extra = "".join(f" {k}={frame[k]}" for k in ("session_id", "timeout_ms", "window") if k in frame)
        return f"[{rid}] {frame.get('command')} {brief(frame.get('args', {}))}{extra}"
    if kind == "rpc_response":
        if frame.get("ok"):
            return f"tool answer [rpc {frame.get('rpc_id')}]: {brief(frame.get('result'))}"
        err = frame.get("error") or {}
        return f"tool answer [rpc {frame.get('rpc_id')}]: error {err.get('type')}: {err.get('message')}"
    if kind in ("cancel", "credit"):
        return f"[{rid}] {kind}" + (f" {frame.get('n')}" if kind == "credit" else "")
    return brief(frame) if kind != "shutdown" else "shutdown"


def _worker_frame(frame: dict[str, Any]) -> str:
    kind, rid, data = frame.get("type"), frame.get("id"), frame.get("data")
    if kind == "ready":
        return f"ready: worker {frame.get('version')}, pid {frame.get('pid')}, {len(frame.get('commands', []))} commands"
    if kind == "chunk":
        return f"[{rid}] " + (_event(data) if isinstance(data, dict) and "event" in data else f"chunk {brief(data)}")
    if kind == "result":
        return f"[{rid}] result {brief(data)}"
    if kind == "error":
        err = frame.get("error") or {}
        return f"[{rid}] error {err.get('type')}: {brief(err.get('message', ''))}"
    if kind == "rpc_request":
        call = brief({"args": frame.get("args"), "kwargs": frame.get("kwargs")})
        return f"[{rid}] asks the host: {frame.get('tool')} {call} [rpc {frame.get('rpc_id')}]"
    if kind == "rpc_cancel":
        return f"no longer waits for [rpc {frame.get('rpc_id')}]"
    return brief(frame)


def _event(data: dict[str, Any]) -> str:
    event, step = data["event"], f" (step {data.get('step')})" if "step" in data else ""
    if event == "thought":
        return f"thought{step}: {data.get('text')}"
    if event == "tool_call":
        return f"tool call{step}: {data.get('tool')}({brief(data.get('args'))}) [rpc {data.get('rpc_id')}]"
    if event == "observation":
        seen = brief(data["result"]) if "result" in data else \
            f"error {data.get('error', {}).get('type')}: {data.get('error', {}).get('message')}"
        return f"observation{step}: {seen}"
    if event == "status":
        return f"· {data.get('message')}"
    if event in ("item", "item_error"):
        progress = data.get("progress") or {}
        shown = brief(data.get("outputs")) if event == "item" else \
            f"failed {data.get('error', {}).get('type')}: {brief(data.get('error', {}).get('message', ''))}"
        return f"item {data.get('index')} {shown} ({progress.get('done')}/{progress.get('total')})"
    return f"{event} {brief({k: v for k, v in data.items() if k != 'event'})}"


def _wire_event(record: dict[str, Any]) -> str:
    """Host input that is not a frame."""
    if record.get("eof"):
        return "end of input"
    if "skipped" in record:
        return f"(a frame of {record['skipped']} bytes, over --max-frame-bytes)"
    if "partial" in record:
        return f"({len(jsontags.from_json(record['partial']))} bytes of a frame cut by end of input)"
    return f"(an undecodable frame of {len(jsontags.from_json(record.get('raw', b'')))} bytes)"


def show_file(path: str, out: TextIO = sys.stdout) -> int:
    """``bridge transcript show PATH``: every record, with its time."""
    try:
        segments = transcript.load(path)
    except (OSError, TranscriptError) as exc:
        print(f"bridge transcript: {exc}", file=sys.stderr)
        return 1
    log = ChatLog(out, times=True)
    for segment in segments:
        log.record(segment.header)
        for record in sorted(segment.records, key=lambda r: r.get("t", 0.0)):  # LM calls at their start
            log.record(record)
    log.close()
    return 0
