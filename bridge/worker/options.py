"""The worker's start-up options: ``Config``, and the ``bridge serve`` flags that fill it.

Here rather than in the CLI so that a transcript's header can be turned back
into flags (``transcripts.format.serve_argv``) without importing the CLI.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

from bridge.wire import framing


class Config(NamedTuple):
    in_fd: int = 0
    out_fd: int = 1
    max_frame_bytes: int = framing.MAX_FRAME_BYTES
    max_threads: int = 32
    max_thread_queue: int = 1000  # calls waiting for a worker thread; one more is ``overloaded``
    drain_timeout: float = 30.0
    tool_timeout_ms: int = 30_000
    max_objects: int = 10_000
    max_inflight: int = 10_000
    max_sessions: int = 10_000  # one more session is ``overloaded``
    session_ttl: float = 3600.0  # idle seconds before a session not made by session.create expires
    allow_modules: tuple[str, ...] = ()  # module prefixes 'call' may reach beyond its table (--allow-module)
    allow_names: tuple[str, ...] = ()  # exact 'call' targets added to the table (--allow)
    allow_paths: tuple[str, ...] = ()  # directories host paths may lie in (--allow-path)
    max_file_bytes: int = 64 * 1024 * 1024  # the largest file read for a host (--max-file-bytes)
    allow_api_bases: tuple[str, ...] = ()  # URL prefixes a frame may send the operator's key to
    meta: bool = True  # ``meta`` on terminal frames (``--no-meta`` is the benchmark's baseline)
    telemetry: bool = False  # telemetry frames for every request, not only those asking
    slow_chunk_ms: float = 100.0  # a gap between chunks above this is a slow_chunk event


def _fds(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected IN,OUT, e.g. 3,4") from None
    return a, b


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, not {text!r}")
    return value


def add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fds", type=_fds, metavar="IN,OUT",
                   help="read and write frames on these descriptors (Erlang nouse_stdio: 3,4)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error", "critical"])
    p.add_argument("--handlers", action="append", default=[], metavar="MODULE",
                   help="import this module of @handler functions (repeatable)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also serve stream_count, sleep and rpc_loop (benchmarks, health checks)")
    p.add_argument("--max-frame-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--max-threads", type=_positive, default=32,
                   help="worker threads (sync handlers, threaded DSPy work); a cancelled call's thread "
                        "counts until it returns")
    p.add_argument("--max-thread-queue", type=_positive, default=1000,
                   help="calls that may wait for a worker thread; one more is refused with 'overloaded'")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown")
    p.add_argument("--tool-timeout-ms", type=int, default=30_000, help="default host tool call timeout")
    p.add_argument("--max-objects", type=int, default=10_000, help="objects held by refs, all sessions")
    p.add_argument("--max-inflight", type=int, default=10_000,
                   help="requests running at once; more are refused with 'overloaded'")
    p.add_argument("--max-sessions", type=_positive, default=10_000,
                   help="sessions held at once; a request that would create one more gets 'overloaded'")
    p.add_argument("--session-ttl", type=_seconds, default=3600.0, metavar="S",
                   help="idle seconds before a session not made by session.create (and not the default one) expires")
    p.add_argument("--allow-module", action="append", dest="allow_modules", metavar="PREFIX",
                   help="module prefix whose public callables 'call' may reach beyond its table (repeatable)")
    p.add_argument("--allow", action="append", dest="allow_names", metavar="NAME",
                   help="one exact 'call' target added to the table, e.g. dspy.Evaluate (repeatable)")
    p.add_argument("--allow-path", action="append", dest="allow_paths", metavar="DIR",
                   help="a directory host paths may lie in: replay/<path>, save/load (repeatable; default: none)")
    p.add_argument("--max-file-bytes", type=int, default=64 * 1024 * 1024,
                   help="the largest file the worker reads for a host (default 64 MiB)")
    p.add_argument("--allow-api-base", action="append", dest="allow_api_bases", metavar="PREFIX",
                   help="a URL prefix an lm.configure api_base/base_url may name without its own api_key")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="the event loop: uvloop (a C loop, less CPU per frame) or asyncio's own; "
                        "auto: uvloop when it is installed")
    p.add_argument("--no-meta", dest="meta", action="store_false",
                   help="leave 'meta' off terminal frames (the benchmark's baseline for its cost)")
    p.add_argument("--telemetry", action="store_true",
                   help="send telemetry frames for every request, not only those with telemetry: true")
    p.add_argument("--slow-chunk-ms", type=float, default=100.0, metavar="MS",
                   help="a gap between two chunks longer than this is a slow_chunk telemetry event")
    p.add_argument("--record", metavar="PATH", help="write a transcript: every frame and LM call (JSON Lines)")
    p.add_argument("--record-append", action="store_true",
                   help="append to PATH as a new segment (a restarted worker) instead of replacing it")
    p.add_argument("--replay-lm", metavar="PATH", help="answer every LM call from this transcript's recorded ones")
    p.add_argument("--replay-segment", type=int, metavar="N", help="with --replay-lm: only segment N's calls")
    p.add_argument("--replay-speed", type=float, metavar="X",
                   help="with --replay-lm: recorded LM pacing, X times faster (default: no waiting)")


TRUST_OPTIONS = (("--handlers", "handlers"), ("--allow-module", "allow_modules"), ("--allow", "allow_names"),
                 ("--allow-path", "allow_paths"), ("--allow-api-base", "allow_api_bases"))
"""Serve options that widen what a worker trusts: ``bridge replay`` takes them only from its command line."""


def config_from(opts: argparse.Namespace, in_fd: int, out_fd: int) -> Config:
    """The ``Config`` of parsed ``bridge serve`` options."""
    return Config(in_fd=in_fd, out_fd=out_fd, max_frame_bytes=opts.max_frame_bytes,
                  max_threads=opts.max_threads, max_thread_queue=opts.max_thread_queue, drain_timeout=opts.drain_timeout,
                  tool_timeout_ms=opts.tool_timeout_ms, max_objects=opts.max_objects,
                  max_inflight=opts.max_inflight, max_sessions=opts.max_sessions, session_ttl=opts.session_ttl,
                  allow_modules=tuple(opts.allow_modules or ()),
                  allow_names=tuple(opts.allow_names or ()), allow_paths=tuple(opts.allow_paths or ()),
                  max_file_bytes=opts.max_file_bytes, allow_api_bases=tuple(opts.allow_api_bases or ()),
                  meta=opts.meta, telemetry=opts.telemetry, slow_chunk_ms=opts.slow_chunk_ms)


def loop_options(choice: str) -> dict[str, bool]:
    """``anyio.run``'s backend options for ``--loop``: uvloop when asked for, or when ``auto`` finds it."""
    if choice == "auto":
        import importlib.util

        choice = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return {"use_uvloop": choice == "uvloop"}
