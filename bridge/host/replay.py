"""``bridge replay PATH``: play a transcript's host side against a fresh worker, then compare.

For each segment (one worker process) a new worker starts with the recorded
serve options that change no trust (``transcript.replay_argv``: a transcript is
data), the trust options given to ``bridge replay`` itself, ``--allow-path`` of the
transcript's directory and ``--replay-lm PATH --replay-segment N``, so every LM
call is answered from the recording.  The driver then sends the recorded host input in
order; a host record that followed some worker frame in the recording is sent
only once the equivalent frame has arrived.  Frames are equivalent when they
hold the same place in the same stream (``compare.stream_of``): the k-th
frame of a request id, of a host tool call, or of the frames with no id.

Host tool calls are answered with the recorded answers, matched by tool and
arguments, never by ``rpc_id``; the ids are mapped, and compared through the
mapping.  At the end each stream's frames are compared after
``compare.normalize``; any difference is printed as a diff and the exit
status is 1.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from typing import Any, Callable, NamedTuple, TextIO

from bridge.host.client import Worker
from bridge.lm.replayed import UNMATCHED
from bridge.transcripts import compare
from bridge.transcripts import format as transcript
from bridge.transcripts.compare import StreamKey
from bridge.transcripts.format import Segment
from bridge.transcripts.views import ChatLog, brief
from bridge.wire import framing, jsontags
from bridge.wire.errors import TranscriptError


class Arrivals(Worker):
    """A worker whose frames all go to one queue in arrival order; ``None`` when its output closes."""

    def __init__(self, argv: list[str]) -> None:
        self.arrivals: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        super().__init__(argv)

    def _route(self, frame: dict) -> None:
        self.arrivals.put(frame)
        if frame.get("type") == "ready":
            self._ready.put(frame)

    def _read(self) -> None:
        try:
            super()._read()
        finally:
            self.arrivals.put(None)


class Step(NamedTuple):
    """One host record, and the worker frame (stream, index) it waits for."""

    record: dict[str, Any]
    after: tuple[StreamKey, int] | None


class Outcome(NamedTuple):
    diff: list[str]
    problems: list[str]
    frames: int


def _plan(segment: Segment) -> tuple[list[Step], dict[StreamKey, list[Any]]]:
    """The host steps with what each waits for, and the recorded worker streams."""
    expected: dict[StreamKey, list[Any]] = {}
    steps: list[Step] = []
    last = None
    for record in segment.records:
        if record.get("dir") == "out" and "frame" in record:
            key = compare.stream_of(record["frame"], lambda rpc_id: rpc_id)
            expected.setdefault(key, []).append(record["frame"])
            last = (key, len(expected[key]) - 1)
        elif record.get("dir") == "in":
            steps.append(Step(record, last))
    return steps, expected


class SegmentRun:
    """One worker process of the transcript, replayed."""

    def __init__(self, path: str, index: int, segment: Segment, *, timeout: float, speed: float | None,
                 log: ChatLog | None, record_to: str | None, trust: dict[str, Any]) -> None:
        self.segment = segment
        self.timeout = timeout
        self.speed = speed
        self.log = log
        self.steps, self.expected = _plan(segment)
        self.commands = {f["id"]: f.get("command") for f in (r["frame"] for r in segment.frames("in"))
                         if f.get("type") == "request" and isinstance(f.get("id"), (int, str))}
        self.unused = [f for stream in self.expected.values() for f in stream if f.get("type") == "rpc_request"]
        self.actual: dict[StreamKey, list[Any]] = {}
        self.rpc_of: dict[Any, Any] = {}  # replayed rpc_id -> recorded rpc_id
        self.new_of: dict[Any, Any] = {}  # recorded rpc_id -> replayed rpc_id
        self.problems: list[str] = []
        self.closed = False
        self.stalled = False
        argv, notes = transcript.replay_argv(segment.header, trust)
        for note in notes:
            print(note, file=sys.stderr)
        argv += ["--allow-path", os.path.dirname(os.path.realpath(path)),
                 "--replay-lm", path, "--replay-segment", str(index)]
        if speed:
            argv += ["--replay-speed", str(speed)]
        if record_to:
            argv += ["--record", record_to] + (["--record-append"] if index else [])
        self.started = time.monotonic()
        self.worker = Arrivals([sys.executable, "-m", "bridge", "serve", *argv])

    def play(self) -> Outcome:
        if self.log:
            self.log.record(self.segment.header)
        for step in self.steps:
            if step.after is not None and not self.stalled:
                self._wait_for(step)
            self._pace(step.record.get("t", 0.0))
            self._send(step.record)
        code = self._finish()
        return Outcome(self._compare(code), self.problems + self._lm_misses(),
                       sum(len(s) for s in self.actual.values()))

    # ---- receiving -------------------------------------------------------------------

    def _receive(self, deadline: float) -> bool:
        """Take one worker frame; False when none came by ``deadline`` or the output closed."""
        if self.closed:
            return False
        try:
            frame = self.worker.arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return False
        if frame is None:
            self.closed = True
            return False
        view = jsontags.to_json(frame)
        if self.log:
            self.log.frame("out", view)
        if view.get("type") == "rpc_request":
            self._match_tool_call(view)
        self.actual.setdefault(compare.stream_of(view, self._recorded_rpc), []).append(view)
        return True

    def _recorded_rpc(self, rpc_id: Any) -> Any:
        return self.rpc_of.get(rpc_id, f"{rpc_id} (unmatched)")

    def _match_tool_call(self, call: dict[str, Any]) -> None:
        """Pair a host tool call with the first unused recorded one of the same tool and arguments."""
        wanted = (call.get("tool"), call.get("args"), call.get("kwargs"))
        for i, recorded in enumerate(self.unused):
            if (recorded.get("tool"), recorded.get("args"), recorded.get("kwargs")) == wanted:
                del self.unused[i]
                self.rpc_of[call["rpc_id"]] = recorded["rpc_id"]
                self.new_of[recorded["rpc_id"]] = call["rpc_id"]
                return
        message = (f"unmatched tool call: the worker called {call.get('tool')} with args "
                   f"{brief(call.get('args'))} and kwargs {brief(call.get('kwargs'))}, which the recording never did")
        self.problems.append(message)
        refusal = {"type": "rpc_response", "rpc_id": call.get("rpc_id"), "ok": False,
                   "error": {"type": "replay_unmatched", "message": message}}
        if self.log:
            self.log.frame("in", refusal)
        self._write(framing.encode(refusal))

    def _wait_for(self, step: Step) -> None:
        stream, index = step.after  # type: ignore[misc]
        deadline = time.monotonic() + self.timeout
        while len(self.actual.get(stream, ())) <= index:
            if self._ended(stream, index) or not self._receive(deadline):
                self.stalled = True  # the rest is sent without waiting, so the diff shows all of it
                self.problems.append(
                    f"the worker never sent frame {index + 1} of {compare.describe(stream, self.commands)}, "
                    f"after which the recorded host sent {_summary(step.record)}")
                return

    def _ended(self, stream: StreamKey, index: int) -> bool:
        """Has the request that recorded frame ``index`` belongs to already ended here (so the
        frame cannot come)?  An id may be reused after its terminal frame, hence the counting."""
        terminals = sum(map(_terminal, self.expected.get(stream, [])[:index]))
        return sum(map(_terminal, self.actual.get(stream, []))) > terminals

    # ---- sending ---------------------------------------------------------------------

    def _pace(self, t: float) -> None:
        if self.speed:
            delay = self.started + t / self.speed - time.monotonic()
            if delay > 0:
                self._drain_for(delay)

    def _drain_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._receive(deadline):
            pass

    def _send(self, record: dict[str, Any]) -> None:
        if self.log:
            self.log.record(record)
        if record.get("eof"):
            self.worker.close_input()
            return
        frame = record.get("frame")
        if isinstance(frame, dict) and frame.get("type") == "rpc_response":
            recorded = frame.get("rpc_id")
            if recorded not in self.new_of:
                self.problems.append(f"the recording answers host tool call {recorded}, which this run never made")
                return
            self._write(framing.encode(jsontags.from_json({**frame, "rpc_id": self.new_of[recorded]})))
        else:
            self._write(transcript.wire_bytes(record))

    def _write(self, data: bytes) -> None:
        try:
            self.worker.send_raw(data)
        except (OSError, ValueError):
            self.problems.append("the worker stopped reading its input before the recorded host was done")

    # ---- the end ---------------------------------------------------------------------

    def _finish(self) -> int:
        """Collect the rest; let the worker exit as it did (or close its input); its exit code."""
        deadline = time.monotonic() + self.timeout
        if self.segment.exit_code() is None:  # the recording stops short: take what it has, then end
            while not self._complete() and self._receive(deadline):
                pass
            self._write_eof()
        while self._receive(deadline):
            pass
        if not self.closed:
            self.problems.append(f"the worker did not exit within {self.timeout} s of the last recorded frame")
            self.worker.kill()
            while self._receive(time.monotonic() + 1.0):
                pass
        return self.worker.wait(self.timeout)

    def _write_eof(self) -> None:
        try:
            self.worker.close_input()
        except OSError:
            pass

    def _complete(self) -> bool:
        return all(len(self.actual.get(k, ())) >= len(v) for k, v in self.expected.items())

    def _compare(self, code: int) -> list[str]:
        def recorded_name(rpc_id: Any) -> str:
            return f"<rpc {rpc_id}>"

        def replayed_name(rpc_id: Any) -> str:
            return f"<rpc {self._recorded_rpc(rpc_id)}>"

        expected = self._normalized(self.expected, recorded_name)
        actual = self._normalized(self.actual, replayed_name)
        compare.allow_added_commands(expected, actual)
        diff = compare.compare(expected, actual, self.commands)
        recorded = self.segment.exit_code()
        if recorded is not None and recorded != code:
            diff.append(f"exit code: recorded {recorded}, replayed {code}")
        return diff

    def _normalized(self, streams: dict[StreamKey, list[Any]], name: Callable[[Any], str]) -> dict[StreamKey, list]:
        return {k: [compare.normalize(f, self.commands, name) for f in v] for k, v in streams.items()}

    def _lm_misses(self) -> list[str]:
        """LM calls the recording could not answer: they surface as errors in the worker's frames."""
        found: list[str] = []
        for frames in self.actual.values():
            for text in (s[s.index(UNMATCHED):] for f in frames for s in _strings(f) if UNMATCHED in s):
                if f"unmatched LM call: {text}" not in found:
                    found.append(f"unmatched LM call: {text}")
        return found


def _terminal(frame: Any) -> bool:
    return isinstance(frame, dict) and frame.get("type") in ("result", "error") and frame.get("id") is not None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


def _summary(record: dict[str, Any]) -> str:
    frame = record.get("frame")
    if isinstance(frame, dict):
        return brief({k: frame[k] for k in ("type", "id", "command", "rpc_id") if k in frame})
    return "end of input" if record.get("eof") else "raw bytes"


def run(path: str, *, update: bool = False, show: bool = False, speed: float | None = None,
        timeout: float = 10.0, record: str | None = None, trust: dict[str, Any] | None = None,
        out: TextIO = sys.stdout) -> int:
    """Replay ``path``; print the differences; 0 when the worker still says the same.
    ``record``: the replayed run's transcript goes there too (``--update`` records to ``PATH.new``).
    ``trust``: serve options by ``dest`` (``handlers``, ``allow_modules``…) from the command line."""
    try:
        segments = transcript.load(path)
    except (OSError, TranscriptError) as exc:
        print(f"bridge replay: {exc}", file=sys.stderr)
        return 2
    if record and os.path.abspath(record) == os.path.abspath(path):
        print(f"bridge replay: --record {record} would overwrite the transcript being replayed", file=sys.stderr)
        return 2
    log = ChatLog(out) if show else None
    record_to = f"{path}.new" if update else record
    outcomes = [SegmentRun(path, i, seg, timeout=timeout, speed=speed, log=log, record_to=record_to,
                           trust=trust or {}).play()
                for i, seg in enumerate(segments)]
    if log:
        log.close()
    problems = [p for o in outcomes for p in o.problems]
    for i, outcome in enumerate(outcomes):
        if outcome.diff:
            out.write(f"segment {i} (worker {i + 1} of {len(outcomes)}):\n" + "\n".join(outcome.diff) + "\n")
    for problem in problems:
        out.write(f"problem: {problem}\n")
    differs = any(o.diff for o in outcomes)
    if update:
        return _update(path, record_to, problems, out)  # type: ignore[arg-type]
    frames = sum(o.frames for o in outcomes)
    verdict = "FAILED" if differs or problems else "OK"
    out.write(f"replay {verdict}: {path}: {len(outcomes)} worker(s), {frames} worker frames\n")
    return 1 if differs or problems else 0


def _update(path: str, new: str, problems: list[str], out: TextIO) -> int:
    """Keep the new run as the transcript, unless it could not be served from the recording."""
    if problems:
        out.write(f"not updated: {path} (the run had problems; {new} holds it)\n")
        return 1
    os.replace(new, path)
    out.write(f"updated {path}\n")
    return 0
