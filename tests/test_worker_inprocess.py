"""The worker's core in-process, with fake transports: driven by events and frames, never by sleeps.

Each test runs its own event loop (``anyio.run``); ``fail_after`` turns a lost
wake-up into a failure instead of a hang.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

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

    def send(self, frame: dict, extra: bytes = b"", named: bool = False) -> int:
        self.frames.append(frame)
        self.sent.set()
        self.sent = anyio.Event()
        return 1

    def send_chunk(self, prefix: bytes, rid: Any, seq: int, data: Any) -> int:
        return self.send(protocol.chunk(rid, seq, data))

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


def test_emitters_sharing_a_request_send_in_the_order_they_emit():
    """Batch lanes share one request: whatever an emit waits for (a yield to the loop included),
    a chunk that has taken its number goes out before any later one."""
    import itertools

    async def main() -> None:
        writer = FakeWriter()
        ctx = context(writer)
        numbers = itertools.count()

        async def emitter() -> None:
            for _ in range(100):
                await ctx.emit(next(numbers))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(emitter)
        assert [f["data"] for f in writer.frames] == list(range(400))

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


# ---- ToolBridge, with a fake writer ------------------------------------------------------------------

class Caller:
    """The request a host call is made for: what ``ToolBridge`` reads and counts."""

    def __init__(self, rid: Any = 1) -> None:
        self.id, self.closed, self.parked = rid, False, set()
        self.telemetry, self.tool_calls, self.tool_s = None, 0, 0.0


def test_tool_calls_park_until_answered_in_any_order():
    from bridge.worker.tools import ToolBridge

    async def main() -> None:
        writer = FakeWriter()
        tools, caller = ToolBridge(writer, 5000), Caller()
        answers: dict[int, Any] = {}

        async def call(i: int) -> None:
            answers[i] = await tools.call(caller, "lookup", [i], {"k": "v"})

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(call, i)
                requests = [await writer.next_frame(n) for n in (1, 2, 3)]
                assert tools.parked == 3 and len(caller.parked) == 3
                for request in reversed(requests):
                    tools.on_response(protocol.RpcResponse(request["rpc_id"], True, request["args"][0] * 10))
        assert answers == {0: 0, 1: 10, 2: 20}
        assert requests[0] == {"type": "rpc_request", "rpc_id": requests[0]["rpc_id"], "id": 1, "tool": "lookup",
                               "args": [0], "kwargs": {"k": "v"}, "timeout_ms": 5000}
        assert tools.parked == 0 and caller.parked == set() and caller.tool_calls == 3
        assert len(writer.frames) == 3  # answered calls send no rpc_cancel

    anyio.run(main)


def test_a_shorter_timeout_after_a_longer_one_still_expires_and_answered_calls_leave_no_queue():
    """The timer sleeps until the earliest deadline and is woken only by an earlier one: a 20 ms
    call made after a 5 s one still times out; calls answered one after another, each with its own
    timeout, leave no deadline queue behind (the map holds only queues with a parked call)."""
    from bridge.wire.protocol import RpcResponse
    from bridge.worker.tools import ToolBridge

    async def main() -> None:
        writer = FakeWriter()
        tools = ToolBridge(writer, 5000)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(tools.run_timer)
                for i in range(20):  # sequential, answered, every one with a timeout of its own
                    async def answered(i: int = i) -> None:
                        assert await tools.call(Caller(i), "t", [i], {}, 60_000 + i) == i

                    tg.start_soon(answered)
                    request = await writer.next_frame(i + 1)
                    tools.on_response(RpcResponse(request["rpc_id"], True, i))
                    while tools.parked:
                        await anyio.lowlevel.checkpoint()
                assert tools._deadlines == {}
                tg.start_soon(tools.call, Caller("long"), "t", [], {}, 5_000)
                await writer.next_frame(21)
                with pytest.raises(TimeoutError):
                    await tools.call(Caller("short"), "t", [], {}, 20)
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_tool_call_times_out_fails_at_eof_and_ends_with_its_request():
    import pytest

    from bridge.wire.errors import RequestClosed, ToolError
    from bridge.worker.tools import CLOSED, ToolBridge

    async def main() -> None:
        writer = FakeWriter()
        tools = ToolBridge(writer, 5000)
        outcomes: dict[str, str] = {}

        async def call(name: str, caller: Caller, timeout_ms: int | None = None) -> None:
            try:
                await tools.call(caller, name, [], {}, timeout_ms)
            except (TimeoutError, ToolError, RequestClosed) as exc:
                outcomes[name] = f"{type(exc).__name__}: {exc}"

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(tools.run_timer)
                tg.start_soon(call, "slow", Caller(1), 20)
                ended = Caller(2)
                tg.start_soon(call, "ended", ended)
                await writer.next_frame(2)
                for slot in tuple(ended.parked):
                    slot.finish(CLOSED)  # what Context.close does
                while "slow" not in outcomes:
                    await writer.next_frame(len(writer.frames) + 1)  # the rpc_cancels
                tg.start_soon(call, "at_eof", Caller(3))
                await writer.next_frame(len(writer.frames) + 1)
                tools.input_closed()
                while len(outcomes) < 3:
                    await writer.next_frame(len(writer.frames) + 1)
                tg.cancel_scope.cancel()
        assert outcomes["slow"] == "TimeoutError: tool 'slow' did not answer within 20 ms"
        assert outcomes["ended"].startswith("RequestClosed")
        assert outcomes["at_eof"].startswith("ToolError: host_closed")
        cancels = [f["rpc_id"] for f in writer.frames if f["type"] == "rpc_cancel"]
        assert sorted(cancels) == sorted(f["rpc_id"] for f in writer.frames if f["type"] == "rpc_request")
        with pytest.raises(ToolError):  # after EOF no call can be answered
            await tools.call(Caller(4), "late", [], {})

    anyio.run(main)


# ---- FrameWriter and Server, over in-process pipes ------------------------------------------------------

class Pipes:
    """The worker's two pipes, held by the test as its host: ``send`` frames in, ``frame`` reads one out."""

    def __init__(self) -> None:
        import collections

        from bridge.wire import framing

        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.decoder = framing.Decoder()
        self.pending: collections.deque[dict] = collections.deque()

    def send(self, frame: dict) -> None:
        from bridge.wire import framing

        os.write(self.in_w, framing.encode(frame))

    async def frame(self) -> dict:
        while not self.pending:
            await anyio.wait_readable(self.out_r)
            self.pending.extend(event.body for event in self.decoder.feed(os.read(self.out_r, 1 << 20)))
        return self.pending.popleft()

    def close_input(self) -> None:
        if self.in_w >= 0:
            os.close(self.in_w)
            self.in_w = -1

    def close(self) -> None:
        self.close_input()
        for fd in (self.in_r, self.out_r, self.out_w):
            try:
                os.close(fd)
            except OSError:
                pass


def test_the_writer_coalesces_and_a_full_pipe_pushes_back_on_producers():
    from bridge.worker.transport import FrameWriter

    async def main() -> None:
        pipes = Pipes()
        os.set_blocking(pipes.out_w, False)
        writer = FrameWriter(pipes.out_w, high_water=64 * 1024)
        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(writer.run)
                    for i in range(3):
                        writer.send({"type": "chunk", "id": 1, "seq": i, "data": i})
                    assert [(await pipes.frame())["seq"] for _ in range(3)] == [0, 1, 2]
                    big = bytes(32 * 1024)
                    while not writer.congested:  # the pipe (64 KiB) fills, then the buffer past high water
                        writer.send({"type": "chunk", "id": 1, "seq": 0, "data": big})
                    drained = anyio.Event()

                    async def producer() -> None:
                        await writer.wait_drained()
                        drained.set()

                    tg.start_soon(producer)
                    await anyio.lowlevel.checkpoint()
                    assert not drained.is_set()  # the host is not reading: the producer waits
                    while not drained.is_set():  # the host reads: the producer goes on
                        await pipes.frame()
                    tg.cancel_scope.cancel()
        finally:
            pipes.close()

    anyio.run(main)


def test_a_closed_pipe_breaks_the_writer_and_later_frames_are_dropped():
    from bridge.worker.transport import FrameWriter

    async def main() -> None:
        pipes = Pipes()
        os.set_blocking(pipes.out_w, False)
        writer = FrameWriter(pipes.out_w)
        os.close(pipes.out_r)
        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(writer.run)
                    writer.send({"type": "chunk", "id": 1, "seq": 0, "data": bytes(1024)})
                    await writer.broken.wait()
                    assert writer.dead
                    before = writer.frames_out
                    writer.send({"type": "chunk", "id": 1, "seq": 1, "data": 1})
                    assert writer.frames_out == before
        finally:
            pipes.close()

    anyio.run(main)


LOOPS = pytest.mark.parametrize("loop", [{"use_uvloop": False}, {"use_uvloop": True}], ids=["asyncio", "uvloop"])


@LOOPS
def test_the_reader_hands_over_each_read_pauses_on_request_and_ends_at_eof(loop):
    """``Reader.run``: every byte reaches ``on_data`` in order; ``False`` stops reading until
    ``drained`` returns (bytes sent meanwhile wait in the pipe); EOF is one empty read, then ``run`` ends."""
    from bridge.worker.transport import Reader

    async def main() -> None:
        pipes = Pipes()
        os.set_blocking(pipes.in_r, False)
        reads: list[bytes] = []
        pause_next = [True]
        paused, resume = anyio.Event(), anyio.Event()

        def on_data(data: memoryview) -> bool:
            reads.append(bytes(data))
            if pause_next[0]:
                pause_next[0] = False
                return False
            return True

        async def drained() -> None:
            paused.set()
            await resume.wait()

        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(Reader(pipes.in_r, on_data, size=8).run, drained)
                    os.write(pipes.in_w, b"first")
                    await paused.wait()
                    os.write(pipes.in_w, b"0123456789")  # more than one read's worth, while paused
                    await anyio.wait_all_tasks_blocked()
                    assert reads == [b"first"]
                    resume.set()
                    while b"".join(reads) != b"first0123456789":
                        await anyio.lowlevel.checkpoint()
                    pipes.close_input()
            assert reads[-1] == b"" and b"".join(reads) == b"first0123456789"
            assert all(len(r) <= 8 for r in reads)
        finally:
            pipes.close()

    anyio.run(main, backend_options=loop)


@LOOPS
def test_the_reader_reads_a_regular_file_which_cannot_be_polled(tmp_path, loop):
    from bridge.worker.transport import Reader

    path = tmp_path / "input"
    path.write_bytes(bytes(range(256)) * 10)
    reads: list[bytes] = []

    async def main() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            with anyio.fail_after(5):
                await Reader(fd, lambda data: reads.append(bytes(data)) or True, size=1000).run(
                    anyio.lowlevel.checkpoint)
        finally:
            os.close(fd)

    anyio.run(main, backend_options=loop)
    assert b"".join(reads) == path.read_bytes() and reads[-1] == b""


@pytest.mark.parametrize("run", ["asyncio", "uvloop"])
def test_a_reader_cancelled_in_the_pass_its_input_arrives_reads_no_more(run):
    """A cancel queued in the same pass of the loop as ready input and EOF (a signal, a timer): once
    the reading task is cancelled, a readiness callback reads nothing more and leaves the finished
    reader alone.  (uvloop may run the callback once before the cancel: that read is legitimate.)"""
    import asyncio

    import uvloop

    from bridge.worker.transport import Reader

    seen: list[bytes] = []
    errors: list[object] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        r, w = os.pipe()
        os.set_blocking(r, False)
        reader = Reader(r, lambda data: seen.append(bytes(data)) or True)
        task = asyncio.ensure_future(reader.run(anyio.lowlevel.checkpoint))
        await asyncio.sleep(0)  # the reader now waits on its future, registered with the loop
        os.write(w, b"x")
        os.close(w)
        asyncio.get_running_loop().call_soon(task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):
            await asyncio.sleep(0)
        os.close(r)

    (asyncio.run if run == "asyncio" else uvloop.run)(main())
    assert errors == [] and seen in ([], [b"x"])  # never the EOF read, after the cancel


@LOOPS
def test_a_failure_in_the_readers_callback_is_raised_by_its_task(loop):
    from bridge.worker.transport import Reader

    def on_data(data: memoryview) -> bool:
        raise RuntimeError("a bug in dispatch")

    async def main() -> None:
        pipes = Pipes()
        os.set_blocking(pipes.in_r, False)
        try:
            with anyio.fail_after(5):
                os.write(pipes.in_w, b"x")
                await Reader(pipes.in_r, on_data).run(anyio.lowlevel.checkpoint)
        finally:
            pipes.close()

    with pytest.raises(RuntimeError, match="a bug in dispatch"):
        anyio.run(main, backend_options=loop)


def serving(registry_setup, scenario) -> int:
    """Run a ``Server`` over in-process pipes with the handlers ``registry_setup(registry)`` adds;
    ``scenario(pipes, server)`` plays the host; returns what ``serve`` returned."""
    from bridge.worker.registry import Registry
    from bridge.worker.server import Server

    async def main() -> int:
        pipes, registry = Pipes(), Registry()
        registry_setup(registry)
        server = Server(Config(in_fd=pipes.in_r, out_fd=pipes.out_w), registry)
        code: list[int] = []

        async def serve() -> None:
            code.append(await server.serve())

        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(serve)
                    ready = await pipes.frame()
                    assert ready["type"] == "ready" and ready["commands"] == registry.names()
                    await scenario(pipes, server)
                    pipes.close_input()  # EOF with the output open: drain, then serve returns
        finally:
            server.threads.close()
            pipes.close()
        return code[0]

    return anyio.run(main)


def _handlers(registry) -> None:
    def ping(args: dict, ctx: Context) -> dict:
        return {"pong": True}

    async def emit(args: dict, ctx: Context) -> dict:
        for i in range(args["n"]):
            await ctx.emit(i)
        return {"emitted": args["n"]}

    async def ask(args: dict, ctx: Context) -> Any:
        return await ctx.call_tool("t", args.get("q"))

    registry.add("ping", ping, inline=True, args=())
    registry.add("emit", emit, args=("n",))
    registry.add("ask", ask, args=("q",))


def test_the_server_dispatches_refuses_and_answers_in_order():
    async def scenario(pipes: Pipes, server: Any) -> None:
        pipes.send({"type": "request", "id": 1, "command": "ping"})
        assert (await pipes.frame())["data"] == {"pong": True}
        pipes.send({"type": "request", "id": 2, "command": "ping", "args": {"pnig": 1}})
        error = (await pipes.frame())["error"]
        assert error["type"] == "bad_request" and error["details"] == {"argument": "pnig", "known": []}
        pipes.send({"type": "request", "id": 3, "command": "nope"})
        assert (await pipes.frame())["error"]["type"] == "unknown_command"
        pipes.send({"type": "cancel", "id": True})
        frame = await pipes.frame()
        assert frame["id"] is None and frame["error"]["type"] == "bad_frame"

    assert serving(_handlers, scenario) == 0


def test_an_inline_handler_sees_its_deadline_with_or_without_telemetry():
    """An inline handler's ``RequestView`` answers ``deadline``, ``cancelled`` and ``closed`` as the
    full ``Context`` it gets when telemetry is on."""
    def setup(registry) -> None:
        def view(args: dict, ctx: Any) -> dict:
            return {"deadline": ctx.deadline is not None, "cancelled": ctx.cancelled, "closed": ctx.closed}

        registry.add("view", view, inline=True, args=())

    async def scenario(pipes: Pipes, server: Any) -> None:
        expected = {"deadline": True, "cancelled": False, "closed": False}
        pipes.send({"type": "request", "id": 1, "command": "view", "timeout_ms": 60_000})
        assert (await pipes.frame())["data"] == expected
        pipes.send({"type": "request", "id": 2, "command": "view", "timeout_ms": 60_000, "telemetry": True})
        frames = [await pipes.frame() for _ in range(3)]  # start, stop, result
        assert [f for f in frames if f["type"] == "result"][0]["data"] == expected
        pipes.send({"type": "request", "id": 3, "command": "view", "timeout_ms": 0})
        assert (await pipes.frame())["data"]["cancelled"] is True

    assert serving(setup, scenario) == 0


def test_the_server_holds_chunks_to_the_window_until_credit_comes():
    async def scenario(pipes: Pipes, server: Any) -> None:
        pipes.send({"type": "request", "id": "s", "command": "emit", "args": {"n": 3}, "window": 1})
        assert (await pipes.frame())["seq"] == 0
        pipes.send({"type": "request", "id": "p", "command": "ping"})
        assert (await pipes.frame())["id"] == "p"  # and nothing of "s" before it: no credit yet
        pipes.send({"type": "credit", "id": "s", "n": 2})
        assert [(await pipes.frame()).get("seq") for _ in range(3)] == [1, 2, None]
        assert not pipes.pending

    assert serving(_handlers, scenario) == 0


def test_the_server_routes_tool_answers_and_a_cancel_ends_a_parked_call():
    async def scenario(pipes: Pipes, server: Any) -> None:
        pipes.send({"type": "request", "id": 1, "command": "ask", "args": {"q": "a"}})
        request = await pipes.frame()
        assert request["type"] == "rpc_request" and request["id"] == 1 and request["args"] == ["a"]
        pipes.send({"type": "rpc_response", "rpc_id": request["rpc_id"], "ok": True, "result": "A"})
        result = await pipes.frame()
        assert (result["type"], result["id"], result["data"]) == ("result", 1, "A")
        pipes.send({"type": "request", "id": 2, "command": "ask", "args": {"q": "b"}})
        parked = await pipes.frame()
        pipes.send({"type": "cancel", "id": 2})
        assert await pipes.frame() == {"type": "rpc_cancel", "rpc_id": parked["rpc_id"]}
        error = await pipes.frame()
        assert error["id"] == 2 and error["error"]["type"] == "cancelled"
        assert server.inflight == {} and server.tools.parked == 0

    assert serving(_handlers, scenario) == 0


def test_eof_lets_the_request_in_flight_finish_before_serve_returns():
    import threading

    release = threading.Event()

    def setup(registry) -> None:
        def blocking(args: dict, ctx: Context) -> str:
            release.wait(5)
            return "done"

        registry.add("blocking", blocking, args=())

    async def scenario(pipes: Pipes, server: Any) -> None:
        pipes.send({"type": "request", "id": 1, "command": "blocking"})
        while 1 not in server.inflight:
            await anyio.lowlevel.checkpoint()
        pipes.close_input()
        while not server.shutting_down:
            await anyio.lowlevel.checkpoint()
        release.set()
        frame = await pipes.frame()
        assert frame["id"] == 1 and frame["data"] == "done"

    assert serving(setup, scenario) == 0
