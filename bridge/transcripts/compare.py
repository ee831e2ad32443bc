"""Comparing a replayed run with its recording, stream by stream (``bridge replay``)."""

from __future__ import annotations

import difflib
from typing import Any, Callable

from bridge.wire import jsontags

VOLATILE_RESULTS = {"ping": ("time",), "stats": ("uptime_s", "rss_bytes", "bytes_out", "warm")}
# stats' request metrics: timings, and counters that older recordings do not have (threads: the warm-up's
# thread may still be busy or not)
UNCOMPARED_RESULTS = {"stats": ("requests", "errors", "latency_ms", "histogram_buckets", "lm",
                                "lm_by_session", "allow", "threads", "loop")}  # allow.paths: where the replayed transcript lies; loop: --loop


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
