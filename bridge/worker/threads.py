"""Worker threads with a true bound: a thread counts against ``--max-threads`` until its function returns.

anyio's ``to_thread.run_sync(..., abandon_on_cancel=True)`` hands its limiter's
token back as soon as the waiting task is cancelled, while the abandoned thread
runs on; a bound kept by that token lets timed-out work pile up threads without
limit.  Here the threads are a ``ThreadPoolExecutor`` of ``--max-threads``
workers: an abandoned call keeps its worker busy until it returns, so no more
than the bound ever run.  Calls over the bound wait in the executor's FIFO
queue (their ``queue_ms`` shows it), at most ``--max-thread-queue`` of them;
one more is ``overloaded``.  A call cancelled while it waits is taken out of
the queue (``Future.cancel`` is atomic against a worker starting it), so it
never runs.

The counts are kept on the loop: a finished call posts its own bookkeeping
there, so reading them (``stats``) is O(1).
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


from bridge.wire.errors import ErrorType, PeerError


class _Call:
    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False  # its caller stopped waiting while it ran


class Threads:
    """``await threads.run_sync(fn, *args)``: ``fn(*args)`` in a worker thread, context variables
    (``dspy.context``, the current request) carried in.  A cancel abandons a running call."""

    def __init__(self, limit: int, max_queue: int) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.abandoned = 0  # calls running on although their caller has gone
        self._pending = 0  # submitted and not finished: running (at most ``limit``) plus queued
        self._executor = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="bridge-thread")

    @property
    def busy(self) -> int:
        return min(self._pending, self.limit)

    @property
    def queued(self) -> int:
        return self._pending - self.busy

    def stats(self) -> dict[str, int]:
        return {"busy": self.busy, "abandoned": self.abandoned, "queued": self.queued}

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a worker thread and return its result; ``overloaded`` when
        ``max_queue`` calls already wait for a thread."""
        if self._pending >= self.limit + self.max_queue:
            raise PeerError(ErrorType.OVERLOADED,
                            f"{self.limit} worker threads are busy and {self.queued} calls wait for one "
                            "(--max-threads, --max-thread-queue)",
                            {"max_threads": self.limit, "max_thread_queue": self.max_queue, **self.stats()})
        loop = asyncio.get_running_loop()
        call = _Call()
        context = contextvars.copy_context()
        future = self._executor.submit(context.run, fn, *args)
        self._pending += 1
        future.add_done_callback(lambda _: _post(loop, self._finished, call))
        try:
            return await asyncio.wrap_future(future)
        except BaseException:
            if not future.done():  # running: the thread goes on, and keeps its place
                call.abandoned = True
                self.abandoned += 1
            raise

    def _finished(self, call: _Call) -> None:
        self._pending -= 1
        if call.abandoned:
            self.abandoned -= 1

    def close(self) -> None:
        """Stop taking calls; queued ones are dropped (the worker is exiting)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[[_Call], None], call: _Call) -> None:
    """From the thread that finished (or the loop, for a call cancelled in the queue)."""
    try:
        loop.call_soon_threadsafe(fn, call)
    except RuntimeError:
        pass  # the loop is closed: the worker is exiting, nobody reads the counts
