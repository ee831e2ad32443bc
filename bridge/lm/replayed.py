"""The ``replay/<path>`` engine: LM calls answered with the ones a transcript recorded.

A call matches a recorded call by its messages (system prompt included), not by
model or settings.  Identical requests take their recorded answers in the order
they were made; once those are used up, the last answer is given again, as
DSPy's cache would have for a recording that hit it.  A request that was never
recorded fails with an ``InvalidRequestError`` naming it (``lm_error`` for the
host).  A recorded call that never finished (``incomplete``) is answered never:
its pieces stream, then it waits until its request is cancelled or times out.

The records come from a transcript, read by ``bridge.transcripts.replay_lm``,
which registers this engine at start-up: the LM layer never reads transcripts.
"""

from __future__ import annotations

import builtins
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.lm.offline import OfflineEngine, Reply
from bridge.lm.recording import request_key, request_record

if TYPE_CHECKING:
    from dspy.lm15 import Request, Usage

UNMATCHED = "replay: no recorded LM call matches this request"


class RecordedCalls:
    """A transcript's LM records, queued per request; ``take`` is thread-safe."""

    def __init__(self, path: str, calls: list[dict[str, Any]]) -> None:
        self.path = path
        self.total = len(calls)
        self._queues: dict[str, deque[dict[str, Any]]] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        for call in calls:
            self._queues.setdefault(request_key(call["request"]), deque()).append(call)

    def take(self, request: dict[str, Any]) -> dict[str, Any]:
        key = request_key(request)
        with self._lock:
            queue = self._queues.get(key)
            if queue:
                self._last[key] = queue.popleft()
            recorded = self._last.get(key)
        if recorded is None:
            from dspy.lm15 import InvalidRequestError

            raise InvalidRequestError(f"{UNMATCHED} ({_excerpt(request)}); "
                                      f"{self.path} holds {self.total} LM call(s)")
        return recorded


def _excerpt(request: dict[str, Any], limit: int = 300) -> str:
    """The last message, which holds a predictor's inputs: what tells requests apart."""
    messages = request.get("messages") or [{}]
    last = messages[-1]
    text = last.get("content", "")
    text = text if len(text) <= limit else text[:limit] + "…"
    return f"{len(messages)} message(s), the last from {last.get('role')!r}: {text!r}"


def _error(error: dict[str, Any]) -> Exception:
    """The recorded failure again: an lm15 error of the same class with the same fields (so
    the same text), or a builtin one."""
    from dspy._vendor.lm15 import errors

    name, message = error.get("type", ""), error.get("message", "")
    public = isinstance(name, str) and not name.startswith("_")  # a transcript is data: no dunder lookups
    cls = (getattr(errors, name, None) or getattr(builtins, name, None)) if public else None
    fields = error.get("fields")
    if isinstance(cls, type) and issubclass(cls, errors.LM15Error) and isinstance(fields, dict):
        return _restored(cls, fields)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:
            pass
    return errors.ProviderError(f"{name}: {message}")


def _restored(cls: type, fields: dict[str, Any]) -> Exception:
    """An lm15 error with the recorded attributes, not re-derived: some constructors add text."""
    from dspy._vendor.lm15.rate_limits import freeze_rate_limits

    exc = cls.__new__(cls)
    Exception.__init__(exc, fields.get("message", ""))
    exc.__dict__.update({k: tuple(v) if k == "env_keys" else v for k, v in fields.items()})
    exc.rate_limit_headers = freeze_rate_limits(fields.get("rate_limit_headers"))
    exc.code = fields.get("code") or cls.default_code
    for name in ("provider", "provider_code", "status", "request_id", "retry_after"):
        exc.__dict__.setdefault(name, None)
    return exc


@dataclass(frozen=True, slots=True)
class RecordedReply(Reply):
    usage: dict[str, Any] | None = None


class ReplayEngine(OfflineEngine):
    """Serves recorded calls: their deltas, paced by ``speed`` (None: at once)."""

    def __init__(self, calls: RecordedCalls, speed: float | None = None) -> None:
        super().__init__()
        self.calls = calls
        self.speed = speed

    def plan(self, request: "Request", streaming: bool) -> Reply:
        recorded = self.calls.take(request_record(request))
        if "error" in recorded:
            raise _error(recorded["error"])
        deltas = recorded.get("deltas") or [[recorded.get("elapsed", 0.0), recorded.get("response") or ""]]
        deltas = [d for d in deltas if d[1]]
        times = [t for t, _ in deltas]
        waits = [max(0.0, b - a) / self.speed if self.speed else 0.0 for a, b in zip([0.0, *times], times)]
        return RecordedReply(recorded.get("response") or "", [text for _, text in deltas], waits,
                             not recorded.get("incomplete"), recorded.get("usage"))

    def usage(self, request: "Request", reply: Reply) -> "Usage":  # type: ignore[override]
        if isinstance(reply, RecordedReply) and reply.usage:
            from dspy._vendor.lm15.serde import usage_from_dict

            return usage_from_dict(reply.usage)
        return OfflineEngine.usage(request, reply)


def check_speed(value: Any) -> float | None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
        raise ValueError("'speed' must be a number > 0")
    return value
