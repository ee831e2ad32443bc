"""Child processes: none outlives the worker, and adopted orphans are reaped without stealing exit statuses.

On Linux the worker is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``):
a process that a handler's child leaves behind (a double fork, a daemon)
re-parents to the worker instead of to init, so the worker can still find and
end it.  At exit, ``kill_descendants`` walks the process tree from ``/proc``
and stops, then kills, what it finds, in rounds until nothing is left: a
process killed in one round hands its children to the worker, and the next
round finds them.

Adopted orphans that exit become the worker's zombies, so they must be reaped.
``waitpid(-1)`` would also reap the children that user code started and is
about to wait for (``subprocess``), which would then see no exit status.  So
the worker records every pid that code in it creates (``os.fork``,
``os.posix_spawn[p]``, ``os.forkpty``, ``_posixsubprocess.fork_exec``, which
``subprocess`` uses), and ``reap_adopted`` only waits for zombie children it
did not create.  A process forked by C code that bypasses these calls (uvloop's
``subprocess`` goes through libuv) looks adopted, so a zombie is reaped only when
the previous pass, a second earlier, saw it too: its creator's own wait (libuv
reaps on ``SIGCHLD``, within a pass of its loop) comes first.
"""

from __future__ import annotations

import _posixsubprocess
import ctypes
import functools
import os
import signal
import sys
import threading
from typing import Any, Callable

PR_SET_CHILD_SUBREAPER = 36
KILL_ROUNDS = 20  # bounds both the stop walks and the kill rounds

_created: set[int] = set()  # pids the worker's own code created, still its children
_lock = threading.Lock()  # held across a spawn, so a reap pass never sees a created pid unrecorded
_tracking = False
_zombies: set[int] = set()  # adopted zombies the last pass saw: reaped if this one sees them again
passes = 0  # reap passes so far (tests wait on it)


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux only); True if it worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def track_spawns() -> None:
    """Record the pid of every process created from Python in this worker (see the module doc)."""
    global _tracking
    for module, name in ((os, "fork"), (os, "forkpty"), (os, "posix_spawn"), (os, "posix_spawnp"),
                         (_posixsubprocess, "fork_exec")):
        if hasattr(module, name):
            setattr(module, name, _recording(getattr(module, name)))
    _tracking = True


def _recording(spawn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(spawn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _lock:  # a forked child continues here too, and releases its copy of the lock
            result = spawn(*args, **kwargs)
            pid = result[0] if isinstance(result, tuple) else result  # forkpty: (pid, fd)
            if pid:  # 0 in a forked child
                _created.add(pid)
        return result

    return wrapper


def reap_adopted() -> list[int]:
    """Reap zombie children the worker did not create (adopted orphans) that the previous pass saw
    as zombies already; returns their pids.  Never ``waitpid(-1)``: user code waiting for its own
    children keeps their statuses."""
    global passes, _zombies
    if not _tracking:
        return []
    if not _lock.acquire(blocking=False):
        return []  # a spawn is under way (a fork can take milliseconds): the loop does not wait, next pass
    try:
        passes += 1
        children = set(children_of(os.getpid()))
        _created.intersection_update(children)  # the rest were reaped by whoever created them
        adopted = children - _created
    finally:
        _lock.release()
    zombies = {pid for pid in adopted if _state(pid) == "Z"}  # a zombie's pid cannot be reused
    reaped = []
    for pid in zombies & _zombies:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped.append(pid)
        except ChildProcessError:
            pass
    _zombies = zombies.difference(reaped)
    return reaped


def children_of(pid: int) -> list[int]:
    """The children of every thread of ``pid``; threads or processes that end meanwhile are skipped."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
        except (OSError, ValueError):
            continue  # that thread ended during the walk: its children moved to another
    return kids


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _live_descendants(root: int) -> list[int]:
    found, stack = [], children_of(root)
    while stack:
        pid = stack.pop()
        if _state(pid) in (None, "Z", "X"):
            continue  # gone or dead: nothing to kill, no children left
        found.append(pid)
        stack.extend(children_of(pid))
    return found


def kill_descendants() -> None:
    """Kill every live process below this one.  Each round first stops all it finds, walking
    again until no new one appears (a stopped process cannot fork), then kills them; the next
    round finds what they handed to the worker, until none is left."""
    me = os.getpid()
    for _ in range(KILL_ROUNDS):
        stopped: set[int] = set()
        for _ in range(KILL_ROUNDS):
            fresh = [pid for pid in _live_descendants(me) if pid not in stopped]
            if not fresh:
                break
            for pid in fresh:
                _signal(pid, signal.SIGSTOP)
                stopped.add(pid)
        if not stopped:
            return
        for pid in stopped:
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # already gone
