"""What a new user meets first at the command line, run as they run it: each a real process."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from bridge.wire import framing
from tests.conftest import ROOT

# What a console script runs: unlike ``python -m``, it puts no current directory on sys.path.
CONSOLE_SCRIPT = [sys.executable, "-P", "-c", "import sys; from bridge.cli import main; sys.exit(main())"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def run(args: list[str], stdin: bytes = b"", cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=60, cwd=cwd, env=ENV)


def frames(data: bytes) -> list[dict]:
    events = framing.Decoder().feed(data)
    assert all(isinstance(e, framing.Frame) for e in events), events
    return [e.body for e in events]


def test_version():
    out = run([*CONSOLE_SCRIPT, "--version"])
    assert out.returncode == 0 and out.stdout.decode().strip() == "bridge 0.1.0 (protocol 1)"


def test_a_mistyped_subcommand_is_an_invalid_choice():
    out = run([*CONSOLE_SCRIPT, "srve"])
    assert out.returncode == 2 and b"invalid choice: 'srve'" in out.stderr and out.stdout == b""


def test_options_alone_still_mean_serve():
    line = framing.encode({"type": "request", "id": 1, "command": "ping"})
    out = run([*CONSOLE_SCRIPT, "--log-level", "error"], stdin=line)
    assert out.returncode == 0 and [f["type"] for f in frames(out.stdout)] == ["ready", "result"]


def test_serve_help_and_errors_are_the_whole_clis():
    """``serve`` parses with its own parser (start-up); help and errors match the whole CLI's."""
    from bridge.cli import build_parser, serve_parser

    whole = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert serve_parser().format_help() == whole.format_help()
    out = run([*CONSOLE_SCRIPT, "serve", "--max-threads", "0"])
    assert out.returncode == 2 and b"bridge serve: error: argument --max-threads" in out.stderr
    out = run([*CONSOLE_SCRIPT, "serve", "--help"])
    assert out.returncode == 0 and out.stdout.startswith(b"usage: bridge serve ") and b"--max-inflight" in out.stdout


def test_json_sent_to_serve_gets_an_error_that_says_to_encode_it():
    out = run([*CONSOLE_SCRIPT, "serve"], stdin=b'{"type":"request","id":1,"command":"ping"}\n')
    errors = [f["error"] for f in frames(out.stdout) if f["type"] == "error"]
    assert errors[0]["type"] == "frame_too_large" and "pipe JSON lines through `bridge encode`" in errors[0]["message"]
    assert b"looks like JSON" in out.stderr


def test_decode_explains_its_input_in_plain_words():
    json_in = run([*CONSOLE_SCRIPT, "decode"], stdin=b'{"type":"ping"}\n')
    assert json_in.returncode == 1 and b"this looks like JSON, not a frame" in json_in.stderr
    cut = run([*CONSOLE_SCRIPT, "decode"], stdin=framing.encode({"a": 1})[:-1])
    assert cut.returncode == 1 and cut.stderr.decode().strip() == "bridge decode: input ended inside a frame (7 of 8 bytes)"


def test_handlers_are_found_in_the_current_directory(tmp_path):
    (tmp_path / "my_handlers.py").write_text(
        "from bridge import handler\n\n@handler('greet')\ndef greet(args, ctx):\n    return {'hello': args['name']}\n")
    line = framing.encode({"type": "request", "id": 1, "command": "greet", "args": {"name": "Ada"}})
    out = run([*CONSOLE_SCRIPT, "serve", "--handlers", "my_handlers"], stdin=line, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert frames(out.stdout)[1]["data"] == {"hello": "Ada"}


def test_serve_on_a_terminal_says_what_it_speaks():
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*CONSOLE_SCRIPT, "serve"], stdin=follower, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    os.close(follower)
    try:
        note = proc.stderr.readline().decode()
        assert "speaks packet-4 msgpack frames" in note and "dspy-bridge encode" in note
    finally:
        os.close(leader)  # the terminal hangs up: the worker sees the end of its input
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_the_shell_pipe_with_react_says_tools_need_a_live_host():
    requests = [
        {"type": "request", "id": 1, "command": "lm.configure",
         "args": {"model": "scripted/agent", "script": [
             {"next_thought": "Look it up.", "next_tool_name": "search", "next_tool_args": {"query": "x"}},
             {"next_thought": "Done.", "next_tool_name": "finish", "next_tool_args": {}},
             {"reasoning": "none", "answer": "unknown"}]}},
        {"type": "request", "id": 2, "command": "dspy.react",
         "args": {"signature": "question -> answer", "inputs": {"question": "q"},
                  "tools": [{"name": "search", "description": "Search.",
                             "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]}},
    ]
    lines = "".join(json.dumps(r) + "\n" for r in requests)
    out = subprocess.run(["bash", "-c", "dspy-bridge encode | dspy-bridge serve | dspy-bridge decode"], input=lines.encode(),
                         capture_output=True, timeout=120, cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr
    chunks = [json.loads(line) for line in out.stdout.decode().splitlines()]
    observation = next(c["data"] for c in chunks if c["type"] == "chunk" and c["data"].get("event") == "observation")
    assert observation["error"]["type"] == "host_closed"
    assert "host tools need a live host" in observation["error"]["message"]
