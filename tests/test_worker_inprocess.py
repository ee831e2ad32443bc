"""The worker's core in-process, with fake transports: driven by events and frames, never by sleeps.

Each test runs its own event loop (``anyio.run``); ``fail_after`` turns a lost
wake-up into a failure instead of a hang.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel

from bridge.wire import protocol
from bridge.worker.context import Context, Shared
from bridge.worker.options import Config
from bridge.worker.sessions import SessionStore


class FakeWriter:
    """A ``FrameWriter`` stand-in: keeps every frame, never congested; ``sent`` fires per frame."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.dead = False
        self.congested = False
        self.sent = anyio.Event()

    def send(self, frame: dict, extra: bytes = b"") -> int:
        self.frames.append(frame)
        self.sent.set()
        self.sent = anyio.Event()
        return 1

    async def next_frame(self, count: int) -> dict:
        """The ``count``-th frame (1-based), waiting until it is sent."""
        while len(self.frames) < count:
            await self.sent.wait()
        return self.frames[count - 1]


def shared(writer: Any, tools: Any = None, threads: Any = None) -> Shared:
    return Shared(writer, tools, SessionStore(), threads, anyio.lowlevel.current_token(),
                  lambda fn, arg: fn(arg), Config(), dict)


def context(writer: Any, rid: Any = 1, window: int | None = None, **kwargs: Any) -> Context:
    return Context(protocol.Request(rid, "test", {}, window=window), shared(writer, **kwargs), 0.0)


# ---- credit ---------------------------------------------------------------------------

def test_every_emitter_waiting_for_credit_is_woken():
    """Four emitters share one request with window 1; the host grants one chunk per chunk seen."""

    async def main() -> None:
        writer = FakeWriter()
        ctx = context(writer, window=1)
        emitters, per_emitter = 4, 5

        async def emitter(lane: int) -> None:
            for i in range(per_emitter):
                await ctx.emit((lane, i))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for lane in range(emitters):
                    tg.start_soon(emitter, lane)
                for seen in range(1, emitters * per_emitter + 1):
                    await writer.next_frame(seen)
                    ctx.add_credit(1)
        assert sorted(f["data"] for f in writer.frames) == [(lane, i) for lane in range(emitters)
                                                            for i in range(per_emitter)]
        assert [f["seq"] for f in writer.frames] == list(range(emitters * per_emitter))

    anyio.run(main)


def test_closing_the_request_wakes_every_emitter_with_request_closed():
    async def main() -> None:
        writer = FakeWriter()
        ctx = context(writer, window=1)
        outcomes: list[str] = []

        async def emitter() -> None:
            try:
                await ctx.emit("x")
            except Exception as exc:
                outcomes.append(type(exc).__name__)
            else:
                outcomes.append("sent")

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(emitter)
                await writer.next_frame(1)  # one took the only credit; two wait
                while len(ctx._waiters or ()) < 2:
                    await anyio.lowlevel.checkpoint()
                ctx.close()
        assert sorted(outcomes) == ["RequestClosed", "RequestClosed", "sent"]
        assert ctx._waiters == []  # each waiter removed its own event

    anyio.run(main)


# ---- error classification ----------------------------------------------------------------

def test_groups_are_classified_by_the_error_they_stand_for():
    from bridge.wire.errors import PeerError, ToolError
    from bridge.worker.respond import failure

    def error_of(exc: Exception) -> dict:
        return failure(1, exc)["error"]

    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [PeerError("bad_request", "no")])])
    assert error_of(nested)["type"] == "bad_request"
    same = ExceptionGroup("eof", [ToolError("host_closed", "gone"), ToolError("host_closed", "gone")])
    assert error_of(same) == {"type": "tool_error", "message": "gone", "details": {"tool_error": "host_closed"}}
    mixed = ExceptionGroup("mixed", [ToolError("host_closed", "gone"), ToolError("not_found", "row")])
    assert error_of(mixed)["type"] == "handler_error"
    assert error_of(mixed)["details"] == {"exception": "ExceptionGroup"}
