"""Per-request ``meta`` and the worker's counters and latency histograms (``stats``).

Always on, so everything here is sized for the hot path: ``meta`` is packed
straight to msgpack by one ``struct`` call, and inline requests share one per
group (see ``worker.respond``); a histogram update is one ``bisect`` and
one increment, also once per group.  Memory
is fixed: histograms have the same log-spaced buckets forever, and the sliding
window is a ring of per-interval bucket arrays, so traffic never grows them.
"""

from __future__ import annotations

import struct
import time
from bisect import bisect_left
from typing import Any

import msgpack

# Bucket upper bounds in ms: 4 per doubling from 1 µs to ~1.2 h (89 buckets, ≤ 19% relative error).
BOUNDS: tuple[float, ...] = tuple(0.001 * 2 ** (i / 4) for i in range(89))
WINDOW_SLOTS = 6
SLOT_S = 10.0  # the sliding window is the last 50–60 s


def _layout(fields: list[tuple[str, str | None]], tail: bytes = b"") -> tuple[struct.Struct, list[bytes]]:
    """A struct packing ``meta``'s msgpack map (7 entries) in one call.  Each key with its
    type marker (nil for a ``None`` code) is a constant argument; values are float64 (d)
    or uint64 (Q); ``tail`` (constant entries) follows the last value."""
    fmt, consts, pending = ">", [], b"\x87"
    for name, code in fields:
        pending += msgpack.packb(name)
        if code is None:
            pending += b"\xc0"
            continue
        pending += b"\xcb" if code == "d" else b"\xcf"
        fmt += f"{len(pending)}s{code}"
        consts.append(pending)
        pending = b""
    return struct.Struct(f"{fmt}{len(tail)}s"), [*consts, tail]


_FIELDS = [("duration_ms", "d"), ("queue_ms", "d"), ("first_chunk_ms", "d"), ("chunks", "Q"), ("bytes_out", "Q"),
           ("tool_calls", "Q"), ("tool_ms", "d")]
_CHUNKED, _C = _layout(_FIELDS)
_UNCHUNKED, _U = _layout([(k, None if k == "first_chunk_ms" else code) for k, code in _FIELDS])
# no chunks and no tool calls (every inline request): only the two timings vary
_IDLE_VALUES = {"first_chunk_ms": None, "chunks": 0, "bytes_out": 0, "tool_calls": 0, "tool_ms": 0.0}
_IDLE, _I = _layout(_FIELDS[:2], b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in _IDLE_VALUES.items()))
_LM_KEY = msgpack.packb("lm")


def idle_meta(duration_ms: float, queue_ms: float) -> bytes:
    """``meta`` (msgpack) of a request that sent no chunks and called no tools."""
    c = _I
    return _IDLE.pack(c[0], duration_ms, c[1], queue_ms, c[2])


def request_meta(ctx: Any, now: float) -> bytes:
    """``meta`` (msgpack) of a metered request (a ``worker.context.Context``): timings in ms from its arrival.
    Packed by one struct call: building and encoding a dict costs 3× as much."""
    arrived, first = ctx.arrived, ctx.first_chunk
    duration, queued = (now - arrived) * 1000, (ctx.started - arrived) * 1000
    if first is None and not ctx.tool_calls:
        packed = idle_meta(duration, queued)
    elif first is None:
        c = _U
        packed = _UNCHUNKED.pack(c[0], duration, c[1], queued, c[2], ctx.seq, c[3], ctx.chunk_bytes,
                                 c[4], ctx.tool_calls, c[5], ctx.tool_s * 1000, c[6])
    else:
        c = _C
        packed = _CHUNKED.pack(c[0], duration, c[1], queued, c[2], (first - arrived) * 1000, c[3], ctx.seq,
                               c[4], ctx.chunk_bytes, c[5], ctx.tool_calls, c[6], ctx.tool_s * 1000, c[7])
    if ctx.lm is None:
        return packed
    return b"\x88" + packed[1:] + _LM_KEY + msgpack.packb(ctx.lm.as_dict())


def rss_bytes() -> int:
    """Resident set size from /proc (no psutil dependency for one number)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


class LmUsage:
    """LM calls of one request (or of the whole worker): counts, tokens, cost, cache hits.

    ``calls`` counts every call made, including ``cancelled`` and ``failed`` ones;
    tokens and cost are what was spent.  A cache hit spends nothing (DSPy keeps no
    usage for it either).
    """

    __slots__ = ("calls", "input_tokens", "output_tokens", "cost_usd", "cache_hits", "cancelled", "failed")
    FIELDS = __slots__

    def __init__(self) -> None:
        self.calls = self.input_tokens = self.output_tokens = self.cache_hits = 0
        self.cancelled = self.failed = 0
        self.cost_usd: float | None = None  # None until some LM reports a cost

    def add(self, input_tokens: int, output_tokens: int, cost: float | None, hit: bool = False,
            outcome: str | None = None) -> None:
        """One LM call as it ends: a cache ``hit`` (cost 0), or ``outcome`` ``"cancelled"``
        or ``"failed"`` (tokens received so far, if known)."""
        self.calls += 1
        self.cache_hits += hit
        if outcome is not None:
            setattr(self, outcome, getattr(self, outcome) + 1)
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if cost is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost

    def merge(self, other: dict[str, Any]) -> None:
        """Add another ``as_dict()`` (a request's ``meta.lm``); what is not a number counts as 0."""
        for name in self.FIELDS:
            value = other.get(name)
            if name == "cost_usd":
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.cost_usd = (self.cost_usd or 0.0) + value
            elif isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


class Histogram:
    """Latencies (ms) in fixed log-spaced buckets, since start and over a sliding window."""

    __slots__ = ("total", "total_max", "slots", "slot_max", "slot", "current", "current_max", "slot_end")

    def __init__(self, now: float) -> None:
        size = len(BOUNDS) + 1
        self.total = [0] * size
        self.total_max = 0.0
        self.slots = [[0] * size for _ in range(WINDOW_SLOTS)]
        self.slot_max = [0.0] * WINDOW_SLOTS  # of the slots before the current one
        self.slot = 0
        self.current = self.slots[0]
        self.current_max = 0.0
        self.slot_end = now + SLOT_S

    def add(self, ms: float, now: float, n: int = 1) -> None:
        """``n`` requests that took ``ms``: one bisect and an increment (``total`` is summed in
        when a slot rotates)."""
        if now >= self.slot_end:
            self._rotate(now)
        self.current[bisect_left(BOUNDS, ms)] += n
        if ms > self.current_max:
            self.current_max = ms

    def _rotate(self, now: float) -> None:
        """Fold the current slot into ``total``, then advance to the slot ``now`` falls in."""
        self.total = [t + c for t, c in zip(self.total, self.current)]
        self.total_max = max(self.total_max, self.current_max)
        self.slot_max[self.slot] = self.current_max
        steps = int((now - self.slot_end) // SLOT_S) + 1
        for _ in range(min(steps, WINDOW_SLOTS)):
            self.slot = (self.slot + 1) % WINDOW_SLOTS
            self.slots[self.slot] = [0] * len(self.total)
            self.slot_max[self.slot] = 0.0
        self.current, self.current_max = self.slots[self.slot], 0.0
        self.slot_end += SLOT_S * steps

    @property
    def buckets(self) -> int:
        """How many counters this histogram holds (constant: the memory bound)."""
        return len(self.total) * (WINDOW_SLOTS + 1)

    def summary(self, now: float) -> dict[str, Any]:
        if now >= self.slot_end:
            self._rotate(now)
        window = [sum(col) for col in zip(*self.slots)]
        total = [t + c for t, c in zip(self.total, self.current)]
        biggest = max(self.slot_max + [self.current_max])
        return {"window": _percentiles(window, biggest),
                "total": _percentiles(total, max(self.total_max, self.current_max)), "window_s": SLOT_S * WINDOW_SLOTS}


def _percentiles(counts: list[int], biggest: float) -> dict[str, Any]:
    """p50/p90/p99 as bucket upper bounds (never above the exact max), and the count."""
    n = sum(counts)
    out: dict[str, Any] = {"count": n, "max": biggest}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        out[name] = _quantile(counts, n, q, biggest) if n else None
    return out


def _quantile(counts: list[int], n: int, q: float, biggest: float) -> float:
    rank, seen = q * n, 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank and c:
            return min(BOUNDS[i] if i < len(BOUNDS) else biggest, biggest)
    return biggest


class WorkerMetrics:
    """What ``stats`` reports beyond the transport counters: per command and per error type."""

    def __init__(self) -> None:
        self.errors: dict[str, int] = {}
        self.latency: dict[str, Histogram] = {}
        self.lm = LmUsage()

    def record(self, command: str, ms: float, error_type: str | None, now: float, n: int = 1) -> None:
        """``n`` finished requests.  Commands are registered names only, so the maps stay bounded."""
        hist = self.latency.get(command)
        if hist is None:
            hist = self.latency[command] = Histogram(now)
        hist.add(ms, now, n)
        if error_type is not None:
            self.errors[error_type] = self.errors.get(error_type, 0) + 1

    def reject(self, error_type: str) -> None:
        """A request refused before it ran (unknown command, overloaded, shutting down…)."""
        self.errors[error_type] = self.errors.get(error_type, 0) + 1

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """``now``: the clock ``record`` was given (a transcript's time); default ``perf_counter``."""
        now = time.perf_counter() if now is None else now
        latency = {cmd: h.summary(now) for cmd, h in self.latency.items()}
        return {"requests": {cmd: s["total"]["count"] for cmd, s in latency.items()}, "errors": dict(self.errors),
                "latency_ms": latency,
                "histogram_buckets": sum(h.buckets for h in self.latency.values()),
                "lm": self.lm.as_dict()}
