"""The per-request context handed to every handler.

It is the handler's only door to the outside: chunks, host tool calls, the
session, the deadline and cancellation.  It works from the loop (``await``) and
from worker threads (the ``*_blocking`` twins), because sync handlers run in threads.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NamedTuple

import anyio
import anyio.lowlevel

from bridge.observe.metrics import LmUsage
from bridge.observe.telemetry import Post, Telemetry
from bridge.wire import framing, protocol
from bridge.wire.errors import RequestClosed
from bridge.worker.tools import CLOSED

if TYPE_CHECKING:
    from bridge.worker.options import Config
    from bridge.worker.sessions import Session, SessionStore
    from bridge.worker.threads import Threads
    from bridge.worker.tools import Slot, ToolBridge
    from bridge.worker.transport import FrameWriter

_log = logging.getLogger("bridge.handler")
YIELD_EVERY = 32  # chunks emitted between forced checkpoints, so one stream cannot hog the loop


class Shared(NamedTuple):
    """What every request's context may reach: the worker's collaborators, not the worker."""

    writer: "FrameWriter"
    tools: "ToolBridge"
    sessions: "SessionStore"
    threads: "Threads"  # ``await threads.run_sync(fn, *args)``: worker threads, bounded until they return
    token: Any  # the loop's anyio token: ``*_blocking`` calls from threads reach the loop with it
    post: Post  # run ``fn(body)`` on the loop, from any thread
    config: "Config"
    stats: Callable[[], dict[str, Any]]  # the worker's ``stats`` snapshot


class RequestView:
    """What any handler knows about its request: its id, command and session, and the worker's
    ``shared`` collaborators.  An inline handler gets just this: it runs inside the reader,
    so it can neither stream nor call host tools, and building it costs a fifth of a ``Context``."""

    __slots__ = ("id", "command", "session_id", "opens", "shared", "deadline")
    closed = False  # an inline request is running (``Context`` keeps its own)

    def __init__(self, req: protocol.Request, shared: Shared, opens: bool = False) -> None:
        self.id = req.id
        self.command = req.command
        self.session_id = req.session_id
        self.opens = opens  # the command sets its session up: an ended one starts afresh
        self.shared = shared
        self.deadline = time.monotonic() + req.timeout_ms / 1000 if req.timeout_ms is not None else None

    @property
    def cancelled(self) -> bool:
        """True once the request was cancelled, timed out or ended: cooperative code stops."""
        return self.closed or (self.deadline is not None and time.monotonic() >= self.deadline)

    @property
    def log(self) -> logging.LoggerAdapter:
        return logging.LoggerAdapter(_log, {"request_id": self.id})

    @property
    def session(self) -> "Session":
        """The request's session (``session_id``, or the default one); created on first use.
        ``unknown_session`` once for one that expired or was closed, unless the command opens it."""
        return self.shared.sessions.get_or_create(self.session_id, self.opens)


class Context(RequestView):
    """The context of a request run as a task: chunks, credit, host tools, the deadline.  Slots only.

    It is metered for its own ``meta`` (perf_counter seconds, see
    ``observe.metrics.request_meta``); an inline request that succeeds shares its
    group's ``meta`` instead (``worker.respond``).
    """

    __slots__ = ("seq", "closed", "parked",
                 "_writer", "_credit", "_waiters", "_since_yield",
                 "arrived", "started", "first_chunk", "chunk_bytes", "tool_calls", "tool_s", "lm", "telemetry",
                 "_watch_chunks", "_chunk_prefix")

    def __init__(self, req: protocol.Request, shared: Shared, arrived: float, observed: bool = False,
                 lm: bool = False, opens: bool = False) -> None:
        RequestView.__init__(self, req, shared, opens)
        self.seq = 0
        self.closed = False
        self.parked: set[Slot] = set()  # this request's host calls waiting for an answer
        self._writer = shared.writer
        self._credit = req.window
        self._waiters: list[anyio.Event] | None = None  # emitters waiting for credit, one event each
        self._since_yield = YIELD_EVERY  # the loop runs once right after the first chunk
        self.arrived = self.started = arrived  # arrival: the read that carried the request
        self.first_chunk: float | None = None
        self.chunk_bytes = 0
        self.tool_calls = 0
        self.tool_s = 0.0
        # a DSPy command's ``meta`` always has ``lm``; others get one with their first LM call
        self.lm: LmUsage | None = LmUsage() if lm else None
        self.telemetry = (Telemetry(self, shared.config.slow_chunk_ms, self._writer.send, shared.post)
                          if observed else None)
        self._watch_chunks = True  # the first chunk's time, then every chunk's with telemetry
        self._chunk_prefix: bytes | None = None  # built with the first chunk

    # ---- chunks ----------------------------------------------------------------

    async def emit(self, data: Any) -> None:
        """Send one chunk.  Waits for credit (``window``) first; once it is sent, waits for a
        congested pipe to drain, or lets other tasks run every ``YIELD_EVERY`` chunks.  A chunk is
        never held back once its turn came: emitters sharing a request send in the order they emit."""
        if self.closed:
            raise RequestClosed(f"request {self.id!r} is finished")
        if self._credit is not None:
            while self._credit <= 0:
                await self._wait_for_credit()
        self._send(data)
        writer = self._writer
        if writer.congested:
            await writer.wait_drained()
        elif self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await anyio.lowlevel.checkpoint()

    def try_emit(self, data: Any) -> bool:
        """``emit`` without a coroutine, for a chunk that needs no wait before or after it: credit in
        hand, the output not congested, no yield to the loop due.  False: nothing was sent;
        ``await emit(data)``.  A streaming loop that tries this first (``Server._invoke``) creates a
        coroutine only for the chunks that may wait."""
        credit = self._credit
        if (credit is not None and credit <= 0) or self._since_yield >= YIELD_EVERY - 1 or self._writer.congested:
            return False
        self._send(data)
        return True

    def _send(self, data: Any) -> None:
        if self.closed:
            raise RequestClosed(f"request {self.id!r} is finished")
        if self._credit is not None:
            self._credit -= 1
        prefix = self._chunk_prefix
        if prefix is None:
            prefix = self._chunk_prefix = framing.chunk_prefix(self.id)
        self.chunk_bytes += self._writer.send_chunk(prefix, self.id, self.seq, data)
        if self._watch_chunks:
            self._watched_chunk()
        self.seq += 1
        self._since_yield += 1

    async def _wait_for_credit(self) -> None:
        """Park until credit arrives or the request ends.  Several emitters (batch lanes) may
        wait on one request, so each has its own event: one shared slot would lose wake-ups."""
        if self._waiters is None:
            self._waiters = []
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        finally:
            self._waiters.remove(event)
        if self.closed:
            raise RequestClosed(f"request {self.id!r} is finished")

    def _wake_waiters(self) -> None:
        for event in self._waiters or ():
            event.set()

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
        import anyio.from_thread  # first used from a thread, after ready: kept off the start-up

        anyio.from_thread.run(self.emit, data, token=self.shared.token)

    def add_credit(self, n: int) -> None:
        """The host granted ``n`` more chunks (``credit`` frame)."""
        if self._credit is None:
            return
        self._credit += n
        self._wake_waiters()  # each re-checks the credit: one that finds none waits again

    # ---- host tools --------------------------------------------------------------

    def call_tool(self, name: str, *args: Any, timeout_ms: int | None = None, **kwargs: Any) -> Awaitable[Any]:
        """Call tool ``name`` on the host; await the answer (``rpc_request``/``rpc_response``).

        Raises ``ToolError`` for the host's error answer and ``TimeoutError`` when
        no answer comes in time.  ``timeout_ms`` is reserved for the call itself.
        Not a coroutine function itself: the caller awaits the bridge's call directly,
        one coroutine frame fewer to resume per answer.
        """
        return self.shared.tools.call(self, name, list(args), kwargs, timeout_ms)

    def call_tool_blocking(self, name: str, *args: Any, timeout_ms: int | None = None, **kwargs: Any) -> Any:
        """``call_tool`` for code running in a worker thread."""
        if self.closed:
            raise RequestClosed(f"request {self.id!r} is finished")
        import anyio.from_thread

        return anyio.from_thread.run(self.shared.tools.call, self, name, list(args), kwargs, timeout_ms,
                                     token=self.shared.token)

    # ---- lifecycle (server side) -------------------------------------------------

    def close(self) -> None:
        """Mark the request finished: further chunks raise, parked tool calls are cancelled."""
        self.closed = True
        for slot in tuple(self.parked):
            slot.finish(CLOSED)
        self._wake_waiters()
