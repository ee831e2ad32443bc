"""The worker's event loop: read frames and dispatch them; terminal frames go through ``respond``.

One anyio task group owns everything: the reader (this module), the writer
task, the signal watcher, housekeeping (the session sweep, reaping adopted
orphans), warm-ups, and one task per non-inline request.  Requests are
cancelled through their own cancel scopes; the reader never blocks on a
handler.  A sync handler runs in a worker thread (``worker.threads``), which a
cancel or timeout abandons: the request ends at once, and the thread runs on
until the handler returns (it can poll ``ctx.cancelled``), still counted
against ``--max-threads``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from contextlib import aclosing
from functools import partial
from typing import Any, AsyncIterator, Callable

import anyio
import anyio.lowlevel

from bridge import __version__
from bridge.observe.current import REQUEST
from bridge.observe.metrics import WorkerMetrics, rss_bytes
from bridge.wire import framing, protocol
from bridge.wire.errors import ErrorType, RequestClosed
from bridge.wire.framing import Frame
from bridge.wire.protocol import Request, RpcResponse
from bridge.wire.redact import learn
from bridge.worker import children, paths
from bridge.worker.context import Context, RequestView, Shared
from bridge.worker.options import Config
from bridge.worker.registry import REGISTRY, Entry, Kind, Registry
from bridge.worker.respond import Responder, cancelled, failure
from bridge.worker.sessions import SessionStore
from bridge.worker.threads import Threads
from bridge.worker.tools import ToolBridge
from bridge.worker.transport import FrameWriter, Reader, peer_closed, prepare_fd

log = logging.getLogger("bridge.server")

CAPABILITIES = ["chunks", "cancel", "timeout", "credit", "rpc", "sessions", "meta", "telemetry"]
# An enum member looked up on its class costs about 0.1 µs in Python 3.11; dispatch compares with these.
INLINE, ASYNC, SYNC, ASYNC_GEN = Kind.INLINE, Kind.ASYNC, Kind.SYNC, Kind.ASYNC_GEN
# uvloop's clock counts whole milliseconds, and so does the timer a deadline sets: each may be up to
# one behind the real time, so a request's deadline gets two more, never to end before its timeout_ms.
UVLOOP_DEADLINE_SLACK = 0.002


class Inflight:
    """One running request: its context, cancel scope and why it was cancelled."""

    __slots__ = ("ctx", "scope", "reason")

    def __init__(self, ctx: Context, deadline: float) -> None:
        self.ctx = ctx
        self.scope = anyio.CancelScope(deadline=deadline)
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()


class Server:
    def __init__(self, config: Config, registry: Registry = REGISTRY) -> None:
        self.config = config
        self.registry = registry
        self.commands = registry.entries  # name -> Entry, read once per request
        paths.configure(config.allow_paths, config.max_file_bytes)
        self.started = time.monotonic()
        self.inflight: dict[Any, Inflight] = {}
        self.sessions = SessionStore(config.max_objects, config.max_sessions, config.session_ttl)
        self.frames_in = 0
        self.bytes_in = 0
        self.metrics = WorkerMetrics()
        self.telemetry_all = config.telemetry  # read per request: a plain attribute is cheapest
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in serve()
        self.loop_name = ""  # uvloop or asyncio (--loop), set in serve()
        self.deadline_slack = 0.0  # added to a request's deadline on the loop's clock
        self.loop_thread = 0
        self.shutting_down = False
        self.writer: FrameWriter = None  # type: ignore[assignment]  # set in serve()
        self.tools: ToolBridge = None  # type: ignore[assignment]
        self.respond: Responder = None  # type: ignore[assignment]
        self.shared: Shared = None  # type: ignore[assignment]
        self.warm = anyio.Event()
        self.threads = Threads(config.max_threads, config.max_thread_queue)
        self._idle = anyio.Event()
        self._tg: anyio.abc.TaskGroup = None  # type: ignore[assignment]
        self.recorder: Any = None  # with --record, installed by the CLI: sees every frame both ways

    # ---- lifecycle ---------------------------------------------------------------

    async def serve(self) -> int:
        """Run until shutdown, EOF or a closed port; returns the process exit code."""
        cfg = self.config
        prepare_fd(cfg.in_fd)
        prepare_fd(cfg.out_fd)
        self.writer = FrameWriter(cfg.out_fd)
        if self.recorder is not None:
            self.writer.tap = self.recorder.frame_out
        self.tools = ToolBridge(self.writer, cfg.tool_timeout_ms)
        self.respond = Responder(self.writer, self.metrics, cfg.meta)
        self.loop, self.loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self.loop_name = type(self.loop).__module__.partition(".")[0]
        self.deadline_slack = UVLOOP_DEADLINE_SLACK if self.loop_name == "uvloop" else 0.0
        self.shared = Shared(self.writer, self.tools, self.sessions, self.threads, anyio.lowlevel.current_token(),
                             self.post, cfg, self.stats)
        # Signals are caught from before ``ready``: a SIGTERM that comes before the watcher
        # task first runs is a shutdown too, not the default death.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.writer.run)
                self.writer.send(protocol.ready(__version__, os.getpid(), self.registry.names(), CAPABILITIES))
                tg.start_soon(self._watch_signals, signals)
                tg.start_soon(self._housekeeping)
                tg.start_soon(self._warm_up)
                tg.start_soon(self._watch_broken_pipe)
                tg.start_soon(self.tools.run_timer)
                await self._read_loop()
        return 0

    async def _read_loop(self) -> None:
        decoder = framing.Decoder(self.config.max_frame_bytes, keep_raw=self.recorder is not None)
        await Reader(self.config.in_fd, partial(self._on_read, decoder)).run(self.writer.wait_drained)
        self._on_eof()

    def _on_read(self, decoder: framing.Decoder, data: memoryview) -> bool:
        """One read (empty at EOF): decode its frames, dispatch them, and write their replies in
        one go.  False pauses reading until the output drains."""
        writer, respond = self.writer, self.respond
        respond.read_arrived(time.perf_counter())
        writer.cork()
        try:
            if data:
                self.bytes_in += len(data)
                events = decoder.feed(data)
            else:
                events = decoder.close()
            for event in events:
                self._on_decoded(event)
        finally:
            respond.flush()
            writer.uncork()
        return not writer.congested

    def _on_eof(self) -> None:
        """EOF on input: a closed port exits at once; a finished shell pipe drains first."""
        if self.recorder is not None:
            self.recorder.eof()
        self.tools.input_closed()
        if peer_closed(self.config.out_fd):
            log.info("input and output closed (port_close): exiting now")
            self._tg.cancel_scope.cancel()
            return
        log.info("EOF on input: finishing %d request(s) in flight", len(self.inflight))
        self.begin_shutdown()

    def begin_shutdown(self) -> None:
        if not self.shutting_down:
            self.shutting_down = True
            self._tg.start_soon(self._drain)

    async def _drain(self) -> None:
        """Let in-flight requests finish (bounded by ``drain_timeout``), then stop."""
        with anyio.move_on_after(self.config.drain_timeout):
            while self.inflight:
                await self._idle.wait()
        for state in list(self.inflight.values()):
            state.cancel(ErrorType.SHUTTING_DOWN)
        while self.inflight:  # the cancelled requests write their terminal frames
            await self._idle.wait()
        await anyio.lowlevel.checkpoint()
        self._tg.cancel_scope.cancel()

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("signal %d: shutting down", signum)
            self.begin_shutdown()

    async def _watch_broken_pipe(self) -> None:
        await self.writer.broken.wait()
        log.info("output closed by the host: exiting now")
        self._tg.cancel_scope.cancel()

    async def _housekeeping(self) -> None:
        """Once a second: end idle sessions, reap adopted orphan processes (``worker.children``)."""
        while True:
            await anyio.sleep(1.0)
            for sid in self.sessions.sweep():
                log.info("session %r expired", sid)
            for pid in children.reap_adopted():
                log.debug("reaped adopted orphan process %d", pid)

    async def _warm_up(self) -> None:
        """Run registered warm-ups (the DSPy import) in a thread, after ``ready`` is out."""
        try:
            for fn in self.registry.warmups:
                await self.threads.run_sync(fn)
        except Exception:
            log.exception("warm-up failed; requests that need it will fail on their own")
        finally:
            gc.freeze()  # what the warm-up imported lives forever: keep it out of every collection
            self.warm.set()

    # ---- dispatch ----------------------------------------------------------------

    def _on_decoded(self, event: framing.Event) -> None:
        self.frames_in += 1
        if self.recorder is not None:
            self.recorder.frame_in(event)
        if type(event) is Frame:
            parsed = protocol.parse(event.body)
            kind = type(parsed)
            if kind is Request:  # the common frames: one call fewer than through ``_dispatch``
                self._on_request(parsed)
            elif kind is RpcResponse:
                self.tools.on_response(parsed)
            else:
                self._dispatch(parsed)
        elif isinstance(event, framing.FrameTooLarge):
            if framing.looks_like_json(event.header):
                log.warning("%s", framing.JSON_HINT)
            self.respond.peer_error(protocol.error(None, ErrorType.FRAME_TOO_LARGE,
                                                   framing.describe(event),
                                                   {"size": event.size, "limit": event.limit}))
        elif isinstance(event, framing.BadFrame):
            self.respond.peer_error(protocol.error(None, ErrorType.BAD_FRAME, event.reason, {"size": event.size}))
        else:
            self.respond.peer_error(protocol.error(None, ErrorType.BAD_FRAME, framing.describe(event)))

    def _dispatch(self, event: protocol.Event) -> None:
        if isinstance(event, protocol.Request):
            self._on_request(event)
        elif isinstance(event, protocol.RpcResponse):
            self.tools.on_response(event)
        elif isinstance(event, protocol.Cancel):  # ids are checked by ``protocol.parse``: never a bool
            state = self.inflight.get(event.id)
            if state is not None:
                state.cancel(ErrorType.CANCELLED)
        elif isinstance(event, protocol.Credit):
            state = self.inflight.get(event.id)
            if state is not None:
                state.ctx.add_credit(event.n)
        elif isinstance(event, protocol.Shutdown):
            self.begin_shutdown()
        else:
            self.respond.peer_error(event.frame)

    def _on_request(self, req: protocol.Request) -> None:
        if req.args:
            learn(req.args)  # a credential in any request is redacted by value from now on
        respond = self.respond
        if self.shutting_down:
            respond.reject(req.id, ErrorType.SHUTTING_DOWN, "the worker is shutting down and accepts no new requests")
            return
        entry = self.commands.get(req.command)
        if entry is None:
            respond.reject(req.id, ErrorType.UNKNOWN_COMMAND, f"unknown command {protocol.quote(req.command)}",
                           {"command": req.command, "available": self.registry.names()})
            return
        if req.id in self.inflight:
            respond.reject(None, ErrorType.DUPLICATE_ID, f"request id {protocol.quote(req.id)} is already in flight", {"id": req.id})
            return
        if req.args and entry.args is not None and not req.args.keys() <= entry.args:  # C speed when all are known
            unknown = entry.unknown_argument(req.args)
            if unknown is not None:
                respond.reject(req.id, ErrorType.BAD_REQUEST, _unknown_message(entry.name, unknown), unknown)
                return
        if entry.kind is INLINE:
            self._run_inline(entry, req)
            return
        if len(self.inflight) >= self.config.max_inflight:
            respond.reject(req.id, ErrorType.OVERLOADED, f"{len(self.inflight)} requests are in flight (--max-inflight)",
                           {"limit": self.config.max_inflight})
            return
        deadline = (anyio.current_time() + req.timeout_ms / 1000 + self.deadline_slack if req.timeout_ms is not None
                    else float("inf"))
        ctx = Context(req, self.shared, respond.arrived, req.telemetry or self.telemetry_all, entry.needs_dspy,
                      entry.opens_session)
        state = self.inflight[req.id] = Inflight(ctx, deadline)
        self._tg.start_soon(self._run, entry, req, state)

    def _run_inline(self, entry: Entry, req: protocol.Request) -> None:
        """Run an inline handler now; its reply joins the responder's group.  A request with
        telemetry, or a failing one, is answered at once with its own ``meta``."""
        respond = self.respond
        if req.telemetry or self.telemetry_all:
            self._run_inline_observed(entry, req)
            return
        try:
            value = entry.fn(req.args, RequestView(req, self.shared, entry.opens_session))
        except Exception as exc:
            ctx = Context(req, self.shared, respond.arrived, False, False, entry.opens_session)
            ctx.started = respond.group_started
            ctx.closed = True
            respond.finish(ctx, failure(req.id, exc))
        else:
            respond.group(entry.name, req.id, value)

    def _run_inline_observed(self, entry: Entry, req: protocol.Request) -> None:
        """An inline request with telemetry: metered in full, with its own ``start`` and ``stop``."""
        ctx = Context(req, self.shared, self.respond.arrived, True, False, entry.opens_session)
        _begin(ctx)
        try:
            frame = protocol.result(req.id, entry.fn(req.args, ctx))
        except Exception as exc:
            frame = failure(req.id, exc)
        ctx.closed = True
        self.respond.finish(ctx, frame)

    def stats(self) -> dict[str, Any]:
        """The ``stats`` snapshot; the inline replies grouped before it are written and counted first."""
        self.respond.flush()
        writer = self.writer
        return {
            "uptime_s": time.monotonic() - self.started,
            "loop": self.loop_name,
            "warm": self.warm.is_set(),
            "in_flight": len(self.inflight),
            "tool_calls_parked": self.tools.parked,
            "threads": self.threads.stats(),
            "frames_in": self.frames_in,
            "frames_out": writer.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": writer.bytes_out,
            "rss_bytes": rss_bytes(),
            "sessions": len(self.sessions),
            "objects": self.sessions.object_count,
            **self.metrics.snapshot(),  # requests, errors, latency_ms, histogram_buckets, lm
            "lm_by_session": self.sessions.lm_usage(),
        }

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run ``fn(arg)`` on the loop: now when called there, else as soon as the loop can."""
        if threading.get_ident() == self.loop_thread:
            fn(arg)
        else:
            self.loop.call_soon_threadsafe(fn, arg)

    async def _run(self, entry: Entry, req: protocol.Request, state: Inflight) -> None:
        ctx = state.ctx
        REQUEST.set(ctx)  # in this request's task: its LM calls are its own (threads inherit it)
        frame: dict | None = None
        try:
            with state.scope:
                if entry.needs_dspy and not self.warm.is_set():
                    await self.warm.wait()
                if entry.kind is ASYNC or entry.kind is ASYNC_GEN:
                    _begin(ctx)  # thread handlers begin in their thread: waiting for one is queue time
                frame = protocol.result(req.id, await self._invoke(entry, req.args, ctx))
        except Exception as exc:
            frame = failure(req.id, exc)
        finally:
            ctx.close()
            del self.inflight[req.id]
            if not self.inflight:
                self._idle.set()
                self._idle = anyio.Event()
        if frame is None or (ctx.deadline is not None and time.monotonic() >= ctx.deadline):
            # Cancelled, or finished past its deadline: a cooperative handler that saw
            # ``ctx.cancelled`` (the same clock) may return before the loop's timer fires, which
            # ``deadline_slack`` delays; that is a timeout.
            frame = cancelled(req, state.reason)
        self.respond.finish(ctx, frame)

    async def _invoke(self, entry: Entry, args: dict, ctx: Context) -> Any:
        """Drive the handler by its kind: on the loop, or in a worker thread (abandoned on cancel,
        counted against ``--max-threads`` until it returns)."""
        kind = entry.kind
        if kind is ASYNC:
            return await entry.fn(args, ctx)
        if kind is SYNC:
            return await self.threads.run_sync(_call_sync, entry, args, ctx)
        if kind is ASYNC_GEN:
            async with aclosing(entry.fn(args, ctx)) as agen:
                async for item in agen:
                    if not ctx.try_emit(item):
                        await ctx.emit(item)
            return None
        return await self.threads.run_sync(_drive_generator, entry, args, ctx)


def _unknown_message(command: str, details: dict) -> str:
    hint = f"; did you mean {details['did_you_mean']!r}?" if "did_you_mean" in details else ""
    return f"{command} takes no argument {protocol.quote(details['argument'])}{hint} (it takes: {', '.join(details['known']) or 'none'})"


def _begin(ctx: Context) -> None:
    """The handler starts now: the end of ``queue_ms``, and the ``start`` event."""
    ctx.started = time.perf_counter()
    if ctx.telemetry is not None:
        ctx.telemetry.start()


def _call_sync(entry: Entry, args: dict, ctx: Context) -> Any:
    """Run a sync handler in its worker thread."""
    _begin(ctx)
    return entry.fn(args, ctx)


def _drive_generator(entry: Entry, args: dict, ctx: Context) -> Any:
    """Run a sync generator handler in its worker thread, emitting each item on the loop."""
    _begin(ctx)
    gen = entry.fn(args, ctx)
    try:
        while True:
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            ctx.emit_blocking(item)
    except RequestClosed:
        return None
    finally:
        gen.close()
