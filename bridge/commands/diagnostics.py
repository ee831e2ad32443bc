"""Commands for benchmarks and host-side health checks, loaded only with ``--diagnostics``."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

import anyio

from bridge.wire.errors import ErrorType, PeerError
from bridge.wire.protocol import int_arg
from bridge.worker.context import Context
from bridge.worker.registry import handler


@handler("stream_count", args=("n", "size"))
async def stream_count(args: dict, ctx: Context) -> AsyncIterator[Any]:
    """Stream ``n`` chunks: the seq int, or ``size`` bytes when given."""
    n = int_arg(args, "n")
    if "size" in args:
        payload = bytes(int_arg(args, "size"))
        for _ in range(n):
            yield payload
    else:
        for i in range(n):
            yield i


@handler("sleep", args=("seconds",))
def sleep(args: dict, ctx: Context) -> dict:
    """Block a worker thread for ``seconds`` (uncooperatively, like a long DSPy call)."""
    seconds = args.get("seconds", 0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
        raise PeerError(ErrorType.BAD_REQUEST, "'seconds' must be a number >= 0")
    time.sleep(seconds)
    return {"slept": seconds}


@handler("rpc_loop", args=("n", "concurrency", "tool"))
async def rpc_loop(args: dict, ctx: Context) -> dict:
    """Make ``n`` host calls of ``tool`` with ``args: [i]``, at most ``concurrency`` parked at once."""
    n = int_arg(args, "n")
    concurrency = int_arg(args, "concurrency", 1, minimum=1)
    tool = args.get("tool", "echo")
    if type(tool) is not str:
        raise PeerError(ErrorType.BAD_REQUEST, "'tool' must be a str")
    counter = iter(range(n))
    started = time.perf_counter()

    async def lane() -> None:
        for i in counter:
            answer = await ctx.call_tool(tool, i)
            if answer != i:
                raise ValueError(f"tool {tool!r} answered {answer!r} to {i}")

    async with anyio.create_task_group() as tg:
        for _ in range(min(concurrency, max(n, 1))):
            tg.start_soon(lane)
    return {"n": n, "elapsed_ms": (time.perf_counter() - started) * 1000}
