import os
import sys
from pathlib import Path

import pytest

from bridge.client import Worker

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
