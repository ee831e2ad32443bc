"""The worker's core in-process, with fake transports: driven by events and frames, never by sleeps.

Each test runs its own event loop (``anyio.run``); ``fail_after`` turns a lost
wake-up into a failure instead of a hang.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

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


# ---- worker threads ---------------------------------------------------------------------------

def test_threads_bound_holds_for_abandoned_calls_and_the_queue_is_bounded():
    import threading

    import pytest

    from bridge.wire.errors import PeerError
    from bridge.worker.threads import Threads

    async def main() -> None:
        threads = Threads(1, max_queue=1)
        started, release = threading.Event(), threading.Event()
        ran: list[str] = []

        def blocker() -> str:
            started.set()
            release.wait(10)
            ran.append("blocker")
            return "blocked"

        def quick(name: str) -> str:
            ran.append(name)
            return name

        async def abandon() -> None:
            with anyio.CancelScope() as scope:
                waiter.set()
                scope_holder.append(scope)
                await threads.run_sync(blocker)

        waiter, scope_holder = anyio.Event(), []
        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(abandon)
                    await anyio.to_thread.run_sync(started.wait)
                    scope_holder[0].cancel()  # the caller goes; its thread runs on
                assert threads.stats() == {"busy": 1, "abandoned": 1, "queued": 0}
                async with anyio.create_task_group() as tg:
                    results: list[str] = []

                    async def queued() -> None:
                        results.append(await threads.run_sync(quick, "queued"))

                    tg.start_soon(queued)
                    await anyio.lowlevel.checkpoint()
                    assert threads.stats() == {"busy": 1, "abandoned": 1, "queued": 1}
                    with pytest.raises(PeerError) as info:
                        await threads.run_sync(quick, "over")
                    assert info.value.type == "overloaded"
                    assert ran == []  # the bound held: nothing ran beside the abandoned call
                    release.set()
                assert results == ["queued"] and ran == ["blocker", "queued"]
                while threads.stats() != {"busy": 0, "abandoned": 0, "queued": 0}:
                    await anyio.lowlevel.checkpoint()  # the last call's bookkeeping is posted to the loop
        finally:
            release.set()
            threads.close()

    anyio.run(main)


def test_a_call_cancelled_while_queued_never_runs():
    import threading

    from bridge.worker.threads import Threads

    async def main() -> None:
        threads = Threads(1, max_queue=10)
        started, release = threading.Event(), threading.Event()
        ran: list[str] = []

        def blocker() -> None:
            started.set()
            release.wait(10)

        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(threads.run_sync, blocker)
                    await anyio.to_thread.run_sync(started.wait)
                    with anyio.CancelScope() as scope:
                        scope.cancel()
                        await threads.run_sync(ran.append, "queued")
                    release.set()
                assert ran == []
        finally:
            release.set()
            threads.close()

    anyio.run(main)


# ---- sessions -------------------------------------------------------------------------------------

def test_the_sweep_ends_exactly_the_sessions_past_their_deadline():
    store = SessionStore(max_sessions=100, default_ttl=10.0)
    sessions = [store.get_or_create(f"s{i}") for i in range(5)]
    t0 = max(s.last_used for s in sessions)
    sessions[1].last_used = t0 + 5  # used later: its first heap entry is early
    store.set_ttl(sessions[2], 2.0)  # shortened: expires first
    store.set_ttl(sessions[3], None)  # kept until closed
    assert store.sweep(t0 + 1) == []
    assert store.sweep(t0 + 3) == ["s2"]
    assert sorted(store.sweep(t0 + 11)) == ["s0", "s4"]  # s1 was queued again for t0 + 15
    assert store.sweep(t0 + 16) == ["s1"]
    assert len(store) == 1 and store._deadlines == []


def test_ended_sessions_are_reported_once_and_remembered_in_a_bounded_lru():
    import pytest

    from bridge.wire.errors import PeerError

    store = SessionStore(max_sessions=2, default_ttl=10.0)
    store.get_or_create("a")
    store.close("a")
    with pytest.raises(PeerError) as info:
        store.get_or_create("a")
    assert info.value.type == "unknown_session" and info.value.details == {"session_id": "a", "reason": "closed"}
    store.get_or_create("a")  # said once
    for sid in ("b", "c", "d"):  # more ended ids than the LRU holds: the oldest is forgotten
        store.get_or_create(sid)
        store.close(sid)
    assert list(store._ended) == ["c", "d"]
    assert store.get_or_create("b") is not None  # forgotten: simply a new session


def test_object_count_follows_store_release_close_and_expiry():
    store = SessionStore(max_objects=3, max_sessions=10, default_ttl=1.0)
    a, b = store.get_or_create("a"), store.get_or_create("b")
    refs = [store.store(a, i) for i in range(2)] + [store.store(b, "x")]
    assert store.object_count == 3
    store.release(a, refs[0])
    assert store.object_count == 2
    store.close("a")
    assert store.object_count == 1
    assert store.sweep(b.last_used + 2) == ["b"] and store.object_count == 0


def test_ttl_churn_keeps_the_deadline_heap_bounded():
    store = SessionStore(max_sessions=10, default_ttl=3600.0)
    session = store.get_or_create("s")
    for i in range(10_000):
        store.set_ttl(session, 3600.0 - i * 0.001)  # each an earlier deadline: a new entry
    assert len(store._deadlines) <= 2 * len(store) + 64


# ---- throttled logs -------------------------------------------------------------------------------

def test_a_repeated_warning_is_logged_once_a_second_with_a_count(caplog):
    import logging

    from bridge.observe.logs import Throttled

    now = [100.0]
    warn = Throttled(logging.getLogger("test.throttle"), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for i in range(500):
            warn("stray %d", i)
        now[0] += 0.5
        warn("stray %d", 500)
        now[0] += 0.6
        warn("stray %d", 501)
    assert [r.getMessage() for r in caplog.records] == [
        "stray 0", "stray 501 (and 500 more like it since the last one logged)"]
