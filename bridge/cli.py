"""The ``bridge`` command: ``serve`` (the worker, and the default), ``demo``, ``encode``, ``decode``,
``replay``, ``transcript show`` (see ``docs/transcripts.md``) and ``stats`` (``docs/telemetry.md``).

``serve`` is careful about order: stdout is claimed for frames before any
module that might print is imported.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from functools import partial
from typing import Any, Callable

SUBCOMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
TTY_NOTE = ("bridge serve speaks packet-4 msgpack frames on stdin/stdout, for an Erlang port or bridge.Worker; "
            "from a shell, try: echo '{\"type\":\"request\",\"id\":1,\"command\":\"ping\"}' "
            "| dspy-bridge encode | dspy-bridge serve | dspy-bridge decode")


def _subcommand(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    SUBCOMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


SERVE_HELP = "run the worker (default)"


def serve_parser() -> argparse.ArgumentParser:
    """``bridge serve``'s parser on its own, as the whole CLI's parser builds it."""
    from bridge.worker.options import add_serve_options

    parser = argparse.ArgumentParser(prog="bridge serve", description=SERVE_HELP)
    add_serve_options(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from bridge import __version__
    from bridge.wire.protocol import PROTOCOL_VERSION
    from bridge.worker.options import TRUST_OPTIONS, add_serve_options

    parser = argparse.ArgumentParser(prog="bridge", description="DSPy worker for Erlang/Elixir ports.")
    parser.add_argument("--version", action="version", version=f"bridge {__version__} (protocol {PROTOCOL_VERSION})")
    sub = parser.add_subparsers(dest="command")
    add_serve_options(sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP))
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
    # The cyclic collector is off since ``main`` (start-up builds only what lives on); it is back
    # on, with what start-up built frozen, as soon as the event loop runs (``_serve``).
    from bridge.wire import redact
    from bridge.worker import children, stdio

    redact.learn_environment(os.environ)
    if opts.fds:
        in_fd, out_fd = opts.fds
        stdio.divert_stdout()
    else:
        in_fd, out_fd = 0, stdio.claim_stdout()
    stdio.setup_logging(opts.log_level)
    stdio.report_fatal_signals()
    if os.isatty(in_fd):
        print(TTY_NOTE, file=sys.stderr)
    if opts.handlers and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # --handlers my_module finds ./my_module.py, as with python -m
    if not children.become_subreaper():
        print("bridge: not a child subreaper: double-forked descendants may outlive the worker", file=sys.stderr)
    children.track_spawns()
    # DSPy work runs in threads; a thread wanting the GIL waits up to one switch interval.
    # 1 ms instead of 5 ms keeps the loop (pings, frames) responsive under DSPy load.
    sys.setswitchinterval(0.001)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    import anyio

    from bridge.worker.options import config_from, loop_options
    from bridge.worker.registry import REGISTRY
    from bridge.worker.server import Server

    modules = ["bridge.commands.core", "bridge.commands.dspy", "bridge.commands.pipeline", "bridge.commands.optimize",
               "bridge.commands.calls"] + (["bridge.commands.diagnostics"] if opts.diagnostics else [])
    for module in modules + opts.handlers:
        try:
            REGISTRY.load(module)
        except Exception as exc:
            print(f"bridge: cannot load handler module {module!r}: {exc!r}", file=sys.stderr)
            return 2
    server = Server(config_from(opts, in_fd, out_fd))
    from bridge.observe import lm_usage

    REGISTRY.warmup(partial(lm_usage.install, server.metrics.lm))
    try:
        _record_and_replay(opts, server, REGISTRY)
    except (OSError, ValueError) as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    code = 1
    try:
        code = anyio.run(_serve, server, backend_options=loop_options(opts.loop))
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


async def _serve(server: Any) -> int:
    gc.freeze()
    gc.enable()
    return await server.serve()


def _record_and_replay(opts: argparse.Namespace, server: Any, registry: Any) -> None:
    """Transcripts plug into the worker here, so that neither ``worker`` nor ``lm`` imports them:
    the ``replay/`` LM engine reads LM calls from a transcript; ``--record`` installs the
    recorder as the frame tap and, once DSPy is imported, as the LM-recording hook's sink;
    ``--replay-lm`` answers every LM from a transcript."""
    from bridge.transcripts import replay_lm

    replay_lm.install()
    if opts.record:
        from bridge.lm import recording
        from bridge.transcripts.recorder import Recorder

        server.recorder = Recorder.open(opts.record, vars(opts), append=opts.record_append)
        registry.warmup(partial(recording.install, server.recorder))
    if opts.replay_lm:
        replay_lm.serve_every_lm(opts.replay_lm, opts.replay_segment, opts.replay_speed)


@_subcommand
def cmd_replay(opts: argparse.Namespace) -> int:
    from bridge.host import replay
    from bridge.worker.options import TRUST_OPTIONS

    trust = {dest: getattr(opts, dest) for _, dest in TRUST_OPTIONS} | {"diagnostics": opts.diagnostics}
    return replay.run(opts.path, update=opts.update, show=opts.show, speed=opts.speed, timeout=opts.timeout,
                      record=opts.record, trust=trust)


@_subcommand
def cmd_transcript(opts: argparse.Namespace) -> int:
    from bridge.transcripts import views as chatlog

    return chatlog.show_file(opts.path)


@_subcommand
def cmd_stats(opts: argparse.Namespace) -> int:
    from bridge.transcripts import watch

    return watch.run(opts.path, watch=opts.watch, interval=opts.interval)


@_subcommand
def cmd_demo(opts: argparse.Namespace) -> int:
    from bridge.host import demo

    return demo.run()


@_subcommand
def cmd_encode(opts: argparse.Namespace) -> int:
    from bridge.wire import framing, jsontags

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
    from bridge.wire import framing

    decoder, status = framing.Decoder(max_frame_bytes=2**32 - 1), 0
    stdin = sys.stdin.buffer
    if framing.looks_like_json(stdin.peek(4)[:4]):
        print(f"bridge decode: {framing.JSON_HINT}", file=sys.stderr)
        return 1
    while data := stdin.read1(65536):
        for event in decoder.feed(data):
            status |= _print_event(event)
    for event in decoder.close():
        status |= _print_event(event)
    return status


def _print_event(event: object) -> int:
    from bridge.wire import framing, jsontags

    if isinstance(event, framing.Frame):
        print(jsontags.dumps(event.body), flush=True)
        return 0
    print(f"bridge decode: {framing.describe(event)}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]  # serve is the default; a mistyped subcommand is an invalid choice
    if argv[0] == "serve":
        # Start-up only allocates what lives on (modules, classes, the parser, the server): a cyclic
        # collection finds nothing, and the ones the imports trigger cost several ms before ``ready``.
        # ``_serve`` turns the collector back on, with what start-up built frozen (as the warm-up's
        # imports are later): collections after ``ready`` do not walk it either.
        gc.disable()
        # serve's own parser only: the whole CLI's (seven subcommands) costs about 2 ms more
        # before ``ready``; ``bridge serve --help`` and its errors read the same either way.
        opts = serve_parser().parse_args(argv[1:], argparse.Namespace(command="serve"))
    else:
        opts = build_parser().parse_args(argv)
    return SUBCOMMANDS[opts.command](opts)
