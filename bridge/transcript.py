"""Transcripts: what a worker said and heard, as JSON Lines — the format, the recorder, the loader,
and the comparison that ``bridge replay`` runs.  See ``docs/transcripts.md``.

A transcript is one or more *segments*, one per worker process, each opened by a
header line; the records after a header belong to that worker:

- ``{"t", "dir": "in"|"out", "frame": {...}}`` a frame; ``raw`` (base64 body) is added
  when the JSON view alone would not re-encode to the bytes that crossed the pipe;
- ``{"t", "dir": "in", "raw"}`` an undecodable frame body, ``{"t", "dir": "in", "partial"}``
  the bytes of a frame cut by end of input, ``{"t", "dir": "in", "skipped": size}`` a frame
  over ``--max-frame-bytes`` (its body is never buffered), ``{"t", "dir": "in", "eof": true}``;
- ``{"t", "lm": {...}}`` one LM call (written by ``bridge.lm_recording``);
- ``{"t", "exit": code}`` the worker's exit.

Recording must never change what the worker does: every failure here is logged
once and recording stops, while serving goes on.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import time
from contextvars import ContextVar
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, BinaryIO, Callable, Iterable, NamedTuple

from . import __version__, framing, jsontags
from .redact import redact

FORMAT = 1
BUFFER = 256 * 1024
FLUSH_EVERY = 1.0  # seconds: the most a crash can lose, beyond what is still buffered when idle
NOT_REPLAYED = {"command", "fds", "record", "record_append", "replay_lm", "replay_segment", "replay_speed"}
# the serve options ``bridge replay`` takes from a transcript's header: none widens what the worker trusts
HONOURED = {"meta", "telemetry", "slow_chunk_ms", "max_frame_bytes", "max_threads", "max_inflight", "max_objects",
            "drain_timeout", "tool_timeout_ms", "log_level", "max_file_bytes"}
VOLATILE_RESULTS = {"ping": ("time",), "stats": ("uptime_s", "rss_bytes", "bytes_out", "warm")}
# stats' request metrics: timings, and counters that older recordings do not have
UNCOMPARED_RESULTS = {"stats": ("requests", "errors", "latency_ms", "histogram_buckets", "lm",
                                "lm_by_session", "allow")}  # allow.paths: where the replayed transcript lies

log = logging.getLogger("bridge.transcript")

_REQUEST: ContextVar[Any] = ContextVar("bridge_transcript_request", default=None)


class TranscriptError(Exception):
    """A file that is not a transcript this version can read."""


def current_request() -> Any:
    """The ``Context`` of the request running in this task or thread (None outside requests)."""
    return _REQUEST.get()


def header(options: dict[str, Any]) -> dict[str, Any]:
    """The first line of a segment: versions, start time, and the serve options a replay needs."""
    try:
        dspy_version = metadata.version("dspy")  # not ``import dspy``: that costs a second before ready
    except metadata.PackageNotFoundError:
        dspy_version = None
    return {"transcript": FORMAT, "worker": __version__, "dspy": dspy_version,
            "started": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "pid": os.getpid(),
            "options": {k: v for k, v in options.items() if k not in NOT_REPLAYED}}


def serve_argv(head: dict[str, Any]) -> list[str]:
    """``bridge serve`` arguments that start a worker like the one that wrote ``head``
    (options this worker does not know are left out)."""
    return options_argv({k: v for k, v in head.get("options", {}).items() if k not in NOT_REPLAYED})


def _serve_actions() -> dict[str, Any]:
    import argparse

    from .cli import add_serve_options

    parser = argparse.ArgumentParser(add_help=False)
    add_serve_options(parser)
    return {action.dest: action for action in parser._actions if action.option_strings}


def options_argv(options: dict[str, Any]) -> list[str]:
    """``bridge serve`` arguments for option values by ``dest`` (``vars`` of parsed options)."""
    import argparse

    argv: list[str] = []
    for dest, action in _serve_actions().items():
        value = options.get(dest)
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreFalseAction):  # --no-meta: given when the value is False
            argv += [flag] if value is False else []
        elif action.nargs == 0:
            argv += [flag] if value is True else []
        elif value is not None and value is not False:
            for item in value if isinstance(value, list) else [value]:
                argv += [flag, str(item)]
    return argv


def replay_argv(head: dict[str, Any], given: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The serve arguments ``bridge replay`` starts a segment's worker with, and one note per
    header option saying whether it is used.  A transcript is data: only options that change
    no trust (``HONOURED``) come from its header; the rest only from ``given``, the
    ``bridge replay`` command line."""
    options = head.get("options", {})
    argv = options_argv({k: v for k, v in options.items() if k in HONOURED})
    argv += options_argv({k: v for k, v in given.items() if k not in HONOURED})
    notes = []
    for dest, value in options.items():
        action = _serve_actions().get(dest)
        flag = max(action.option_strings, key=len) if action else dest
        if dest in HONOURED:
            verdict = "used"
        elif given.get(dest):
            verdict = "used, with the value given to bridge replay"
        else:
            verdict = f"ignored (a transcript is data; give {flag} to bridge replay to use it)"
        notes.append(f"bridge replay: transcript option {dest} = {json.dumps(value)} ({flag}): {verdict}")
    return argv, notes


# ---- recording -------------------------------------------------------------------------

def frame_fields(frame: Any, body: bytes) -> dict[str, Any]:
    """``frame`` as JSON, plus ``raw`` when that view would not re-encode to ``body``
    (a host's non-canonical msgpack, non-string keys, a map that looks like a bytes tag)."""
    view = jsontags.to_json(frame)
    try:
        faithful = framing.encode(jsontags.from_json(view))[4:] == body
    except ValueError:  # a map that looks like a bytes tag but holds no base64
        faithful = False
    return {"frame": view} if faithful else {"frame": view, "raw": body}


def redacted(frame: dict) -> dict | None:
    """A host frame without its secrets (``bridge.redact``), or None when it has none: a
    transcript is meant to be shared, and replay never needs them.  A frame too deep to
    check is not written at all, only its type."""
    try:
        hidden = redact(frame)
    except ValueError as exc:
        return {"type": frame.get("type") if isinstance(frame.get("type"), str) else None, "unchecked": str(exc)}
    return None if hidden is frame else hidden


def _safely(method: Callable[..., None]) -> Callable[..., None]:
    """Recording must never break serving: any failure stops the recording, logged once."""
    @functools.wraps(method)
    def guarded(self: "Recorder", *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:
            self._fail(exc)

    return guarded


class Recorder:
    """Writes one segment: every frame both ways, LM calls, end of input, exit.

    One buffered write per record; the file is flushed about every ``FLUSH_EVERY``
    seconds while records come, and at exit.  Thread-safe: LM calls end on worker threads.
    """

    def __init__(self, file: BinaryIO, path: str) -> None:
        self.path = path
        self.open_calls: set[Any] = set()  # LM calls in progress: written as incomplete at exit
        self._file = file
        self._t0 = time.monotonic()
        self._flushed = 0.0
        self._broken = False
        self._eof = False

    @classmethod
    def open(cls, path: str, options: dict[str, Any], append: bool = False) -> "Recorder":
        """Start a segment in ``path`` (a new file, or appended: a worker restart)."""
        recorder = cls(open(path, "ab" if append else "wb", buffering=BUFFER), path)
        recorder._write(header(options))
        recorder.flush()  # a follower (``bridge stats --watch``) sees the new segment at once
        return recorder

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    @_safely
    def flush(self) -> None:
        self._file.flush()

    def bind(self, ctx: Any) -> None:
        """Called in a request's own task: LM calls made for it (threads included) know it."""
        _REQUEST.set(ctx)

    @_safely
    def frame_in(self, event: framing.Event) -> None:
        record: dict[str, Any] = {"t": self.now(), "dir": "in"}
        if isinstance(event, framing.Frame):
            hidden = redacted(event.body)
            if hidden is None:
                self._write_frame({**record, **frame_fields(event.body, event.raw or b"")}, event.raw or b"")
            else:  # the one departure from the bytes: a credential is not written down
                self._write_frame({**record, "frame": jsontags.to_json(hidden), "redacted": True},
                                  framing.encode(hidden)[4:])
            return
        if isinstance(event, framing.BadFrame):
            record["raw"] = event.raw
        elif isinstance(event, framing.Truncated):
            record["partial"] = event.raw or b""  # empty when the cut fell in a skipped body
            self._write(record)
            self.eof()  # a cut frame is only known at end of input: the end comes first, its error after
            return
        else:
            record["skipped"] = event.size
        self._write(record)

    @_safely
    def frame_out(self, frame: dict) -> None:
        """The ``FrameWriter`` tap: runs for every frame the worker sends."""
        body = framing.encode(frame)[4:]
        self._write_frame({"t": self.now(), "dir": "out", **frame_fields(frame, body)}, body)

    @_safely
    def eof(self) -> None:
        if not self._eof:
            self._eof = True
            self._write({"t": self.now(), "dir": "in", "eof": True})

    @_safely
    def lm(self, t: float, call: dict[str, Any]) -> None:
        self._write({"t": t, "lm": call})

    def close(self, exit_code: int) -> None:
        for call in list(self.open_calls):
            call.abandon()
        self._write({"t": self.now(), "exit": exit_code})
        try:
            self._file.close()
        except OSError as exc:
            self._fail(exc)
        self._broken = True  # a thread that outlives the loop writes nothing more

    def _write_frame(self, record: dict[str, Any], body: bytes) -> None:
        """A frame JSON cannot show (msgpack ext types) is kept as its bytes alone."""
        if not self._write(record):
            del record["frame"]
            record["raw"] = body
            self._write(record)

    def _write(self, record: dict[str, Any]) -> bool:
        if self._broken:
            return True
        try:
            line = (jsontags.dumps(redact(record)) + "\n").encode("utf-8")
        except (TypeError, ValueError):
            return False
        try:
            self._file.write(line)
            if record.get("t", 0) - self._flushed >= FLUSH_EVERY:
                self._flushed = record["t"]
                self._file.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)
        return True

    def _fail(self, exc: Exception) -> None:
        self._broken = True
        log.error("cannot write the transcript %s (%s); recording stops, serving goes on", self.path, exc)


# ---- loading ---------------------------------------------------------------------------

class Segment(NamedTuple):
    """One worker process: its header and its records in file order."""

    header: dict[str, Any]
    records: list[dict[str, Any]]

    def frames(self, direction: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("dir") == direction and "frame" in r]

    def lm_calls(self) -> list[dict[str, Any]]:
        """LM records by start time (they are written when they end)."""
        return sorted((r for r in self.records if "lm" in r), key=lambda r: r["t"])

    def exit_code(self) -> int | None:
        return next((r["exit"] for r in self.records if "exit" in r), None)


def load(path: str | os.PathLike) -> list[Segment]:
    """Parse a transcript; raises ``TranscriptError`` naming the line that is wrong."""
    with open(path, encoding="utf-8") as f:
        return parse_lines(f, path)


def parse_lines(lines: Iterable[str], path: str | os.PathLike) -> list[Segment]:
    """``load`` for lines already read (``path`` names them in errors)."""
    segments: list[Segment] = []
    for lineno, line in enumerate(lines, 1):
        record = parse_line(line, f"{path}:{lineno}", first=not segments)
        if record is None:
            continue
        if "transcript" in record:
            segments.append(Segment(record, []))
        else:
            segments[-1].records.append(record)
    if not segments:
        raise TranscriptError(f"{path}: empty")
    return segments


def parse_line(line: str | bytes, where: str, first: bool) -> dict[str, Any] | None:
    """One transcript line as a record (None for a blank one); ``first``: no header seen yet."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise TranscriptError(f"{where}: not a JSON line ({exc})") from None
    if not isinstance(record, dict):
        raise TranscriptError(f"{where}: a record must be a JSON object")
    if "transcript" in record and record["transcript"] != FORMAT:
        raise TranscriptError(f"{where}: transcript format {record['transcript']!r}, this worker reads {FORMAT}")
    if first and "transcript" not in record:
        raise TranscriptError(f'{where}: the first line must be a header {{"transcript": 1, ...}}')
    return record


def wire_bytes(record: dict[str, Any]) -> bytes:
    """The bytes a host record puts on the pipe (for frames: their recorded encoding)."""
    if "raw" in record:
        body = jsontags.from_json(record["raw"])
        return framing.HEADER.pack(len(body)) + body
    if "frame" in record:
        return framing.encode(jsontags.from_json(record["frame"]))
    if "partial" in record:
        return jsontags.from_json(record["partial"])
    if "skipped" in record:
        return framing.HEADER.pack(record["skipped"]) + bytes(record["skipped"])
    raise TranscriptError(f"not a host record: {record!r}")


# ---- comparison ------------------------------------------------------------------------

StreamKey = tuple


def stream_of(frame: dict[str, Any], rpc_key: Callable[[Any], Any]) -> StreamKey:
    """Which ordered stream a worker frame belongs to.

    Frames of one request keep their order from run to run, and so do the frames
    of one host tool call; how different requests interleave does not.
    """
    kind = frame.get("type")
    if kind in ("rpc_request", "rpc_cancel"):
        return ("rpc", rpc_key(frame.get("rpc_id")))
    rid = frame.get("id")
    return ("worker",) if rid is None else ("request", rid)


def describe(key: StreamKey, commands: dict[Any, str]) -> str:
    if key[0] == "request":
        command = commands.get(key[1])
        return f"request {key[1]!r}" + (f" ({command})" if command else "")
    if key[0] == "rpc":
        return f"host tool call {key[1]}"
    return "frames without a request id"


def normalize(frame: Any, commands: dict[Any, str], rpc_name: Callable[[Any], Any]) -> Any:
    """A worker frame with what differs between equal runs replaced by placeholders:
    pid and version, timings (ping's time, stats' uptime/rss/bytes out/warm-up, any
    ``*_ms`` duration, telemetry's ``system_time``), tracebacks, and rpc ids (named by
    the recorded call they match).  Terminal frames' ``meta`` and stats' request
    metrics are left out."""
    frame = _scrub(frame, rpc_name)
    if not isinstance(frame, dict):
        return frame
    frame.pop("meta", None)  # timings and counters of the run, not what the worker answered
    if frame.get("type") == "ready":
        frame.update({k: f"<{k}>" for k in ("pid", "version") if k in frame})
    command = commands.get(frame.get("id"), "") if frame.get("type") == "result" else ""
    volatile, dropped = VOLATILE_RESULTS.get(command, ()), UNCOMPARED_RESULTS.get(command, ())
    if (volatile or dropped) and isinstance(frame.get("data"), dict):
        frame["data"] = {k: (f"<{k}>" if k in volatile else v) for k, v in frame["data"].items() if k not in dropped}
    return frame


def _scrub(value: Any, rpc_name: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _scrub_field(k, v, rpc_name) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, rpc_name) for v in value]
    return value


def _scrub_field(key: str, value: Any, rpc_name: Callable[[Any], Any]) -> Any:
    if key == "rpc_id":
        return rpc_name(value)
    if key == "traceback" and isinstance(value, str):
        return "<traceback>"
    if key.endswith("_ms") and key != "timeout_ms" and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
        return "<ms>"
    if key == "system_time":  # telemetry events' wall clock
        return "<time>"
    return _scrub(value, rpc_name)


def allow_added_commands(expected: dict[StreamKey, list[Any]], actual: dict[StreamKey, list[Any]]) -> None:
    """A worker that gained commands or capabilities still serves every recorded conversation:
    its ``ready`` frame is compared as if it listed the recorded ones, as long as none is missing."""
    want, got = expected.get(("worker",), [None])[0], actual.get(("worker",), [None])[0]
    if not (isinstance(want, dict) and isinstance(got, dict) and want.get("type") == got.get("type") == "ready"):
        return
    for key in ("commands", "capabilities"):
        if isinstance(want.get(key), list) and set(want[key]) <= set(got.get(key) or []):
            got[key] = want[key]


def compare(expected: dict[StreamKey, list[Any]], actual: dict[StreamKey, list[Any]],
            commands: dict[Any, str]) -> list[str]:
    """A unified diff per stream whose normalized frames differ; empty when the runs match."""
    out: list[str] = []
    for key in sorted(expected.keys() | actual.keys(), key=repr):
        want = [jsontags.dumps(f) for f in expected.get(key, [])]
        got = [jsontags.dumps(f) for f in actual.get(key, [])]
        if want != got:
            out.append(f"{describe(key, commands)}: {len(want)} frame(s) recorded, {len(got)} replayed")
            out += [line.rstrip("\n") for line in
                    difflib.unified_diff(want, got, "recorded", "replayed", n=2, lineterm="")]
    return out
