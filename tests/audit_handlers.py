"""An audit hook in the worker under test (``--handlers tests.audit_handlers``): what ran that should not have.

``sys.addaudithook`` sees what Python code cannot hide: ``exec``/``eval`` of code,
imports of modules not loaded yet, processes, pickles, ``input()``, sockets, and
files opened for writing, or for reading outside the Python installation (but
Python sources: a traceback reads them).  ``audit.arm``
starts recording (after the warm-up's own imports); ``audit.events`` returns what
was recorded, at most ``LIMIT`` events.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from bridge import handler

LIMIT = 100
WATCHED = ("exec", "import", "os.system", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen",
           "pickle.find_class", "marshal.loads", "builtins.input", "ctypes.dlopen", "socket.connect")
_PYTHON = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT
_OWN_PROC = (f"/proc/{os.getpid()}/", "/proc/self/")  # the worker's reaper reads its own children there
_events: list[str] = []
_armed = False


def _suspicious_open(args: tuple[Any, ...]) -> bool:
    path, mode, flags = (list(args) + [None, None, None])[:3]
    writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE)
    outside = isinstance(path, str) and not os.path.realpath(path).startswith(_PYTHON) \
        and not path.startswith(_OWN_PROC) and not path.endswith(".py")  # source lines for a traceback
    return bool(writes or outside)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _armed or len(_events) >= LIMIT:
        return
    if event in WATCHED or event.startswith("os.exec") or (event == "open" and _suspicious_open(args)):
        _events.append(f"{event}: {repr(args)[:200]}")


sys.addaudithook(_hook)


@handler("audit.arm", inline=True)
def arm(args: dict, ctx: Any) -> dict:
    global _armed
    _events.clear()
    _armed = True
    return {"armed": True}


@handler("audit.events", inline=True)
def events(args: dict, ctx: Any) -> list[str]:
    return list(_events)
