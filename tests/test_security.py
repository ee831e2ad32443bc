"""The trust boundary (docs/security.md), attacked through the worker's pipes: one test per attack class.

Each attack would write a marker file if it ran; each test asserts the marker is
absent, the error type, and that the worker still answers ``ping``.  The property
test drives ``call`` with generated targets under an audit hook in the worker.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import RemoteError, Worker
from bridge.host import replay
from bridge.transcripts import format as transcript
from bridge.wire import framing
from tests.conftest import ROOT

EVIL_MODULE = "import os, pathlib\npathlib.Path(os.environ['SECURITY_MARKERS'], {name!r}).write_text('ran')\n"


def worker_env(markers: Path, *extra: Path) -> dict[str, str]:
    """The worker's environment: the repository and ``extra`` on the path; markers go to ``markers``."""
    path = os.pathsep.join([str(ROOT), *map(str, extra), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, SECURITY_MARKERS=str(markers))


def spawn(env: dict[str, str], *args: str, **kwargs: Any) -> Worker:
    return Worker([sys.executable, "-m", "bridge", "serve", *args], env=env, **kwargs)


def fails(w: Worker, command: str, args: dict, **fields: Any) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        w.call(command, args, **fields)
    return info.value


def alive(w: Worker) -> None:
    assert w.call("ping")["pong"] is True


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """One worker allowed one directory (``files``), with an importable module that would leave a
    marker, and the audit hook loaded."""
    root = tmp_path_factory.mktemp("security")
    markers, files, modules = root / "markers", root / "files", root / "modules"
    for folder in (markers, files, modules):
        folder.mkdir()
    (modules / "evil_sig.py").write_text(EVIL_MODULE.format(name="evil_sig"))
    env = worker_env(markers, modules)
    with tempfile.TemporaryFile("w+") as log, spawn(env, "--allow-path", str(files), "--max-file-bytes", "100000",
                                                    "--handlers", "tests.audit_handlers", stderr=log) as w:
        yield {"w": w, "markers": markers, "files": files}


def no_markers(lab: dict[str, Any]) -> None:
    assert list(lab["markers"].iterdir()) == []


def call(w: Worker, target: Any, *args: Any, **kwargs: Any) -> Any:
    return w.call("call", {"target": target, "args": list(args), "kwargs": kwargs})


# ---- 1. attribute walks and code execution through call ---------------------------------------

def test_dspy_helpers_that_walk_attributes_or_run_code_are_not_reachable(lab):
    w, marker = lab["w"], lab["markers"] / "exec"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    predict = call(w, "dspy.Predict", "q -> a")["__ref__"]
    walk = {"target": "dspy.utils.magicattr.get", "args": [{"__ref__": predict}, "forward.__globals__['__builtins__']['exec']"],
            "store_as": "exec"}
    assert fails(w, "call", walk).type == "forbidden"
    assert fails(w, "call", {"target": {"ref": "exec"}, "args": [code]}).type == "unknown_ref"
    for target in ("dspy.LocalInterpreter", "dspy.primitives.local_interpreter.LocalInterpreter",
                   "dspy.PythonInterpreter", "dspy.Predict.forward.__globals__"):
        assert fails(w, "call", {"target": target, "args": [code]}).type == "forbidden"
    for method in ("forward.__globals__", "__class__", "__init__", "_compiled", "signature"):
        assert fails(w, "call", {"target": {"ref": predict, "method": method}}).type == "forbidden"
    no_markers(lab)
    alive(w)


def test_an_operator_prefix_still_keeps_no_builtin_as_a_ref(tmp_path):
    """Even with --allow-module dspy, exec fetched through magicattr is not kept, so it cannot be called."""
    markers = tmp_path / "markers"
    markers.mkdir()
    code = f"open({str(markers / 'exec')!r}, 'w').write('ran')"
    with spawn(worker_env(markers), "--allow-module", "dspy", stderr=subprocess.DEVNULL) as w:
        predict = call(w, "dspy.Predict", "q -> a")["__ref__"]
        err = fails(w, "call", {"target": "dspy.utils.magicattr.get", "store_as": "exec",
                                "args": [{"__ref__": predict}, "forward.__globals__['__builtins__']['exec']"]})
        assert err.type == "forbidden" and "not kept" in err.message
        assert fails(w, "call", {"target": {"ref": "exec"}, "args": [code]}).type == "unknown_ref"
        kept = call(w, "dspy.utils.magicattr.get", {"__ref__": predict}, "forward")  # DSPy's own: the prefix allows it
        assert kept["type"] == "builtins.method"
        alive(w)
    assert list(markers.iterdir()) == []


# ---- 2. pickles -----------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_no_pickle_is_ever_loaded(lab):
    w, files = lab["w"], lab["files"]
    for name in ("program.pkl", "program_pickle.json"):
        (files / name).write_bytes(pickle.dumps(_Payload(lab["markers"] / "pickle")))
    predict = call(w, "dspy.Predict", "q -> a")["__ref__"]
    ref = {"ref": predict, "method": "load"}
    assert fails(w, "call", {"target": "dspy.load", "args": [str(files / "program.pkl")],
                             "kwargs": {"allow_pickle": True}}).type == "forbidden"
    err = fails(w, "call", {"target": ref, "args": [str(files / "program.pkl")], "kwargs": {"allow_pickle": True}})
    assert err.type == "forbidden" and "allow_pickle" in err.message
    err = fails(w, "call", {"target": ref, "args": [str(files / "program.pkl")]})
    assert err.type == "forbidden" and err.details["reason"].startswith("save and load take .json")
    assert fails(w, "call", {"target": ref, "args": [str(files / "program_pickle.json")]}).type == "bad_request"
    err = fails(w, "call", {"target": {"ref": predict, "method": "save"}, "args": [str(files / "out.json")],
                            "kwargs": {"save_program": True}})
    assert err.type == "forbidden"
    no_markers(lab)
    alive(w)


def test_save_and_load_work_inside_the_allowed_directory_only(lab):
    w, files = lab["w"], lab["files"]
    predict = call(w, "dspy.Predict", "q -> a")["__ref__"]
    assert call(w, {"ref": predict, "method": "save"}, str(files / "state.json")) is None
    assert json.loads((files / "state.json").read_text())["signature"]
    assert call(w, {"ref": predict, "method": "load"}, str(files / "sub" / ".." / "state.json")) is None
    for path in ("/tmp/state.json", str(files / ".." / "state.json"), "/etc/passwd"):
        err = fails(w, "call", {"target": {"ref": predict, "method": "load"}, "args": [path]})
        assert err.type == "forbidden" and err.details["path"] == path
    alive(w)


@pytest.mark.parametrize("optimizer, params, reason", [
    ("BootstrapFewShot", {"requires_permission_to_run": True}, "never allowed"),  # input() on the frame pipe
    ("MIPROv2", {"log_dir": "/tmp/bridge-security-log"}, "outside the --allow-path"),
])
def test_optimizer_params_neither_read_the_terminal_nor_write_outside(lab, optimizer, params, reason):
    w = lab["w"]
    args = {"optimizer": optimizer, "params": params, "program": {"module": "Predict", "signature": "q -> a"},
            "trainset": [{"inputs": {"q": "x"}, "outputs": {"a": "y"}}], "metric": "exact_match"}
    err = fails(w, "dspy.optimize", args)
    assert err.type == "forbidden" and reason in err.details["reason"]
    assert not os.path.exists("/tmp/bridge-security-log")
    no_markers(lab)
    alive(w)


# ---- 3. signatures ------------------------------------------------------------------------------

@pytest.mark.parametrize("command, args, position", [
    ("dspy.predict", {"signature": "question: evil_sig -> answer", "inputs": {"question": "q"}}, 10),
    ("program.create", {"signature": "q -> a: list[evil_sig.Thing]", "module": "Predict"}, 13),
    ("program.create", {"signature": {"inputs": {"q": {"type": "evil_sig"}}, "outputs": {"a": {}}},
                        "module": "Predict"}, "inputs.q"),
    ("program.create", {"signature": {"inputs": {"q": {}}, "outputs": {"a": {"type": "Optional[evil_sig]"}}},
                        "module": "Predict"}, "outputs.a"),
    ("call", {"target": "dspy.Predict", "args": ["q: evil_sig -> a"]}, 3),
    ("call", {"target": "dspy.ChainOfThought", "kwargs": {"signature": "q -> a: evil_sig | None"}}, 8),
])
def test_a_type_name_in_a_signature_never_imports(lab, command, args, position):
    err = fails(lab["w"], command, args)
    assert err.type == "bad_request"
    assert err.details["position"] == position and "evil_sig" in err.details["type"]
    no_markers(lab)
    alive(lab["w"])


# ---- 4. transcripts ---------------------------------------------------------------------------

def test_a_transcript_cannot_load_handlers_or_widen_the_allow_list(tmp_path, monkeypatch, capsys):
    markers, modules = tmp_path / "markers", tmp_path / "modules"
    markers.mkdir()
    modules.mkdir()
    (modules / "evil_handlers.py").write_text(EVIL_MODULE.format(name="evil_handlers"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(modules), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SECURITY_MARKERS", str(markers))
    options = {"handlers": ["evil_handlers"], "allow_modules": ["os"], "diagnostics": True, "max_frame_bytes": 4096}
    ready = {"type": "ready", "protocol": 1, "version": "0.1.0", "pid": 1, "commands": ["ping"], "capabilities": []}
    records = [
        {"transcript": 1, "worker": "0.1.0", "options": options},
        {"t": 0.1, "dir": "out", "frame": ready},
        {"t": 0.2, "dir": "in", "frame": {"type": "request", "id": 1, "command": "call",
                                          "args": {"target": "os.system", "args": [f"touch {markers / 'system'}"]}}},
        {"t": 0.3, "dir": "out", "frame": {"type": "result", "id": 1, "data": 0}},
        {"t": 0.4, "dir": "in", "frame": {"type": "request", "id": 2, "command": "ping"}},
        {"t": 0.5, "dir": "out", "frame": {"type": "result", "id": 2, "data": {"pong": True, "time": 0}}},
        {"t": 0.6, "dir": "in", "eof": True},
        {"t": 0.7, "exit": 0},
    ]
    path = tmp_path / "bug_report.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = io.StringIO()
    assert replay.run(str(path), out=out) == 1  # the refused call is a difference, not a pass
    diff = out.getvalue()
    assert "request 1 (call)" in diff and '"type":"forbidden"' in diff.replace(" ", "")
    assert "request 2" not in diff  # the worker still answered ping the same way
    notes = capsys.readouterr().err
    assert 'transcript option handlers = ["evil_handlers"] (--handlers): ignored' in notes
    assert 'transcript option allow_modules = ["os"] (--allow-module): ignored' in notes
    assert "transcript option max_frame_bytes = 4096 (--max-frame-bytes): used" in notes
    assert list(markers.iterdir()) == []


def test_replay_passes_no_meta_the_right_way_round():
    assert transcript.options_argv({"meta": False}) == ["--no-meta"]
    assert transcript.options_argv({"meta": True}) == []
    argv, _ = transcript.replay_argv({"options": {"meta": False, "handlers": ["x"]}}, {"allow_paths": ["/srv"]})
    assert argv == ["--no-meta", "--allow-path", "/srv"]


# ---- 5. host paths ------------------------------------------------------------------------------

def test_replay_paths_are_confined_regular_and_bounded(lab, tmp_path):
    w, files = lab["w"], lab["files"]
    fifo = files / "stuck.jsonl"
    os.mkfifo(fifo)
    opened = threading.Event()

    def writer() -> None:  # returns only once some reader opened the FIFO
        with open(fifo, "w"):
            opened.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    (files / "zero.jsonl").symlink_to("/dev/zero")
    (files / "big.jsonl").write_text('{"transcript": 1}\n' + " " * 200_000)
    call(w, "dspy.Example")  # waits for the warm-up, whose DSPy import would count as growth below
    rss = w.call("stats")["rss_bytes"]
    cases = {str(fifo): ("forbidden", "not a regular file"), str(files / "zero.jsonl"): ("forbidden", "outside"),
             "/dev/zero": ("forbidden", "outside"), "/etc/passwd": ("forbidden", "outside"),
             str(files / "big.jsonl"): ("bad_request", None)}
    for path, (kind, reason) in cases.items():
        err = fails(w, "lm.configure", {"model": f"replay/{path}"})
        assert err.type == kind, (path, err)
        assert err.details["path"] == path and (reason is None or reason in err.details["reason"])
        alive(w)
    assert fails(w, "lm.configure", {"model": f"replay/{files / 'big.jsonl'}"}).details["limit"] == 100_000
    assert w.call("stats")["rss_bytes"] - rss < 50 * 2**20
    assert not opened.is_set()  # the worker never opened the FIFO
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let the writer thread go
    thread.join(5)
    no_markers(lab)


class _Provider(http.server.BaseHTTPRequestHandler):
    """A local OpenAI-style endpoint that refuses every key, quoting it as real providers do."""

    seen: list[str] = []

    def do_POST(self) -> None:
        key = self.headers.get("Authorization", "")
        type(self).seen.append(key)
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error",
                                     "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def provider() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    _Provider.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_a_frame_cannot_send_the_operators_key_to_its_own_url(tmp_path, provider):
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**worker_env(markers), "OPENAI_API_KEY": "sk-operator-env-key-0123456789"}
    with spawn(env, stderr=subprocess.DEVNULL) as w:
        for key in ("api_base", "base_url"):
            err = fails(w, "lm.configure", {"model": "openai/gpt-4o-mini", key: provider})
            assert err.type == "forbidden" and err.details["option"] == key
        alive(w)
    with spawn(env, "--allow-api-base", provider.removesuffix("/v1"), stderr=subprocess.DEVNULL) as w:
        assert fails(w, "lm.configure", {"model": "openai/gpt-4o-mini",
                                         "api_base": "http://127.0.0.1.evil.example/v1"}).type == "forbidden"
        w.call("lm.configure", {"model": "openai/gpt-4o-mini", "api_base": provider, "num_retries": 0})
        err = fails(w, "dspy.predict", {"signature": "q -> a", "inputs": {"q": "hi"}})
        assert err.type == "lm_error" and "sk-operator-env-key" not in json.dumps(err.frame)
        assert "[REDACTED]" in err.message
    assert _Provider.seen == ["Bearer sk-operator-env-key-0123456789"]  # only where the operator allowed


# ---- 6. secrets ---------------------------------------------------------------------------------

class _Frames(Worker):
    """A worker whose every frame is kept, packed again, for searching."""

    everything: list[bytes] = []

    def _route(self, frame: dict) -> None:
        self.everything.append(framing.encode(frame))
        super()._route(frame)


def test_a_secret_canary_appears_in_no_frame_log_line_or_transcript(tmp_path, provider):
    canary = "sk-canary-5f1e2d3c4b5a69788796a5b4"
    record, markers = tmp_path / "canary.jsonl", tmp_path / "markers"
    markers.mkdir()
    _Frames.everything = []
    with tempfile.TemporaryFile("w+b") as log:
        with _Frames([sys.executable, "-m", "bridge", "serve", "--log-level", "debug", "--record", str(record)],
                     env=worker_env(markers), stderr=log) as w:
            config = {"model": "openai/gpt-4o-mini", "api_key": canary + "\n", "api_base": provider,
                      "num_retries": 0, "headers": {"Authorization": f"Bearer {canary}"}}
            assert w.call("lm.configure", config)["model"] == "openai/gpt-4o-mini"
            for inputs in ({"q": "first"}, {"q": "second"}):
                err = fails(w, "dspy.predict", {"signature": "q -> a", "inputs": inputs})
                assert err.type == "lm_error", err
            assert w.call("echo", {"api_key": canary, "text": f"my key is {canary}"}) == {
                "api_key": "[REDACTED]", "text": "my key is [REDACTED]"}
            stats = w.call("stats")
            alive(w)
            assert w.shutdown() == 0
        log.seek(0)
        stderr = log.read()
    assert _Provider.seen, "the provider was never called: the test proves nothing"
    assert b"DEBUG" in stderr
    frames = b"".join(_Frames.everything)
    for where, text in (("frames", frames), ("stderr", stderr), ("transcript", record.read_bytes()),
                        ("stats", msgpack.packb(stats))):
        assert canary.encode() not in text, where
    assert b"[REDACTED]" in frames and b"[REDACTED]" in record.read_bytes()


# ---- 7. bounded error frames --------------------------------------------------------------------

def test_an_error_quotes_at_most_200_bytes_of_any_host_value(lab):
    w, huge = lab["w"], "x" * (8 * 2**20)
    call(w, "dspy.Example")  # after the warm-up's DSPy import
    rss = w.call("stats")["rss_bytes"]
    w.send({"type": huge})
    frame = w.unrouted.get(timeout=30)
    assert len(framing.encode(frame)) < 1024
    assert frame["error"]["details"]["length"] == len(huge) and frame["error"]["details"]["type"].endswith("…")
    for command, args, kind in (
            (huge, {}, "unknown_command"),
            ("call", {"target": huge}, "forbidden"),
            ("release", {"ref": huge}, "unknown_ref"),
            ("program.create", {"signature": f"q: {huge} -> a"}, "bad_request")):
        request = w.request(command, args, session_id=huge[:256])  # the longest session id allowed
        with pytest.raises(RemoteError):
            request.result()
        assert request.terminal["error"]["type"] == kind
        assert len(framing.encode(request.terminal)) < 4096, command[:20]
    assert w.call("stats")["rss_bytes"] - rss < 400 * 2**20
    alive(w)


def nested(depth: int, leaf: Any) -> Any:
    for level in range(depth):
        leaf = [leaf] if level % 2 else {"k": leaf}
    return leaf


def test_a_deeply_nested_secret_is_neither_sent_nor_recorded_nor_a_hang(tmp_path):
    record, secret = tmp_path / "deep.jsonl", "sk-deep-secret-0123456789"
    with spawn(worker_env(tmp_path), "--record", str(record), stderr=subprocess.DEVNULL) as w:
        shallow = w.call("echo", {"x": nested(60, {"api_key": secret})}, timeout=10)
        assert secret not in json.dumps(shallow) and "[REDACTED]" in json.dumps(shallow)
        for depth in (150, 1000):  # linear work per level, however deep; deeper than 100 is refused
            err = fails(w, "echo", {"x": nested(depth, {"api_key": secret})})
            assert err.type == "handler_error" and "too deep to check for secrets" in err.message
        alive(w)
        assert w.shutdown() == 0
    assert secret not in record.read_text()


# ---- the property: nothing outside the allow-list is ever invoked ---------------------------------

NAMES = ["dspy", "os", "builtins", "sys", "importlib", "pickle", "subprocess", "Predict", "Example", "Prediction",
         "ChainOfThought", "utils", "magicattr", "get", "primitives", "LocalInterpreter", "PythonInterpreter",
         "local_interpreter", "python_interpreter", "load", "save", "system", "exec", "eval", "import_module",
         "loads", "settings", "configure", "forward", "acall", "dump_state", "execute", "__class__", "__globals__",
         "__builtins__", "__import__", "__init__", "_private", "saving", "clients", "streamify", "asyncify",
         "signature", "Signature", "make_signature", "teleprompt", "evaluate", "ProgramOfThought", "CodeAct", "RLM"]
ALLOWED_HERE = {"dspy.Predict", "dspy.Example", "dspy.Prediction", "dspy.ChainOfThought"}
targets = st.builds(".".join, st.lists(st.sampled_from(NAMES), min_size=1, max_size=5))
methods = st.one_of(st.none(), targets)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=targets, method=methods, as_ref=st.booleans())
def test_property_no_call_target_invokes_anything_outside_the_allow_list(lab, target, method, as_ref):
    w = lab["w"]
    if not lab.get("armed"):
        for name in sorted(ALLOWED_HERE):  # their first use may import: done before the audit hook records
            try:
                call(w, name, "q -> a")
            except RemoteError:
                pass
        lab["ref"] = call(w, "dspy.Predict", "q -> a")["__ref__"]
        call(w, {"ref": lab["ref"], "method": "dump_state"})
        w.call("audit.arm")
        lab["armed"] = True
    code = f"open({str(lab['markers'] / 'property')!r}, 'w').write('ran')"
    spec = {"ref": lab["ref"], "method": method} if as_ref else target
    try:
        call(w, spec, code)
        outcome = "result"
    except RemoteError as err:
        outcome = err.type
    if as_ref:
        allowed = method is None or method in {"forward", "acall", "dump_state"}
    else:
        allowed = target in ALLOWED_HERE
    assert outcome in (("result", "handler_error", "bad_request", "lm_not_configured") if allowed
                       else ("forbidden", "bad_request")), (spec, outcome)
    assert w.call("audit.events") == []
    no_markers(lab)


def test_the_audit_guard_sees_what_an_operator_opens(tmp_path):
    """The property's guard can fail: with subprocess allowed by the operator, a process start is seen."""
    with spawn(worker_env(tmp_path), "--allow-module", "subprocess", "--handlers", "tests.audit_handlers",
               stderr=subprocess.DEVNULL) as w:
        assert call(w, "subprocess.getoutput", "echo warm") == "warm"  # after the warm-up's own imports
        w.call("audit.arm")
        assert call(w, "subprocess.getoutput", "echo ran") == "ran"
        assert any(event.startswith("subprocess.Popen") for event in w.call("audit.events"))
