"""The recorder: writes one transcript segment while the worker serves (``--record``).

Installed at start-up as the frame writer's tap and the LM-recording hook's sink
(``bridge.cli``), so neither the worker nor the LM layer imports it.  Recording
must never change what the worker does: every failure here is logged once and
recording stops, while serving goes on.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, BinaryIO, Callable

from bridge.transcripts.format import header
from bridge.wire import framing, jsontags
from bridge.wire.redact import redact

BUFFER = 256 * 1024
FLUSH_EVERY = 1.0  # seconds: the most a crash can lose, beyond what is still buffered when idle

log = logging.getLogger("bridge.transcript")


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
    """A host frame without its secrets (``wire.redact``), or None when it has none: a
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
