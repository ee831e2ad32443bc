"""The worker's event loop: read frames, dispatch requests, write chunks and results.

One anyio task group owns everything: the reader (this module), the writer
task, the signal watcher, the session sweeper, warm-ups, and one task per
non-inline request.  Requests are cancelled through their own cancel scopes;
the reader never blocks on a handler.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
import traceback
from contextlib import aclosing
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgpack

from . import __version__, framing, lm_metrics, paths, protocol
from .context import Context, RequestClosed
from .metrics import LmUsage, WorkerMetrics, idle_meta, request_meta
from .protocol import ErrorType, PeerError
from .redact import learn, redact
from .registry import REGISTRY, Entry, Kind, Registry
from .sessions import SessionStore
from .tools import ToolBridge, ToolError
from .transport import FrameWriter, peer_closed, prepare_fd, read_some

log = logging.getLogger("bridge.server")

CAPABILITIES = ["chunks", "cancel", "timeout", "credit", "rpc", "sessions", "meta", "telemetry"]
REPLY_GROUP = 16  # inline replies that share one clock read, one ``meta`` and one write


class Config(NamedTuple):
    in_fd: int = 0
    out_fd: int = 1
    max_frame_bytes: int = framing.MAX_FRAME_BYTES
    max_threads: int = 32
    drain_timeout: float = 30.0
    tool_timeout_ms: int = 30_000
    max_objects: int = 10_000
    max_inflight: int = 10_000
    allow_modules: tuple[str, ...] = ()  # module prefixes 'call' may reach beyond its table (--allow-module)
    allow_names: tuple[str, ...] = ()  # exact 'call' targets added to the table (--allow)
    allow_paths: tuple[str, ...] = ()  # directories host paths may lie in (--allow-path)
    max_file_bytes: int = 64 * 1024 * 1024  # the largest file read for a host (--max-file-bytes)
    allow_api_bases: tuple[str, ...] = ()  # URL prefixes a frame may send the operator's key to
    meta: bool = True  # ``meta`` on terminal frames (``--no-meta`` is the benchmark's baseline)
    telemetry: bool = False  # telemetry frames for every request, not only those asking
    slow_chunk_ms: float = 100.0  # a gap between chunks above this is a slow_chunk event


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
        paths.configure(config.allow_paths, config.max_file_bytes)
        self.started = time.monotonic()
        self.inflight: dict[Any, Inflight] = {}
        self.sessions = SessionStore(config.max_objects)
        self.frames_in = 0
        self.bytes_in = 0
        self.arrived = time.perf_counter()  # when the read batch being handled arrived
        self._replies: list[tuple[str, Any, Any]] = []  # inline replies not yet written: (command, id, data)
        self._group_started = self.arrived  # when the reader began on the group of ``_replies``
        self.metrics = WorkerMetrics()
        self.telemetry_all = config.telemetry  # read per request: a plain attribute is cheapest
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in serve()
        self.loop_thread = 0
        self.shutting_down = False
        self.writer: FrameWriter = None  # type: ignore[assignment]  # set in serve()
        self.tools: ToolBridge = None  # type: ignore[assignment]
        self.warm = anyio.Event()
        self.limiter = anyio.CapacityLimiter(config.max_threads)
        self._idle = anyio.Event()
        self._token: Any = None
        self._tg: anyio.abc.TaskGroup = None  # type: ignore[assignment]
        self.recorder: Any = None  # a transcript.Recorder with --record: sees every frame both ways

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
        self._token = anyio.lowlevel.current_token()
        self.loop, self.loop_thread = asyncio.get_running_loop(), threading.get_ident()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self.writer.run)
            self.writer.send(protocol.ready(__version__, os.getpid(), self.registry.names(), CAPABILITIES))
            tg.start_soon(self._watch_signals)
            tg.start_soon(self._sweep_sessions)
            tg.start_soon(self._warm_up)
            tg.start_soon(self._watch_broken_pipe)
            tg.start_soon(self.tools.run_timer)
            await self._read_loop()
        return 0

    async def _read_loop(self) -> None:
        decoder = framing.Decoder(self.config.max_frame_bytes, keep_raw=self.recorder is not None)
        fd = self.config.in_fd
        writer = self.writer
        while True:
            try:
                data, waited = await read_some(fd)
            except OSError:
                data, waited = b"", True
            self.arrived = self._group_started = time.perf_counter()
            writer.cork()
            try:
                if not data:
                    for event in decoder.close():
                        self._on_decoded(event)
                else:
                    self.bytes_in += len(data)
                    for event in decoder.feed(data):
                        self._on_decoded(event)
            finally:
                self.flush_replies()
                writer.uncork()
            if not data:
                self._on_eof()
                return
            if writer.congested:
                await writer.wait_drained()
            elif not waited:
                await anyio.lowlevel.checkpoint()  # input keeps coming: let handlers run too

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

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                self.begin_shutdown()

    async def _watch_broken_pipe(self) -> None:
        await self.writer.broken.wait()
        log.info("output closed by the host: exiting now")
        self._tg.cancel_scope.cancel()

    async def _sweep_sessions(self) -> None:
        while True:
            await anyio.sleep(1.0)
            for sid in self.sessions.sweep():
                log.info("session %r expired", sid)

    async def _warm_up(self) -> None:
        """Run registered warm-ups (the DSPy import) in a thread, after ``ready`` is out."""
        try:
            for fn in self.registry.warmups:
                await anyio.to_thread.run_sync(fn, limiter=self.limiter, abandon_on_cancel=True)
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
        if isinstance(event, framing.Frame):
            self._dispatch(protocol.parse(event.body))
        elif isinstance(event, framing.FrameTooLarge):
            self.writer.send(protocol.error(
                None, ErrorType.FRAME_TOO_LARGE,
                f"frame of {event.size} bytes exceeds --max-frame-bytes={event.limit}; it was skipped",
                {"size": event.size, "limit": event.limit}))
        elif isinstance(event, framing.BadFrame):
            self.writer.send(protocol.error(None, ErrorType.BAD_FRAME, event.reason, {"size": event.size}))
        else:
            self.writer.send(protocol.error(
                None, ErrorType.BAD_FRAME,
                f"input ended inside a frame ({event.have} of {event.want} bytes)"))

    def _dispatch(self, event: protocol.Event) -> None:
        if isinstance(event, protocol.Request):
            self._on_request(event)
        elif isinstance(event, protocol.RpcResponse):
            self.tools.on_response(event)
        elif isinstance(event, protocol.Cancel):
            state = self.inflight.get(event.id) if isinstance(event.id, (int, str)) else None
            if state is not None:
                state.cancel(ErrorType.CANCELLED)
        elif isinstance(event, protocol.Credit):
            state = self.inflight.get(event.id) if isinstance(event.id, (int, str)) else None
            if state is not None:
                state.ctx.add_credit(event.n)
        elif isinstance(event, protocol.Shutdown):
            self.begin_shutdown()
        else:
            self.writer.send(event.frame)

    def _on_request(self, req: protocol.Request) -> None:
        if req.args:
            learn(req.args)  # a credential in any request is redacted by value from now on
        if self.shutting_down:
            self.metrics.reject(ErrorType.SHUTTING_DOWN)
            self.writer.send(protocol.error(req.id, ErrorType.SHUTTING_DOWN,
                                            "the worker is shutting down and accepts no new requests"))
            return
        entry = self.registry.get(req.command)
        if entry is None:
            self.metrics.reject(ErrorType.UNKNOWN_COMMAND)
            self.writer.send(protocol.error(req.id, ErrorType.UNKNOWN_COMMAND,
                                            f"unknown command {protocol.quote(req.command)}",
                                            {"command": req.command, "available": self.registry.names()}))
            return
        if req.id in self.inflight:
            self.metrics.reject(ErrorType.DUPLICATE_ID)
            self.writer.send(protocol.error(None, ErrorType.DUPLICATE_ID,
                                            f"request id {protocol.quote(req.id)} is already in flight", {"id": req.id}))
            return
        if entry.kind is Kind.INLINE:
            self._run_inline(entry, req)
            return
        if len(self.inflight) >= self.config.max_inflight:
            self.metrics.reject(ErrorType.OVERLOADED)
            self.writer.send(protocol.error(req.id, ErrorType.OVERLOADED,
                                            f"{len(self.inflight)} requests are in flight (--max-inflight)",
                                            {"limit": self.config.max_inflight}))
            return
        deadline = anyio.current_time() + req.timeout_ms / 1000 if req.timeout_ms is not None else float("inf")
        ctx = Context(self, req, self._token).meter(self.arrived, req.telemetry or self.telemetry_all)
        if entry.needs_dspy:
            ctx.lm = LmUsage()  # a DSPy command's ``meta`` always has ``lm``, zeros without LM calls
        state = self.inflight[req.id] = Inflight(ctx, deadline)
        self._tg.start_soon(self._run, entry, req, state)

    def _run_inline(self, entry: Entry, req: protocol.Request) -> None:
        """Run an inline handler now; its reply joins the group written by ``flush_replies``.
        A request with telemetry, or a failing one, is answered at once with its own ``meta``."""
        ctx = Context(self, req, self._token)
        observed = req.telemetry or self.telemetry_all
        if observed:
            _begin(ctx.meter(self.arrived, True))
        try:
            value = entry.fn(req.args, ctx)
        except Exception as exc:
            frame = self._failure(req.id, exc)
        else:
            if not observed:
                ctx.closed = True
                replies = self._replies
                replies.append((entry.name, req.id, value))
                if len(replies) >= REPLY_GROUP:
                    self.flush_replies()
                return
            frame = protocol.result(req.id, value)
        ctx.closed = True
        if not observed:
            ctx.meter(self.arrived, False).started = self._group_started
        self._send_terminal(ctx, frame)

    def flush_replies(self) -> None:
        """Write the group of inline replies in one go (``stats`` calls it first, so it counts
        every request answered before it).  They share one ``meta``: arrival (the
        read) to now, queued until the group started; and one histogram update per command."""
        if not self._replies:
            return
        now = time.perf_counter()
        arrived, started, replies = self.arrived, self._group_started, self._replies
        self._replies, self._group_started = [], now
        ms = (now - arrived) * 1000
        meta = idle_meta(ms, (started - arrived) * 1000) if self.config.meta else None
        prefix = framing.result_prefix(meta)
        encoded, run_command, run = [], "", 0
        for command, rid, value in replies:
            try:
                data = framing.encode_result(prefix, rid, value)
                clean = redact(value, data)
                if clean is not value or (type(rid) is str and redact(rid, data) is not rid):  # hide a secret
                    data = framing.encode_result(prefix, redact(rid), clean)
                encoded.append(data)
            except (TypeError, ValueError, OverflowError) as exc:
                encoded.append(framing.encode(redact(_unsendable(rid, exc)), b"" if meta is None else framing.META_KEY + meta))
                self.metrics.record(command, ms, ErrorType.HANDLER_ERROR, now)
                continue
            if command is not run_command:
                if run:
                    self.metrics.record(run_command, ms, None, now, run)
                run_command, run = command, 0
            run += 1
        if run:
            self.metrics.record(run_command, ms, None, now, run)
        self.writer.send_encoded(encoded)

    async def _run(self, entry: Entry, req: protocol.Request, state: Inflight) -> None:
        ctx = state.ctx
        if self.recorder is not None:
            self.recorder.bind(ctx)  # in this request's task: its LM calls are recorded as its own
        if entry.needs_dspy:
            lm_metrics.CURRENT.set(ctx)  # its LM calls count in its meta (threads inherit it)
        frame: dict | None = None
        try:
            with state.scope:
                if entry.needs_dspy and not self.warm.is_set():
                    await self.warm.wait()
                if entry.kind is Kind.ASYNC or entry.kind is Kind.ASYNC_GEN:
                    _begin(ctx)  # thread handlers begin in their thread: waiting for one is queue time
                frame = protocol.result(req.id, await self._invoke(entry, req.args, ctx))
        except Exception as exc:
            frame = self._failure(req.id, exc)
        finally:
            ctx.close()
            del self.inflight[req.id]
            if not self.inflight:
                self._idle.set()
                self._idle = anyio.Event()
        if frame is None or anyio.current_time() >= state.scope.deadline:
            # Cancelled, or finished past its deadline: a cooperative handler that saw
            # ``ctx.cancelled`` may return before the loop's timer fires; that is a timeout.
            frame = self._cancelled_frame(req, state.reason)
        self._send_terminal(ctx, frame)

    async def _invoke(self, entry: Entry, args: dict, ctx: Context) -> Any:
        kind = entry.kind
        if kind is Kind.ASYNC:
            return await entry.fn(args, ctx)
        if kind is Kind.SYNC:
            return await anyio.to_thread.run_sync(_call_sync, entry, args, ctx, abandon_on_cancel=True,
                                                  limiter=self.limiter)
        if kind is Kind.ASYNC_GEN:
            async with aclosing(entry.fn(args, ctx)) as agen:
                async for item in agen:
                    await ctx.emit(item)
            return None
        return await anyio.to_thread.run_sync(_drive_generator, entry, args, ctx, abandon_on_cancel=True,
                                              limiter=self.limiter)

    @staticmethod
    def _cancelled_frame(req: protocol.Request, reason: str | None) -> dict:
        if reason is None:
            return protocol.error(req.id, ErrorType.TIMEOUT,
                                  f"request exceeded timeout_ms={req.timeout_ms}", {"timeout_ms": req.timeout_ms})
        if reason == ErrorType.SHUTTING_DOWN:
            return protocol.error(req.id, reason, "the worker shut down before the request finished")
        return protocol.error(req.id, reason, "request cancelled by the host")

    @staticmethod
    def _failure(rid: Any, exc: Exception) -> dict:
        if isinstance(exc, PeerError):
            return protocol.error(rid, exc.type, exc.message, exc.details)
        if isinstance(exc, ToolError):
            return protocol.error(rid, ErrorType.TOOL_ERROR, exc.message, {"tool_error": exc.type})
        return protocol.error(rid, ErrorType.HANDLER_ERROR, str(exc) or type(exc).__name__,
                              {"exception": type(exc).__name__},
                              "".join(traceback.format_exception(exc)))

    def _send_terminal(self, ctx: Context, frame: dict) -> None:
        """Write the one terminal frame of a metered request with its ``meta``, after its
        ``stop``/``exception`` telemetry; a result msgpack cannot carry becomes an error."""
        now = time.perf_counter()
        meta = request_meta(ctx, now)
        try:
            self._finish(ctx, frame, meta, now)
        except (TypeError, ValueError, OverflowError) as exc:
            self._finish(ctx, _unsendable(ctx.id, exc), meta, now)

    def _finish(self, ctx: Context, frame: dict, meta: bytes, now: float) -> None:
        extra = framing.META_KEY + meta if self.config.meta else b""
        if ctx.telemetry is not None:
            framing.encode(frame)  # raises for a result msgpack cannot carry, before ``stop`` is sent
            ctx.telemetry.finish(frame, msgpack.unpackb(meta))
        self.writer.send(frame, extra)  # raises before writing anything for a result msgpack cannot carry
        error = frame["error"]["type"] if frame["type"] == "error" else None
        self.metrics.record(ctx.command, (now - ctx.arrived) * 1000, error, now)


def _unsendable(rid: Any, exc: Exception) -> dict:
    return protocol.error(rid, ErrorType.HANDLER_ERROR, f"the handler's result cannot be sent as msgpack: {exc}",
                          {"exception": type(exc).__name__})


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
