"""The tool bridge: host calls parked as ``rpc_request`` frames until their ``rpc_response``.

Modelled on the MCP SDK's session layer: each call owns one slot keyed by
``rpc_id``; responses fill slots in any order; the slot is removed in
``finally`` whatever happens, so nothing keyed by ``rpc_id`` outlives its call.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

import anyio

from . import protocol

if TYPE_CHECKING:
    from .context import Context
    from .transport import FrameWriter

log = logging.getLogger("bridge.tools")


class ToolError(Exception):
    """The host answered a tool call with ``ok: false``."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class _Slot:
    __slots__ = ("event", "response", "abort")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.response: protocol.RpcResponse | None = None
        self.abort: str | None = None


class ToolBridge:
    """Owns every parked host call of the worker."""

    def __init__(self, writer: "FrameWriter", default_timeout_ms: int) -> None:
        self.default_timeout_ms = default_timeout_ms
        self.calls = 0
        self._writer = writer
        self._ids = itertools.count(1)
        self._slots: dict[int, _Slot] = {}
        self._input_closed = False

    @property
    def parked(self) -> int:
        return len(self._slots)

    async def call(self, ctx: "Context", tool: str, args: list, kwargs: dict,
                   timeout_ms: int | None = None) -> Any:
        """Send one ``rpc_request`` for ``ctx``'s request and wait for the answer."""
        if self._input_closed:
            raise ToolError("host_closed", "the host closed its input; no tool answer can arrive")
        timeout_ms = self.default_timeout_ms if timeout_ms is None else timeout_ms
        rpc_id = next(self._ids)
        slot = self._slots[rpc_id] = _Slot()
        self.calls += 1
        answered = False
        scope = anyio.CancelScope()
        ctx._scopes.add(scope)
        try:
            self._writer.send(protocol.rpc_request(rpc_id, ctx.id, tool, args, kwargs, timeout_ms))
            with scope, anyio.move_on_after(timeout_ms / 1000) as timer:
                await slot.event.wait()
                answered = slot.response is not None
        finally:
            ctx._scopes.discard(scope)
            del self._slots[rpc_id]
            if not answered and not self._writer.broken.is_set():
                self._writer.send(protocol.rpc_cancel(rpc_id))
        return self._outcome(tool, slot, timer.cancelled_caught, timeout_ms, ctx)

    @staticmethod
    def _outcome(tool: str, slot: _Slot, timed_out: bool, timeout_ms: int, ctx: "Context") -> Any:
        response = slot.response
        if response is not None:
            if response.ok:
                return response.result
            err = response.error
            raise ToolError(str(err.get("type", "tool_error")), str(err.get("message", "")))
        if slot.abort is not None:
            raise ToolError("host_closed", slot.abort)
        if timed_out:
            raise TimeoutError(f"tool {tool!r} did not answer within {timeout_ms} ms")
        from .context import RequestClosed
        raise RequestClosed(f"request {ctx.id!r} ended while tool {tool!r} was parked")

    def on_response(self, response: protocol.RpcResponse) -> None:
        """Route an ``rpc_response`` to its parked call; unknown or late ids are ignored."""
        slot = self._slots.get(response.rpc_id)
        if slot is None or slot.event.is_set():
            log.warning("ignoring rpc_response for unknown or finished rpc_id %r", response.rpc_id)
            return
        slot.response = response
        slot.event.set()

    def input_closed(self) -> None:
        """The host's input reached EOF: fail every parked call now, none can be answered."""
        self._input_closed = True
        for slot in self._slots.values():
            if not slot.event.is_set():
                slot.abort = "the host closed its input while the call was parked"
                slot.event.set()
