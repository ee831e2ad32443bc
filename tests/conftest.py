import itertools
import os
import sys
import tempfile
from pathlib import Path

import pytest

from bridge import RemoteError, Worker

ROOT = Path(__file__).resolve().parent.parent
TEST_HANDLERS = "tests.handlers_for_tests"


def spawn(*args: str, **kwargs) -> Worker:
    """A worker with the diagnostics and the misbehaving test handlers, run from the repo root."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return Worker([sys.executable, "-m", "bridge", "serve", "--diagnostics", "--handlers", TEST_HANDLERS, *args],
                  env=env, **kwargs)


@pytest.fixture
def worker():
    w = spawn()
    yield w
    if w.proc.poll() is None:
        w.kill()


_session_ids = itertools.count(1)


def new_session_id() -> str:
    """A session id no other test uses."""
    return f"s{next(_session_ids)}"


@pytest.fixture(scope="module")
def w(request):
    """One worker per test module, its stderr (DSPy's tqdm bars and prints) in a temporary file.

    The module's ``HOST_TOOLS`` (name -> function), if any, answer its host tool calls.
    """
    with tempfile.TemporaryFile("w+") as log, spawn(stderr=log, tools=getattr(request.module, "HOST_TOOLS", None)) as worker:
        yield worker


@pytest.fixture
def session(w, request) -> str:
    """A fresh session of ``w`` whose LM is the scripted engine ``MODEL`` playing the module's ``SCRIPT``."""
    sid = new_session_id()
    w.call("lm.configure", {"model": request.module.MODEL, "script": request.module.SCRIPT}, session_id=sid)
    return sid


@pytest.fixture
def clean_stream(w):
    """After the test: every frame decoded and was routed to its call (nothing stray reached stdout)."""
    yield
    assert w.unrouted.empty(), w.unrouted.get()


def streamed(w: Worker, session: str, command: str, args: dict) -> tuple[list, object]:
    """Every chunk's data of one request, and its result."""
    call = w.request(command, args, session_id=session)
    return list(call), call.result()


def error_of(w: Worker, session: str, command: str, args: dict) -> RemoteError:
    """The error a request ends with (fails the test if it succeeds)."""
    with pytest.raises(RemoteError) as info:
        w.call(command, args, session_id=session)
    return info.value
