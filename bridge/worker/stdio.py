"""Process-level plumbing for the worker: stdout protection, logging, and a clean exit.

On the host, one stray byte on the frame stream is read as a length, and the
port hangs.  So before anything that could print is imported, the real stdout
is kept for frames only and fd 1 and ``sys.stdout`` are pointed at stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

from bridge.wire.redact import redact
from bridge.worker import children


def claim_stdout() -> int:
    """Return a private descriptor on the real stdout; fd 1 and ``sys.stdout`` now go to stderr."""
    proto = os.dup(1)
    divert_stdout()
    return proto


def divert_stdout() -> None:
    """With ``--fds``, frames use other descriptors; fd 1 still must never see a stray print."""
    os.dup2(2, 1)
    sys.stderr = sys.stdout = RedactingStream(sys.stderr)


class RedactingStream:
    """``sys.stderr`` (and ``sys.stdout``) through ``redact``: log lines, prints and progress bars.
    Bytes written straight to fd 2 by native code do not pass here."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(redact(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format=f"bridge[{os.getpid()}] %(levelname)s %(name)s: %(message)s")


def report_fatal_signals() -> None:
    """On SIGSEGV, SIGABRT, SIGBUS, SIGFPE or SIGILL (a native library's crash), write every
    thread's Python stack to stderr before dying: file, line and function names, no values."""
    import faulthandler

    faulthandler.enable(file=sys.__stderr__, all_threads=True)


def hard_exit(code: int) -> None:
    """Exit now, without joining abandoned handler threads (they may be blocked forever)."""
    children.kill_descendants()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
