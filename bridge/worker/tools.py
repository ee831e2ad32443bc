"""The tool bridge: host calls parked as ``rpc_request`` frames until their ``rpc_response``.

Modelled on the MCP SDK's session layer: each call owns one slot keyed by
``rpc_id``; responses fill slots in any order; the slot is removed in
``finally`` whatever happens, so nothing keyed by ``rpc_id`` outlives its call.

A call is on the hot path of ReAct and of ``rpc_loop``, so it uses no cancel
scope of its own, and it parks on a bare future of the running loop (the worker
always runs on anyio's asyncio backend): an ``anyio.Event`` is created through
backend dispatch and waits on an ``asyncio.Event``, which makes yet another
future — together about half the cost of a host call.  Cancellation still
reaches the waiting task the anyio way, through its scope.

Deadlines are kept by one timer task: calls with the same
timeout expire in the order they were made, so per timeout value an insertion-
ordered dict is a deadline queue with O(1) removal when the answer comes first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import anyio

from bridge.observe.logs import Throttled
from bridge.wire import protocol
from bridge.wire.errors import RequestClosed, ToolError
from bridge.wire.redact import arguments

if TYPE_CHECKING:
    from bridge.worker.transport import FrameWriter

log = logging.getLogger("bridge.tools")
HOST_CLOSED = ("the host closed its input, so no tool answer can arrive: host tools need a live host "
               "(an Erlang port or bridge.Worker), not a shell pipe")


class Caller(Protocol):
    """The request a call is made for (a ``worker.context.Context``): what the bridge reads and counts."""

    id: Any
    closed: bool
    parked: set["Slot"]
    telemetry: Any
    tool_calls: int
    tool_s: float


class Slot:
    """One parked call: filled by the host's answer, or aborted by a deadline, the request or EOF."""

    __slots__ = ("future", "response", "abort", "deadline")

    def __init__(self, future: asyncio.Future[None], deadline: float) -> None:
        self.future = future
        self.response: protocol.RpcResponse | None = None
        self.abort: str | None = None
        self.deadline = deadline

    def finish(self, abort: str) -> None:
        if not self.future.done():
            self.abort = abort
            self.future.set_result(None)


class ToolBridge:
    """Owns every parked host call of the worker, and the timer task that expires them."""

    def __init__(self, writer: "FrameWriter", default_timeout_ms: int) -> None:
        self.default_timeout_ms = default_timeout_ms
        self._writer = writer
        self._ids = itertools.count(1)
        self._slots: dict[int, Slot] = {}
        self._deadlines: dict[int, dict[int, Slot]] = {}  # timeout_ms -> rpc_id -> slot, oldest first
        self._wake = anyio.Event()
        self._planned = math.inf  # when the timer task wakes next, unless woken sooner
        self._input_closed = False
        self._ignored = Throttled(log)  # one line a second, however many stray answers come
        self._loop = asyncio.get_running_loop()  # the worker's loop: every call parks on a future of it

    @property
    def parked(self) -> int:
        return len(self._slots)

    async def call(self, ctx: "Caller", tool: str, args: list, kwargs: dict, timeout_ms: int | None = None,
                   announce: Callable[[int], Awaitable[None]] | None = None) -> Any:
        """Send one ``rpc_request`` for ``ctx``'s request and wait for the answer.

        ``announce(rpc_id)`` runs just before the request is written, so a caller
        can tell the host which call is coming (ReAct's ``tool_call`` chunk).
        """
        if type(tool) is not str:  # the frame's own fields are not walked for secret names (``named``)
            raise TypeError(f"a tool's name is a str, not {type(tool).__name__}")
        if self._input_closed:
            raise ToolError("host_closed", HOST_CLOSED)
        if ctx.closed:
            raise _closed(ctx, tool)
        timeout_ms = self.default_timeout_ms if timeout_ms is None else timeout_ms
        rpc_id = next(self._ids)
        if announce is not None:
            await announce(rpc_id)
        started = time.monotonic()
        deadline = started + timeout_ms / 1000
        slot = self._slots[rpc_id] = Slot(self._loop.create_future(), deadline)
        queue = self._deadlines.get(timeout_ms)
        if queue is None:
            queue = self._deadlines[timeout_ms] = {}
        queue[rpc_id] = slot
        if deadline < self._planned:
            self._wake.set()  # the earliest deadline: the timer re-plans (not once per sequential call)
        ctx.parked.add(slot)
        telemetry = ctx.telemetry
        if telemetry is not None:
            telemetry.event("tool_start", {"system_time": time.time()}, {"tool": tool, "rpc_id": rpc_id})
        try:
            # only the handler's arguments can hold a secret-named key: the frame's own keys name none
            args, kwargs = arguments(args, kwargs)
            self._writer.send(protocol.rpc_request(rpc_id, ctx.id, tool, args, kwargs, timeout_ms), named=True)
            await slot.future
        finally:
            ctx.parked.discard(slot)
            del self._slots[rpc_id]
            queue.pop(rpc_id, None)
            if not queue and self._deadlines.get(timeout_ms) is queue:
                del self._deadlines[timeout_ms]  # only queues with a parked call are kept
            if slot.response is None and not self._writer.dead:
                self._writer.send(protocol.rpc_cancel(rpc_id))
            elapsed = time.monotonic() - started
            ctx.tool_calls += 1  # for ``meta``
            ctx.tool_s += elapsed
            if telemetry is not None:
                ok = slot.response is not None and slot.response.ok
                telemetry.event("tool_end", {"duration_ms": elapsed * 1000},
                                {"tool": tool, "rpc_id": rpc_id, "ok": ok})
        response = slot.response
        if response is not None and response.ok:  # ``_outcome``'s common case, without the call
            return response.result
        return _outcome(slot, tool, timeout_ms, ctx)

    def on_response(self, response: protocol.RpcResponse) -> None:
        """Route an ``rpc_response`` to its parked call; unknown or late ids are ignored (and logged,
        throttled)."""
        slot = self._slots.get(response.rpc_id)  # an id checked by ``protocol.parse``: never a bool
        if slot is None or slot.future.done():
            self._ignored("ignoring rpc_response for unknown or finished rpc_id %r", response.rpc_id)
            return
        slot.response = response  # ``Slot.fill``, inlined: every answer passes here
        slot.future.set_result(None)

    def input_closed(self) -> None:
        """The host's input reached EOF: fail every parked call now, none can be answered."""
        self._input_closed = True
        for slot in self._slots.values():
            slot.finish(HOST_CLOSED)

    async def run_timer(self) -> None:
        """Expire overdue calls.  Sleeps until the earliest deadline, or until woken."""
        while True:
            earliest = min((next(iter(q.values())).deadline for q in self._deadlines.values() if q),
                           default=None)
            # a later call's deadline cannot come before this one: only an earlier one wakes the timer
            self._planned = math.inf if earliest is None else earliest
            with anyio.move_on_after(None if earliest is None else max(0.0, earliest - time.monotonic())):
                await self._wake.wait()
            self._wake = anyio.Event()
            self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        for timeout_ms, queue in list(self._deadlines.items()):
            while queue:
                rpc_id, slot = next(iter(queue.items()))
                if slot.deadline > now:
                    break
                del queue[rpc_id]
                slot.finish(_TIMEOUT)
            if not queue:
                del self._deadlines[timeout_ms]


_TIMEOUT = "timeout"
CLOSED = "closed"  # the request ended (used by ``Context.close``)


def _closed(ctx: "Caller", tool: str) -> Exception:
    return RequestClosed(f"request {ctx.id!r} ended while tool {tool!r} was parked")


def _outcome(slot: Slot, tool: str, timeout_ms: int, ctx: "Caller") -> Any:
    response = slot.response
    if response is not None:
        if response.ok:
            return response.result
        err = response.error
        raise ToolError(str(err.get("type", "tool_error")), str(err.get("message", "")))
    if slot.abort == _TIMEOUT:
        raise TimeoutError(f"tool {tool!r} did not answer within {timeout_ms} ms")
    if slot.abort == CLOSED:
        raise _closed(ctx, tool)
    raise ToolError("host_closed", str(slot.abort))

