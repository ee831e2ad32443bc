"""Opt-in ``telemetry`` frames: one per ``:telemetry`` event of a request (see ``docs/telemetry.md``).

A request asks with ``"telemetry": true`` (or the worker runs with
``--telemetry``).  Events may come from worker threads (DSPy's LM calls), so
they are handed to the loop; one that reaches the loop after its request's
terminal frame is dropped: no frame for an id follows its terminal frame.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from bridge.wire import protocol

Send = Callable[[dict[str, Any]], Any]
Post = Callable[[Callable[[dict[str, Any]], None], dict[str, Any]], None]


class Telemetry:
    """The event sink of one request that opted in.

    ``ctx`` is the request's context (``id``, ``command``, ``session_id``, ``closed``,
    ``arrived``, ``started``); ``send`` writes a frame (loop only); ``post(fn, body)``
    runs ``fn(body)`` on the loop, now when called there, else soon.
    """

    __slots__ = ("ctx", "slow_s", "last_chunk", "_send", "_post")

    def __init__(self, ctx: Any, slow_chunk_ms: float, send: Send, post: Post) -> None:
        self.ctx = ctx
        self.slow_s = slow_chunk_ms / 1000
        self.last_chunk = 0.0
        self._send = send
        self._post = post

    def event(self, name: str, measurements: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        """Send one event from the loop or from any thread; dropped once the request has ended."""
        ctx = self.ctx
        self._post(self._send_open, protocol.telemetry(ctx.id, name, measurements,
                                                       {"command": ctx.command, **(metadata or {})}))

    def _send_open(self, body: dict[str, Any]) -> None:
        if not self.ctx.closed:
            self._send(body)

    def start(self) -> None:
        ctx = self.ctx
        self.event("start", {"system_time": time.time(), "queue_ms": (ctx.started - ctx.arrived) * 1000},
                   {"session_id": ctx.session_id})

    def chunk(self, now: float, seq: int) -> None:
        """Called after each chunk: a gap longer than ``--slow-chunk-ms`` is a ``slow_chunk``."""
        if seq and now - self.last_chunk > self.slow_s:
            self.event("slow_chunk", {"gap_ms": (now - self.last_chunk) * 1000}, {"seq": seq})
        self.last_chunk = now

    def finish(self, terminal: dict[str, Any], meta: dict[str, Any]) -> None:
        """``stop`` or ``exception``, written right before the terminal frame (the request is closed)."""
        ctx = self.ctx
        if terminal["type"] == "result":
            body = protocol.telemetry(ctx.id, "stop", meta, {"command": ctx.command})
        else:
            body = protocol.telemetry(ctx.id, "exception", meta,
                                      {"command": ctx.command, "error_type": terminal["error"]["type"]})
        self._send(body)

