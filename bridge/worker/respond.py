"""Every terminal frame the worker writes, under one set of rules: results, errors, rejections.

A request that ran as a task (or an inline one that failed or asked for
telemetry) ends through ``finish``: its ``meta``, its telemetry ``stop`` or
``exception`` first, the frame, then one histogram update.  Successful inline
replies take the grouped mode of the same rules: ``group`` queues them and
``flush`` writes up to ``GROUP`` of them with one clock read, one shared
``meta`` and one ``write``.  A request refused before it ran gets ``reject``:
counted by error type, no ``meta``.  The recorder, when there is one, sees all
of it through the writer's tap.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import msgpack

from bridge.observe.metrics import WorkerMetrics, idle_meta, request_meta
from bridge.wire import framing, protocol
from bridge.wire.errors import ErrorType, PeerError, ToolError
from bridge.wire.redact import holds_secret, redact
from bridge.worker.context import Context
from bridge.worker.transport import FrameWriter

GROUP = 16  # inline replies that share one clock read, one ``meta`` and one write


class Responder:
    """Writes terminal frames with their ``meta`` and counts them in ``metrics``."""

    def __init__(self, writer: FrameWriter, metrics: WorkerMetrics, meta: bool) -> None:
        self.writer = writer
        self.metrics = metrics
        self.meta = meta  # ``--no-meta`` leaves it off
        self.arrived = time.perf_counter()  # when the read being handled returned
        self.group_started = self.arrived  # when the reader began on the current group
        self._replies: list[tuple[str, Any, Any]] = []  # grouped inline replies: (command, id, data)

    def read_arrived(self, now: float) -> None:
        """A read returned: requests it carries arrived ``now``, and a new group starts."""
        self.arrived = self.group_started = now

    # ---- refused, and frames without a request -----------------------------------------

    def reject(self, rid: Any, type: str, message: str, details: dict | None = None) -> None:
        """A request refused before it ran: unknown command, duplicate id, overloaded, shutting down."""
        self.metrics.reject(type)
        self.writer.send(protocol.error(rid, type, message, details))

    def peer_error(self, frame: dict) -> None:
        """The error answering a frame that is no request (bad frame, frame too large): ``id`` nil."""
        self.writer.send(frame)

    # ---- grouped inline replies --------------------------------------------------------

    def group(self, command: str, rid: Any, value: Any) -> None:
        """Queue a successful inline reply; the group is written when full or by ``flush``."""
        self._replies.append((command, rid, value))
        if len(self._replies) >= GROUP:
            self.flush()

    def flush(self) -> None:
        """Write the group of inline replies in one go.  They share one ``meta``: arrival (the
        read) to now, queued until the group started; and one histogram update per command."""
        if not self._replies:
            return
        now = time.perf_counter()
        arrived, started, replies = self.arrived, self.group_started, self._replies
        self._replies, self.group_started = [], now
        ms = (now - arrived) * 1000
        meta = idle_meta(ms, (started - arrived) * 1000) if self.meta else None
        prefix = framing.result_prefix(meta)
        encoded, run_command, run = [], "", 0
        for command, rid, value in replies:
            try:
                data = framing.encode_result(prefix, rid, value)
                clean = redact(value, data)
                if clean is not value or (type(rid) is str and holds_secret(data)):  # hide a secret
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

    # ---- metered requests --------------------------------------------------------------

    def finish(self, ctx: Context, frame: dict) -> None:
        """Write the one terminal frame of a metered request with its ``meta``, after its
        ``stop``/``exception`` telemetry; a result msgpack cannot carry becomes an error."""
        now = time.perf_counter()
        meta = request_meta(ctx, now)
        try:
            self._finish(ctx, frame, meta, now)
        except (TypeError, ValueError, OverflowError) as exc:
            self._finish(ctx, _unsendable(ctx.id, exc), meta, now)

    def _finish(self, ctx: Context, frame: dict, meta: bytes, now: float) -> None:
        extra = framing.META_KEY + meta if self.meta else b""
        if ctx.telemetry is not None:
            framing.encode(frame)  # raises for a result msgpack cannot carry, before ``stop`` is sent
            ctx.telemetry.finish(frame, msgpack.unpackb(meta))
        self.writer.send(frame, extra)  # raises before writing anything for a result msgpack cannot carry
        error = frame["error"]["type"] if frame["type"] == "error" else None
        self.metrics.record(ctx.command, (now - ctx.arrived) * 1000, error, now)


def failure(rid: Any, exc: Exception) -> dict:
    """The error frame for what a handler raised: the host's errors by their type, ours with a traceback."""
    exc = unwrapped(exc)
    if isinstance(exc, PeerError):
        return protocol.error(rid, exc.type, exc.message, exc.details)
    if isinstance(exc, ToolError):
        return protocol.error(rid, ErrorType.TOOL_ERROR, exc.message, {"tool_error": exc.type})
    return protocol.error(rid, ErrorType.HANDLER_ERROR, str(exc) or type(exc).__name__,
                          {"exception": type(exc).__name__},
                          "".join(traceback.format_exception(exc)))


def unwrapped(exc: Exception) -> Exception:
    """The error a task group's ``ExceptionGroup`` stands for, so that it keeps its type wherever it
    was raised: its one leaf, or the first of leaves that are all the same error (parked calls
    failing together at EOF).  A group of different errors stays a group (``handler_error``)."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = _leaves(exc)
    first = leaves[0]
    if isinstance(first, Exception) and all(_same(first, other) for other in leaves[1:]):
        return first
    return exc


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for inner in group.exceptions:
        found.extend(_leaves(inner) if isinstance(inner, BaseExceptionGroup) else [inner])
    return found


def _same(a: BaseException, b: BaseException) -> bool:
    return type(a) is type(b) and getattr(a, "type", None) == getattr(b, "type", None)


def cancelled(req: protocol.Request, reason: str | None) -> dict:
    """The error frame of a request stopped by its deadline (``reason`` None), the host or shutdown."""
    if reason is None:
        return protocol.error(req.id, ErrorType.TIMEOUT,
                              f"request exceeded timeout_ms={req.timeout_ms}", {"timeout_ms": req.timeout_ms})
    if reason == ErrorType.SHUTTING_DOWN:
        return protocol.error(req.id, reason, "the worker shut down before the request finished")
    return protocol.error(req.id, reason, "request cancelled by the host")


def _unsendable(rid: Any, exc: Exception) -> dict:
    return protocol.error(rid, ErrorType.HANDLER_ERROR, f"the handler's result cannot be sent as msgpack: {exc}",
                          {"exception": type(exc).__name__})
