"""Paths a host names, confined to the directories the operator allowed, and bounded file reads.

A host path (``replay/<path>``, ``save``/``load`` through a ref) is used only when its
``realpath`` lies inside an ``--allow-path`` directory: none by default.  A file read
for the host must be a regular file of at most ``--max-file-bytes``; it is opened
non-blocking (a FIFO cannot stall the open) and checked on the open descriptor, so
a file swapped after the check is still the one checked.  The reads block, so
callers run them in a worker thread, never on the event loop.

The policy is process-wide (``configure``, once at start-up), like the offline LM
engines: the code that reads files on the host's behalf runs deep inside DSPy
calls, which get no request context.
"""

from __future__ import annotations

import os
import stat
from typing import Any, NamedTuple

from bridge.wire.errors import ErrorType, PeerError
from bridge.wire.protocol import quote

MAX_FILE_BYTES = 64 * 1024 * 1024


class Confinement(NamedTuple):
    """The directories (real paths) host paths must lie in, and the largest file read for a host."""

    dirs: tuple[str, ...] = ()
    max_bytes: int = MAX_FILE_BYTES


_policy = Confinement()


def configure(dirs: tuple[str, ...] | list[str], max_bytes: int = MAX_FILE_BYTES) -> Confinement:
    """Set the process's policy from ``--allow-path`` and ``--max-file-bytes``."""
    global _policy
    _policy = Confinement(tuple(os.path.realpath(d) for d in dirs), max_bytes)
    return _policy


def policy() -> Confinement:
    return _policy


def forbidden(path: str, reason: str) -> PeerError:
    return PeerError(ErrorType.FORBIDDEN, f"path {quote(path)}: {reason}", {"path": path, "reason": reason})


def confine(path: Any) -> str:
    """The real path of ``path`` when it lies inside an allowed directory; ``forbidden`` otherwise."""
    if not isinstance(path, (str, os.PathLike)) or not str(path) or "\0" in str(path):
        raise PeerError(ErrorType.BAD_REQUEST, f"a path must be a non-empty string, not {quote(path)}")
    path = str(path)
    real = os.path.realpath(path)
    dirs = _policy.dirs
    if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in dirs):
        reason = ("outside the --allow-path directories" if dirs
                  else "no directory is allowed (start the worker with --allow-path DIR)")
        raise forbidden(path, reason)
    return real


def confine_new(path: Any) -> str:
    """``confine`` for a file about to be written: it may not exist yet, but if it does it is a
    regular file (not a FIFO or a device)."""
    real = confine(path)
    if os.path.lexists(real) and not os.path.isfile(real):
        raise forbidden(str(path), "not a regular file")
    return real


def read_file(path: Any) -> bytes:
    """The bytes of a confined regular file of at most ``max_bytes``.  Blocks: call it in a thread."""
    real, limit = confine(path), _policy.max_bytes
    try:
        _regular(path, os.stat(real))  # not even opened otherwise: opening a FIFO wakes its writer
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PeerError(ErrorType.BAD_REQUEST, f"cannot read {quote(str(path))}: {exc.strerror}",
                        {"path": str(path)}) from None
    with os.fdopen(fd, "rb") as file:
        info = _regular(path, os.fstat(fd))  # the file opened is the file checked
        if info.st_size > limit:
            raise too_large(str(path), info.st_size, limit)
        data = file.read(limit + 1)  # the file may have grown since fstat
    if len(data) > limit:
        raise too_large(str(path), len(data), limit)
    return data


def _regular(path: Any, info: os.stat_result) -> os.stat_result:
    if not stat.S_ISREG(info.st_mode):
        raise forbidden(str(path), "not a regular file")
    return info


def too_large(path: str, size: int, limit: int) -> PeerError:
    return PeerError(ErrorType.BAD_REQUEST, f"{quote(path)} is over --max-file-bytes={limit}",
                     {"path": path, "size": size, "limit": limit})
