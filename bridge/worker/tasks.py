"""Concurrent jobs whose first failure is raised as itself, and bounded lanes over indices.

An anyio task group raises an ``ExceptionGroup``, which would reach the host as
a ``handler_error``; a failing pipeline lane or evaluation must instead end the
request with its own error (``lm_error``, ``tool_error``, …).
"""

from __future__ import annotations

from typing import Awaitable, Callable, Sequence

import anyio


async def together(jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs`` at once; the first to fail cancels the others, and its exception is raised."""
    failures: list[Exception] = []

    async def guarded(job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        except Exception as exc:
            failures.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(guarded, job)
    if failures:
        raise failures[0]


async def each(count: int, lanes: int, work: Callable[[int], Awaitable[None]]) -> None:
    """``work(i)`` for every index below ``count``, at most ``lanes`` at a time; the first failure ends all."""
    pending = iter(range(count))

    async def lane() -> None:
        for index in pending:
            await work(index)

    await together([lane] * min(lanes, count))
