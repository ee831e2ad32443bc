"""``bridge stats [--watch] PATH``: the ``stats`` table of a recorded run, or of a live one.

Nothing is started and nothing is asked of a worker: the numbers are rebuilt from
a transcript (``bridge serve --record`` or ``bridge replay --record``), with the
worker's own ``WorkerMetrics``, so they read like ``stats``.  With ``--watch`` the
file is followed while the worker writes it (the recorder flushes about once a
second), and the table is redrawn.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from bridge.observe.metrics import LmUsage, WorkerMetrics
from bridge.transcripts import format as transcript
from bridge.wire.errors import TranscriptError

WIRE = {"frame", "raw", "partial", "skipped"}  # records that put bytes on a pipe
REFUSALS = {"unknown_command", "duplicate_id", "overloaded", "shutting_down"}  # the worker's ``reject``s


def _usable(rid: Any) -> bool:
    """An id the worker tracks (int or str); anything else is answered with ``id: null``."""
    return isinstance(rid, (int, str)) and not isinstance(rid, bool)


class Tally:
    """What a transcript's records add up to: the state of the current segment and the run's totals."""

    def __init__(self) -> None:
        self.segments = 0
        self.t = 0.0  # the current segment's time (restarts at 0 in each segment)
        self.offset = 0.0  # time of the segments before: the histograms' clock never goes back
        self.inflight: dict[Any, tuple[Any, str, float]] = {}  # id -> (command, session, arrival)
        self.parked: set[Any] = set()  # rpc_ids the worker waits on
        self.frames = {"in": 0, "out": 0}
        self.bytes = {"in": 0, "out": 0}
        self.metrics = WorkerMetrics()
        self.lm: dict[str, LmUsage] = {}  # per session, from the ``meta.lm`` of terminal frames
        self.lm_records = 0
        self.rss: int | None = None
        self.exit: int | None = None

    @property
    def now(self) -> float:
        return self.offset + self.t

    def add(self, record: dict[str, Any]) -> None:
        if "transcript" in record:  # a new worker: what was in flight died with the old one
            self.segments += 1
            self.offset, self.t, self.exit = self.offset + self.t, 0.0, None
            self.inflight.clear()
            self.parked.clear()
            return
        if isinstance(record.get("t"), (int, float)):
            self.t = max(self.t, record["t"])  # LM records carry their start time: not monotonic
        if "exit" in record:
            self.exit = record["exit"]
        elif "lm" in record:
            self.lm_records += 1
        elif record.get("dir") in self.frames and WIRE.intersection(record):
            self._wire(record["dir"], record)

    def _wire(self, direction: str, record: dict[str, Any]) -> None:
        self.bytes[direction] += len(transcript.wire_bytes(record))
        self.frames[direction] += "partial" not in record  # a cut frame never arrived
        frame = record.get("frame")
        if isinstance(frame, dict):
            (self._host if direction == "in" else self._worker)(frame, frame.get("type"))

    def _host(self, frame: dict[str, Any], kind: Any) -> None:
        rid = frame.get("id")
        if kind == "request" and _usable(rid) and rid not in self.inflight:
            self.inflight[rid] = (frame.get("command"), str(frame.get("session_id") or "default"), self.now)
        elif kind == "rpc_response" and _usable(frame.get("rpc_id")):
            self.parked.discard(frame["rpc_id"])

    def _worker(self, frame: dict[str, Any], kind: Any) -> None:
        if kind in ("result", "error"):
            self._terminal(frame, kind)
        elif kind in ("rpc_request", "rpc_cancel") and _usable(frame.get("rpc_id")):
            (self.parked.add if kind == "rpc_request" else self.parked.discard)(frame["rpc_id"])

    def _terminal(self, frame: dict[str, Any], kind: str) -> None:
        error = frame.get("error") if kind == "error" else None
        etype = None if kind == "result" else str(error.get("type") if isinstance(error, dict) else "unknown")
        meta = frame.get("meta") if isinstance(frame.get("meta"), dict) else {}
        entry = self.inflight.pop(frame["id"], None) if _usable(frame.get("id")) else None
        if entry is None or not isinstance(entry[0], str) or (etype in REFUSALS and not meta):
            if etype is not None:  # refused before it ran, or no request at all (``id: null``)
                self.metrics.reject(etype)
            return
        command, session, arrived = entry
        ms = meta.get("duration_ms")
        if not isinstance(ms, (int, float)):  # recorded before ``meta`` existed
            ms = (self.now - arrived) * 1000
        self.metrics.record(command, ms, etype, now=self.now)
        if isinstance(meta.get("lm"), dict):
            self.lm.setdefault(session, LmUsage()).merge(meta["lm"])
        data = frame.get("data")
        if command == "stats" and isinstance(data, dict) and isinstance(data.get("rss_bytes"), int):
            self.rss = data["rss_bytes"]


class Follower:
    """The records of the complete lines appended to a transcript since the last read: the
    last line stays buffered until its newline arrives, so a file still being written can be read."""

    def __init__(self, path: str) -> None:
        self.path, self.pos, self.partial, self.lineno, self.started = path, 0, b"", 0, False

    def read(self, final: bool = False) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        if final:
            lines.append(self.partial)
        return [record for record in map(self._parse, lines) if record is not None]

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        self.lineno += 1
        record = transcript.parse_line(line, f"{self.path}:{self.lineno}", first=not self.started)
        self.started = self.started or record is not None
        return record


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    unit, k = next(((u, k) for u, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= k), ("B", 1))
    return f"{n} B" if k == 1 else f"{n / k:.1f} {unit}"


def render(tally: Tally, path: str) -> str:
    """The table: the run's state, then latency per command (run and sliding window), errors, LM usage."""
    snap = tally.metrics.snapshot(now=tally.now)
    state = "running" if tally.exit is None else f"exited {tally.exit}"
    lines = [f"{path}: segment {tally.segments}, t {tally.t:.3f} s, {state}",
             f"in flight {len(tally.inflight)}, tool calls parked {len(tally.parked)}, "
             f"LM calls recorded {tally.lm_records}, rss {_size(tally.rss)}",
             f"frames in {tally.frames['in']} out {tally.frames['out']}, "
             f"bytes in {_size(tally.bytes['in'])} out {_size(tally.bytes['out'])}", ""]
    window = next((f"last {s['window_s']:.0f} s" for s in snap["latency_ms"].values()), "window")
    lines.append(f"{'command':<20}{'count':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}  | "
                 f"{window:<9}{'count':>6}{'p50 ms':>9}{'p99 ms':>9}")
    for command, s in sorted(snap["latency_ms"].items()):
        tot, win = s["total"], s["window"]
        run = "".join(f"{_ms(tot[k]):>9}" for k in ("p50", "p90", "p99", "max"))
        lines.append(f"{command:<20}{tot['count']:>7}{run}  | {'':<9}{win['count']:>6}"
                     f"{_ms(win['p50']):>9}{_ms(win['p99']):>9}")
    if snap["errors"]:
        lines += ["", f"{'error':<20}{'count':>7}"]
        lines += [f"{k:<20}{v:>7}" for k, v in sorted(snap["errors"].items(), key=lambda kv: (-kv[1], kv[0]))]
    if tally.lm:
        lines += ["", f"{'LM session':<20}{'calls':>7}{'in tokens':>11}{'out tokens':>12}{'cost usd':>10}"
                      f"{'cache hits':>12}"]
        for session, u in sorted(tally.lm.items()):
            cost = "-" if u.cost_usd is None else f"{u.cost_usd:.4f}"
            lines.append(f"{session:<20}{u.calls:>7}{u.input_tokens:>11}{u.output_tokens:>12}{cost:>10}"
                         f"{u.cache_hits:>12}")
    return "\n".join(lines)


def _draw(text: str, out: TextIO) -> None:
    """Redraw in place on a terminal; elsewhere (a pipe, a log) one table after the other."""
    out.write("\x1b[H\x1b[J" + text + "\n" if out.isatty() else text + "\n\n")
    out.flush()


def _watch(tally: Tally, follower: Follower, path: str, interval: float, out: TextIO) -> int:
    """Redraw on news until the worker exited and two intervals passed without any."""
    idle, drawn, waiting = 0, False, False
    while True:
        try:
            records = follower.read()
        except FileNotFoundError:  # the worker has not started yet
            if not waiting:
                print(f"bridge stats: waiting for {path}", file=sys.stderr)
            records, waiting = [], True
        for record in records:
            tally.add(record)
        idle = 0 if records else idle + 1
        if tally.segments and (records or not drawn):
            _draw(render(tally, path), out)
            drawn = True
        if tally.exit is not None and idle >= 2:
            return 0
        time.sleep(interval)


def run(path: str, watch: bool = False, interval: float = 1.0, out: TextIO = sys.stdout) -> int:
    """Print the table once (0), or follow the file (``watch``); 2 for a file that is not a transcript."""
    tally, follower = Tally(), Follower(path)
    try:
        if watch:
            return _watch(tally, follower, path, interval, out)
        for record in follower.read(final=True):
            tally.add(record)
        if not tally.segments:
            raise TranscriptError(f"{path}: empty")
        out.write(render(tally, path) + "\n")
        return 0
    except (OSError, ValueError, TranscriptError) as exc:
        print(f"bridge stats: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
