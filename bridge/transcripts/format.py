"""The transcript format: what a worker said and heard, as JSON Lines; its header and its loader.
See ``docs/transcripts.md``.

A transcript is one or more *segments*, one per worker process, each opened by a
header line; the records after a header belong to that worker:

- ``{"t", "dir": "in"|"out", "frame": {...}}`` a frame; ``raw`` (base64 body) is added
  when the JSON view alone would not re-encode to the bytes that crossed the pipe;
- ``{"t", "dir": "in", "raw"}`` an undecodable frame body, ``{"t", "dir": "in", "partial"}``
  the bytes of a frame cut by end of input, ``{"t", "dir": "in", "skipped": size}`` a frame
  over ``--max-frame-bytes`` (its body is never buffered), ``{"t", "dir": "in", "eof": true}``;
- ``{"t", "lm": {...}}`` one LM call (written by ``bridge.lm.recording``);
- ``{"t", "exit": code}`` the worker's exit.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any, Iterable, NamedTuple

from bridge import __version__
from bridge.wire import framing, jsontags
from bridge.wire.errors import TranscriptError
from bridge.worker.options import add_serve_options

FORMAT = 1
NOT_REPLAYED = {"command", "fds", "record", "record_append", "replay_lm", "replay_segment", "replay_speed"}
# the serve options ``bridge replay`` takes from a transcript's header: none widens what the worker trusts
HONOURED = {"meta", "telemetry", "slow_chunk_ms", "max_frame_bytes", "max_threads", "max_inflight", "max_objects",
            "drain_timeout", "tool_timeout_ms", "log_level", "max_file_bytes", "max_thread_queue", "max_sessions",
            "session_ttl"}


def header(options: dict[str, Any]) -> dict[str, Any]:
    """The first line of a segment: versions, start time, and the serve options a replay needs."""
    from datetime import datetime, timezone
    from importlib import metadata  # lazily: importlib.metadata costs about 10 ms before ready

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


@functools.cache
def _serve_actions() -> dict[str, Any]:
    """The ``bridge serve`` flags by ``dest``: built once (replay asks for each header option)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_serve_options(parser)
    return {action.dest: action for action in parser._actions if action.option_strings}


def options_argv(options: dict[str, Any]) -> list[str]:
    """``bridge serve`` arguments for option values by ``dest`` (``vars`` of parsed options)."""
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
