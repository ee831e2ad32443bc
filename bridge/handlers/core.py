"""Commands every worker answers: ``ping``, ``echo``, ``stats``.  All inline: no task, no thread."""

from __future__ import annotations

import time
from typing import Any

from .. import allowlist
from ..context import Context
from ..registry import handler


def rss_bytes() -> int:
    """Resident set size from /proc (no psutil dependency for one number)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


@handler("ping", inline=True)
def ping(args: dict, ctx: Context) -> dict:
    return {"pong": True, "time": time.time()}


@handler("echo", inline=True)
def echo(args: dict, ctx: Context) -> dict:
    return args


@handler("stats", inline=True)
def stats(args: dict, ctx: Context) -> dict[str, Any]:
    server = ctx.server
    server.flush_replies()  # the replies before this one are counted
    writer = server.writer
    return {
        "uptime_s": time.monotonic() - server.started,
        "warm": server.warm.is_set(),
        "in_flight": len(server.inflight),
        "tool_calls_parked": server.tools.parked,
        "frames_in": server.frames_in,
        "frames_out": writer.frames_out,
        "bytes_in": server.bytes_in,
        "bytes_out": writer.bytes_out,
        "rss_bytes": rss_bytes(),
        "sessions": len(server.sessions),
        "objects": server.sessions.object_count,
        **server.metrics.snapshot(),  # requests, errors, latency_ms, histogram_buckets, lm
        "lm_by_session": server.sessions.lm_usage(),
        "allow": allowlist.of(server.config).describe(),  # what 'call' and host paths may reach
    }
