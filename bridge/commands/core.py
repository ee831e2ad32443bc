"""Commands every worker answers: ``ping``, ``echo``, ``stats``.  All inline: no task, no thread."""

from __future__ import annotations

import time
from typing import Any

from bridge.programs import allowlist
from bridge.worker.context import Context
from bridge.worker.registry import handler


@handler("ping", inline=True, args=())
def ping(args: dict, ctx: Context) -> dict:
    return {"pong": True, "time": time.time()}


@handler("echo", inline=True)
def echo(args: dict, ctx: Context) -> dict:
    return args


@handler("stats", inline=True, args=())
def stats(args: dict, ctx: Context) -> dict[str, Any]:
    """The worker's counters and histograms; every request answered before it is counted."""
    return {**ctx.shared.stats(), "allow": allowlist.of(ctx.shared.config).describe()}  # what call and paths reach
