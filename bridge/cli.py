"""The ``bridge`` command: ``serve`` (the worker, and the default), ``demo``, ``encode``, ``decode``,
``replay``, ``transcript show`` (see ``docs/transcripts.md``) and ``stats`` (``docs/telemetry.md``).

``serve`` is careful about order: stdout is claimed for frames before any
module that might print is imported.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
import sys
from typing import Any, Callable

SUBCOMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _subcommand(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    SUBCOMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def _fds(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected IN,OUT, e.g. 3,4") from None
    return a, b


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
    p.add_argument("--max-threads", type=int, default=32, help="worker threads for sync handlers")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown")
    p.add_argument("--tool-timeout-ms", type=int, default=30_000, help="default host tool call timeout")
    p.add_argument("--max-objects", type=int, default=10_000, help="objects held by refs, all sessions")
    p.add_argument("--max-inflight", type=int, default=10_000,
                   help="requests running at once; more are refused with 'overloaded'")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description="DSPy worker for Erlang/Elixir ports.")
    sub = parser.add_subparsers(dest="command")
    add_serve_options(sub.add_parser("serve", help="run the worker (default)"))
    sub.add_parser("demo", help="a ReAct agent with two host tools on the scripted LM (no key, no network)")
    sub.add_parser("encode", help="JSON lines on stdin -> frames on stdout")
    sub.add_parser("decode", help="frames on stdin -> JSON lines on stdout")
    replay = sub.add_parser("replay", help="replay a transcript against a fresh worker; exit 1 on a difference")
    replay.add_argument("path")
    replay.add_argument("--update", action="store_true", help="rewrite the transcript from the new run")
    replay.add_argument("--show", action="store_true", help="print the conversation as it happens")
    replay.add_argument("--speed", type=float, metavar="X", help="recorded pacing, X times faster (default: none)")
    replay.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="how long to wait for a frame the recording says comes (default 10)")
    replay.add_argument("--record", metavar="PATH",
                        help="also record the replayed run to PATH (follow it live with bridge stats --watch PATH)")
    for flag, dest in TRUST_OPTIONS:
        replay.add_argument(flag, action="append", dest=dest, metavar="VALUE",
                            help=f"serve option {flag} for the replay worker (never taken from the transcript)")
    replay.add_argument("--diagnostics", action="store_true", help="serve option --diagnostics for the replay worker")
    transcript = sub.add_parser("transcript", help="work with transcripts")
    transcript.add_argument("action", choices=["show"])
    transcript.add_argument("path")
    stats = sub.add_parser("stats", help="the stats table of a transcript; --watch follows a live one")
    stats.add_argument("path")
    stats.add_argument("--watch", action="store_true", help="redraw as the file grows, until the worker exits")
    stats.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between redraws (default 1)")
    return parser


@_subcommand
def cmd_serve(opts: argparse.Namespace) -> int:
    from . import redact, stdio

    redact.learn_environment(os.environ)
    if opts.fds:
        in_fd, out_fd = opts.fds
        stdio.divert_stdout()
    else:
        in_fd, out_fd = 0, stdio.claim_stdout()
    stdio.setup_logging(opts.log_level)
    # DSPy work runs in threads; a thread wanting the GIL waits up to one switch interval.
    # 1 ms instead of 5 ms keeps the loop (pings, frames) responsive under DSPy load.
    sys.setswitchinterval(0.001)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    import anyio

    from .registry import REGISTRY
    from .server import Config, Server

    modules = ["bridge.handlers.core", "bridge.handlers.dspy", "bridge.handlers.pipeline", "bridge.handlers.optimize",
               "bridge.handlers.calls"] + (["bridge.handlers.diagnostics"] if opts.diagnostics else [])
    for module in modules + opts.handlers:
        try:
            REGISTRY.load(module)
        except Exception as exc:
            print(f"bridge: cannot load handler module {module!r}: {exc!r}", file=sys.stderr)
            return 2
    server = Server(Config(in_fd=in_fd, out_fd=out_fd, max_frame_bytes=opts.max_frame_bytes,
                           max_threads=opts.max_threads, drain_timeout=opts.drain_timeout,
                           tool_timeout_ms=opts.tool_timeout_ms, max_objects=opts.max_objects,
                           max_inflight=opts.max_inflight, allow_modules=tuple(opts.allow_modules or ()),
                           allow_names=tuple(opts.allow_names or ()), allow_paths=tuple(opts.allow_paths or ()),
                           max_file_bytes=opts.max_file_bytes, allow_api_bases=tuple(opts.allow_api_bases or ()),
                           meta=opts.meta, telemetry=opts.telemetry, slow_chunk_ms=opts.slow_chunk_ms))
    from . import lm_metrics

    REGISTRY.warmup(partial(lm_metrics.install, server))
    try:
        _record_and_replay(opts, server, REGISTRY)
    except (OSError, ValueError) as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    code = 1
    try:
        code = anyio.run(server.serve)
    except BaseException:
        import logging
        logging.getLogger("bridge").exception("the worker loop crashed")
    finally:
        if server.writer is not None:
            server.writer.flush_blocking(timeout=2.0)
        if server.recorder is not None:
            server.recorder.close(code)
        stdio.hard_exit(code)
    return code  # not reached: hard_exit does not return


def _record_and_replay(opts: argparse.Namespace, server: Any, registry: Any) -> None:
    """``--record``: a recorder for every frame, and the LM hook once DSPy is imported.
    ``--replay-lm``: every LM answered from a transcript."""
    if opts.record:
        from . import lm_recording, transcript

        server.recorder = transcript.Recorder.open(opts.record, vars(opts), append=opts.record_append)
        registry.warmup(partial(lm_recording.install, server.recorder))
    if opts.replay_lm:
        from .replay_engine import serve_every_lm

        serve_every_lm(opts.replay_lm, opts.replay_segment, opts.replay_speed)


@_subcommand
def cmd_replay(opts: argparse.Namespace) -> int:
    from . import replay

    trust = {dest: getattr(opts, dest) for _, dest in TRUST_OPTIONS} | {"diagnostics": opts.diagnostics}
    return replay.run(opts.path, update=opts.update, show=opts.show, speed=opts.speed, timeout=opts.timeout,
                      record=opts.record, trust=trust)


@_subcommand
def cmd_transcript(opts: argparse.Namespace) -> int:
    from . import chatlog

    return chatlog.show_file(opts.path)


@_subcommand
def cmd_stats(opts: argparse.Namespace) -> int:
    from . import watch

    return watch.run(opts.path, watch=opts.watch, interval=opts.interval)


@_subcommand
def cmd_demo(opts: argparse.Namespace) -> int:
    from . import demo

    return demo.run()


@_subcommand
def cmd_encode(opts: argparse.Namespace) -> int:
    from . import framing, jsontags

    out, status = sys.stdout.buffer, 0
    for lineno, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            out.write(framing.encode(jsontags.loads(line)))
        except ValueError as exc:
            print(f"bridge encode: line {lineno}: {exc}", file=sys.stderr)
            status = 1
        out.flush()
    return status


@_subcommand
def cmd_decode(opts: argparse.Namespace) -> int:
    from . import framing

    decoder, status = framing.Decoder(max_frame_bytes=2**32 - 1), 0
    stdin = sys.stdin.buffer
    while data := stdin.read1(65536):
        for event in decoder.feed(data):
            status |= _print_event(event)
    for event in decoder.close():
        status |= _print_event(event)
    return status


def _print_event(event: object) -> int:
    from . import framing, jsontags

    if isinstance(event, framing.Frame):
        print(jsontags.dumps(event.body), flush=True)
        return 0
    print(f"bridge decode: {event}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    opts = build_parser().parse_args(argv)
    return SUBCOMMANDS[opts.command](opts)
