"""LM calls answered from a transcript: the ``replay/<path>`` model and ``--replay-lm``.

This module reads the transcript and hands its LM records to the engine in
``bridge.lm.replayed``; ``install`` registers the ``replay`` prefix at start-up.
All engines over the same transcript (and segment) in one worker share one pool
of recorded calls, so the order holds across sessions and re-configurations.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from bridge.lm.engines import force_engine, register_engine
from bridge.wire.errors import TranscriptError
from bridge.worker import paths

if TYPE_CHECKING:
    from bridge.lm.replayed import RecordedCalls, ReplayEngine

# The engine and the transcript reader are imported where used: ``install`` runs before ``ready``.

_POOLS: dict[tuple[str, int | None], RecordedCalls] = {}
_POOLS_LOCK = threading.Lock()


def lm_records(path: str, segment: int | None, host: bool) -> list[dict[str, Any]]:
    """The LM calls a transcript recorded (one segment, or all in order); ValueError if unreadable.
    A ``host`` path is read bounded (``worker.paths``)."""
    from bridge.transcripts.format import load, parse_lines

    try:
        if host:
            segments = parse_lines(paths.read_file(path).decode("utf-8").splitlines(True), path)
        else:
            segments = load(path)
    except (OSError, UnicodeDecodeError, TranscriptError) as exc:
        raise ValueError(f"cannot replay LM calls from {path}: {exc}") from None
    if segment is not None and not 0 <= segment < len(segments):
        raise ValueError(f"{path} has {len(segments)} segment(s), not a segment {segment}")
    chosen = segments if segment is None else [segments[segment]]
    return [record["lm"] for seg in chosen for record in seg.lm_calls()]


def pool(path: str, segment: int | None = None, host: bool = False) -> RecordedCalls:
    """The shared pool of ``path``'s recorded calls.  A ``host`` path (``replay/<path>``) is
    confined and read bounded (``worker.paths``); the operator's (``--replay-lm``) is not.
    Blocks on the file: call it off the event loop."""
    from bridge.lm.replayed import RecordedCalls

    real = paths.confine(path) if host else os.path.realpath(path)
    key = (real, segment)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = RecordedCalls(path, lm_records(path, segment, host))
        return _POOLS[key]


def replay_engine(path: str, options: dict[str, Any]) -> ReplayEngine:
    """``replay/<path>`` with optional ``segment`` (default: all) and ``speed`` (default: no pacing)."""
    from bridge.lm.offline import int_option
    from bridge.lm.replayed import ReplayEngine, check_speed

    segment = int_option(options, "segment", None, 0)
    return ReplayEngine(pool(path, segment, host=True), check_speed(options.pop("speed", None)))


def install() -> None:
    """Serve models named ``replay/<path>``."""
    register_engine("replay", replay_engine)


def serve_every_lm(path: str, segment: int | None = None, speed: float | None = None) -> None:
    """``bridge serve --replay-lm PATH``: every ``lm.configure`` gets a replay engine over
    ``path``, whatever model it names (which keeps its name).  Raises ValueError now for a
    transcript that cannot be read, rather than at the first call."""
    from bridge.lm.replayed import ReplayEngine, check_speed

    calls = pool(path, segment)
    speed = check_speed(speed)

    def factory(name: str, options: dict[str, Any]) -> ReplayEngine:
        from dspy.clients.backend_selection import CLIENT_KEYS

        for key in CLIENT_KEYS:  # a provider's connection settings: a custom engine refuses them
            options.pop(key, None)
        options["cache"] = False  # never answer from DSPy's cache instead of the recording
        return ReplayEngine(calls, speed)

    force_engine(factory)
