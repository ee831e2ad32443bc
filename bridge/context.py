"""The per-request context handed to every handler.

It is the handler's only door to the outside: chunks, host tool calls, the
session, the deadline and cancellation.  It works from the loop (``await``) and
from worker threads (the ``*_blocking`` twins), because sync handlers run in threads.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from . import protocol
from .metrics import LmUsage
from .telemetry import Telemetry
from .tools import CLOSED

if TYPE_CHECKING:
    from .server import Server
    from .sessions import Session
    from .tools import Slot

_log = logging.getLogger("bridge.handler")
YIELD_EVERY = 32  # chunks emitted between forced checkpoints, so one stream cannot hog the loop


class RequestClosed(Exception):
    """The request already has its terminal frame (cancelled, timed out, or finished)."""


class Context:
    """What a handler knows about its request.  Cheap to create: slots only."""

    __slots__ = ("id", "command", "session_id", "deadline", "seq", "closed", "server",
                 "parked", "_token", "_credit", "_credit_event", "_since_yield",
                 "arrived", "started", "first_chunk", "chunk_bytes", "tool_calls", "tool_s", "lm", "telemetry",
                 "_watch_chunks")

    def __init__(self, server: "Server", req: protocol.Request, token: Any = None) -> None:
        self.id = req.id
        self.command = req.command
        self.session_id = req.session_id
        self.deadline = time.monotonic() + req.timeout_ms / 1000 if req.timeout_ms is not None else None
        self.seq = 0
        self.closed = False
        self.server = server
        self._token = token
        self._credit = req.window
        self._credit_event: anyio.Event | None = None
        self._since_yield = YIELD_EVERY
        self.parked: set[Slot] = set()  # this request's host calls waiting for an answer

    def meter(self, arrived: float, telemetry: bool) -> "Context":
        """Account this request for its own ``meta`` (perf_counter seconds, see
        ``metrics.request_meta``), and send its telemetry events when asked.  Every request
        run as a task is metered; inline ones share their group's ``meta`` instead."""
        self.arrived = self.started = arrived  # arrival: the read that carried the request
        self.first_chunk: float | None = None
        self.chunk_bytes = 0
        self.tool_calls = 0
        self.tool_s = 0.0
        self.lm: LmUsage | None = None  # created by the first LM call (lm_metrics)
        self.telemetry = Telemetry(self, self.server.config.slow_chunk_ms) if telemetry else None
        self._watch_chunks = True  # the first chunk's time, then every chunk's with telemetry
        return self

    # ---- state -----------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the request was cancelled, timed out or ended: cooperative code stops."""
        return self.closed or (self.deadline is not None and time.monotonic() >= self.deadline)

    @property
    def log(self) -> logging.LoggerAdapter:
        return logging.LoggerAdapter(_log, {"request_id": self.id})

    @property
    def session(self) -> "Session":
        """The request's session (``session_id``, or the default one); created on first use."""
        return self.server.sessions.get_or_create(self.session_id)

    # ---- chunks ----------------------------------------------------------------

    async def emit(self, data: Any) -> None:
        """Send one chunk.  Waits for credit (``window``) and for a congested pipe to drain."""
        if self.closed:
            raise RequestClosed(f"request {self.id!r} is finished")
        if self._credit is not None:
            while self._credit <= 0:
                self._credit_event = anyio.Event()
                await self._credit_event.wait()
                if self.closed:
                    raise RequestClosed(f"request {self.id!r} is finished")
            self._credit -= 1
        writer = self.server.writer
        self.chunk_bytes += writer.send(protocol.chunk(self.id, self.seq, data))
        if self._watch_chunks:
            self._watched_chunk()
        self.seq += 1
        if writer.congested:
            await writer.wait_drained()
        else:
            self._since_yield += 1
            if self._since_yield >= YIELD_EVERY:
                self._since_yield = 0
                await anyio.lowlevel.checkpoint()

    def _watched_chunk(self) -> None:
        now = time.perf_counter()
        if self.seq == 0:
            self.first_chunk = now
        if self.telemetry is not None:
            self.telemetry.chunk(now, self.seq)
        else:
            self._watch_chunks = False

    def emit_blocking(self, data: Any) -> None:
        """``emit`` for code running in a worker thread; blocks the thread, not the loop."""
        if self.closed:
            raise RequestClosed(f"request {self.id!r} is finished")
        anyio.from_thread.run(self.emit, data, token=self._token)

    def add_credit(self, n: int) -> None:
        """The host granted ``n`` more chunks (``credit`` frame)."""
        if self._credit is None:
            return
        self._credit += n
        if self._credit_event is not None:
            self._credit_event.set()

    # ---- host tools --------------------------------------------------------------

    async def call_tool(self, name: str, *args: Any, timeout_ms: int | None = None, **kwargs: Any) -> Any:
        """Call tool ``name`` on the host and wait for its answer (``rpc_request``/``rpc_response``).

        Raises ``ToolError`` for the host's error answer and ``TimeoutError`` when
        no answer comes in time.  ``timeout_ms`` is reserved for the call itself.
        """
        return await self.server.tools.call(self, name, list(args), kwargs, timeout_ms)

    def call_tool_blocking(self, name: str, *args: Any, timeout_ms: int | None = None, **kwargs: Any) -> Any:
        """``call_tool`` for code running in a worker thread."""
        if self.closed:
            raise RequestClosed(f"request {self.id!r} is finished")
        return anyio.from_thread.run(self.server.tools.call, self, name, list(args), kwargs, timeout_ms,
                                     token=self._token)

    # ---- lifecycle (server side) -------------------------------------------------

    def close(self) -> None:
        """Mark the request finished: further chunks raise, parked tool calls are cancelled."""
        self.closed = True
        for slot in tuple(self.parked):
            slot.finish(CLOSED)
        if self._credit_event is not None:
            self._credit_event.set()
