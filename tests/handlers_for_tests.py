"""Handlers that misbehave on purpose, loaded into the worker with ``--handlers tests.handlers_for_tests``."""

from __future__ import annotations

import os
import sys
import time

import anyio

from bridge import PeerError, handler


@handler("test.print")
def prints(args: dict, ctx) -> dict:
    """Writes to stdout three ways: none of it may reach the frame stream."""
    print("hello from a handler")
    sys.stdout.write("hell" * 10 + "\n")
    os.write(1, b"raw write to fd 1\n")
    return {"printed": True}


@handler("test.tqdm")
def progress(args: dict, ctx) -> dict:
    from tqdm import tqdm

    total = 0
    for i in tqdm(range(args.get("n", 50)), file=sys.__stdout__ if args.get("dunder") else None):
        total += i
    return {"total": total}


@handler("test.raise")
def raises(args: dict, ctx) -> None:
    raise ValueError(args.get("message", "boom"))


@handler("test.peer_error")
def peer_error(args: dict, ctx) -> None:
    raise PeerError("bad_request", "you asked for it", {"field": "x"})


@handler("test.crash")
def crash(args: dict, ctx) -> None:
    os._exit(args.get("code", 3))


@handler("test.segfault")
def segfault(args: dict, ctx) -> None:
    """A native library's crash: a read from address 0."""
    import ctypes

    ctypes.string_at(0)


@handler("test.unserializable")
async def unserializable(args: dict, ctx) -> object:
    return object()


@handler("test.async_gen")
async def async_gen(args: dict, ctx):
    """Yields ``n`` chunks ``delay`` apart; writes ``marker`` in its finally block."""
    try:
        for i in range(args.get("n", 3)):
            yield {"i": i}
            await anyio.sleep(args.get("delay", 0))
    finally:
        if "marker" in args:
            with open(args["marker"], "w") as f:
                f.write("closed")


@handler("test.sync_gen")
def sync_gen(args: dict, ctx):
    """A sync generator in a thread: chunks, then a return value as the result."""
    try:
        for i in range(args.get("n", 3)):
            yield i
            time.sleep(args.get("delay", 0))
        return {"done": args.get("n", 3)}
    finally:
        if "marker" in args:
            with open(args["marker"], "w") as f:
                f.write("closed")


@handler("test.emit")
async def emit(args: dict, ctx) -> dict:
    """An async function that streams through ``ctx.emit`` and returns a result."""
    for i in range(args.get("n", 3)):
        await ctx.emit(i)
    return {"emitted": args.get("n", 3)}


@handler("test.cooperative")
def cooperative(args: dict, ctx) -> dict:
    """Says it started, then polls ``ctx.cancelled``; records in ``marker`` that it noticed."""
    ctx.emit_blocking("started")
    deadline = time.monotonic() + args.get("seconds", 5)
    while time.monotonic() < deadline:
        if ctx.cancelled:
            with open(args["marker"], "w") as f:
                f.write("noticed")
            return {"stopped": True}
        time.sleep(0.005)
    return {"stopped": False}


@handler("test.cooperative_async")
async def cooperative_async(args: dict, ctx) -> dict:
    """Runs on the loop until ``ctx.cancelled`` turns true, then returns at once (it does not wait
    for the request's cancel scope to fire)."""
    while not ctx.cancelled:
        await anyio.sleep(0)
    return {"stopped": True}


@handler("test.spawn_child")
def spawn_child(args: dict, ctx) -> dict:
    """Starts a long-lived child process; the worker must not leave it behind."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return {"child_pid": proc.pid}


@handler("test.tool")
async def tool(args: dict, ctx) -> object:
    """Calls one host tool and returns its answer (errors surface as handler errors)."""
    return await ctx.call_tool(args["tool"], *args.get("args", []), timeout_ms=args.get("timeout_ms"),
                               **args.get("kwargs", {}))


@handler("test.tool_blocking")
def tool_blocking(args: dict, ctx) -> object:
    """The same from a worker thread."""
    return ctx.call_tool_blocking(args["tool"], *args.get("args", []), timeout_ms=args.get("timeout_ms"),
                                  **args.get("kwargs", {}))


@handler("test.inline_unserializable", inline=True)
def inline_unserializable(args: dict, ctx) -> object:
    return object()


@handler("test.inline_raise", inline=True)
def inline_raise(args: dict, ctx) -> None:
    raise ValueError("inline boom")


@handler("test.declared", inline=True, args=("alpha", "beta"))
def declared(args: dict, ctx) -> dict:
    """A user handler that declares its arguments: others are refused before it runs."""
    return args


@handler("test.double_fork")
def double_fork(args: dict, ctx) -> dict:
    """Starts a grandchild through a child that exits at once (a daemon's double fork); its pid.
    The grandchild sleeps ``seconds`` (default 60), then exits."""
    import subprocess

    code = ("import subprocess, sys; "
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep({args.get('seconds', 60)})'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(p.pid)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"grandchild_pid": int(out.stdout)}


@handler("test.child_status")
def child_status(args: dict, ctx) -> dict:
    """Starts ``sh -c 'exit 7'``, lets it sit as a zombie through two of the worker's reap passes,
    then waits for it: the exit status must still be there."""
    import subprocess

    from bridge.worker import children

    proc = subprocess.Popen(["sh", "-c", "exit 7"])
    while children._state(proc.pid) != "Z":
        time.sleep(0.005)
    passes = children.passes
    while children.passes < passes + 2:
        time.sleep(0.01)
    return {"returncode": proc.wait()}


@handler("test.spawn_from_threads")
def spawn_from_threads(args: dict, ctx) -> dict:
    """Starts one long-lived child from each of ``n`` short-lived threads (their children move to
    other threads of the worker when they end); the child pids."""
    import subprocess
    import threading

    pids: list[int] = []

    def spawn() -> None:
        pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid)

    threads = [threading.Thread(target=spawn) for _ in range(args.get("n", 3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"pids": pids}


@handler("test.loaded", inline=True)
def loaded(args: dict, ctx) -> dict:
    """Which of ``modules`` the worker has imported (what a warm-up loaded off the loop)."""
    return {name: name in sys.modules for name in args["modules"]}
