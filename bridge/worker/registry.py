"""The handler registry: command name -> callable, classified once at registration.

Users write ``@handler("name")`` on a plain function, a coroutine function, or a
generator of either kind.  Classifying at import time keeps dispatch a dict
lookup plus one branch.
"""

from __future__ import annotations

import enum
import importlib
import inspect
from typing import Any, Callable, Iterable, NamedTuple


class Kind(enum.Enum):
    SYNC = "sync"              # runs in a worker thread; return value is the result
    ASYNC = "async"            # runs on the loop; return value is the result
    SYNC_GEN = "sync_gen"      # runs in a worker thread; yields chunks
    ASYNC_GEN = "async_gen"    # runs on the loop; yields chunks
    INLINE = "inline"          # light sync function run directly by the reader


class Entry(NamedTuple):
    name: str
    fn: Callable[..., Any]
    kind: Kind
    needs_dspy: bool = False
    args: frozenset[str] | None = None  # the arguments it takes; None: any (free-form)
    opens_session: bool = False  # starts an ended (expired or closed) session afresh instead of failing

    def unknown_argument(self, args: dict) -> dict | None:
        """``details`` of the first argument this command does not take, or None when all are known.

        One check for every command, before it runs: a misspelt argument is an error, never
        silently ignored (``sleep {"ms": 200}`` would sleep 0 s)."""
        known = self.args
        if known is None or not args:
            return None
        for name in args:
            if name not in known:
                return unknown_argument_details(name, known)
        return None


def unknown_argument_details(name: Any, known: Iterable[str]) -> dict:
    """``{argument, did_you_mean?, known}`` for an argument not in ``known``."""
    import difflib  # only on this error path: kept off the start-up

    known = sorted(known)
    details: dict[str, Any] = {"argument": name}
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) if isinstance(name, str) else []
    if close:
        details["did_you_mean"] = close[0]
    details["known"] = known
    return details


def classify(fn: Callable[..., Any], inline: bool = False) -> Kind:
    """Decide how a handler is driven, from what kind of callable it is."""
    if inspect.isasyncgenfunction(fn):
        kind = Kind.ASYNC_GEN
    elif inspect.iscoroutinefunction(fn):
        kind = Kind.ASYNC
    elif inspect.isgeneratorfunction(fn):
        kind = Kind.SYNC_GEN
    else:
        kind = Kind.SYNC
    if inline:
        if kind is not Kind.SYNC:
            raise TypeError(f"inline handler {fn.__qualname__} must be a plain function")
        return Kind.INLINE
    return kind


class Registry:
    """Command name -> ``Entry``.  One process-wide instance, ``REGISTRY``."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}  # read by the server's dispatch; change it through ``add``
        self.warmups: list[Callable[[], None]] = []

    def add(self, name: str, fn: Callable[..., Any], *, inline: bool = False,
            needs_dspy: bool = False, args: Iterable[str] | None = None, opens_session: bool = False) -> Entry:
        entry = Entry(name, fn, classify(fn, inline), needs_dspy, None if args is None else frozenset(args),
                      opens_session)
        self.entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self.entries)

    def warmup(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Run ``fn`` in a thread right after ``ready``; ``needs_dspy`` requests wait for it."""
        if fn not in self.warmups:
            self.warmups.append(fn)
        return fn

    def load(self, module: str) -> None:
        """Import a handler module; its ``@handler`` decorators register into this registry."""
        importlib.import_module(module)


REGISTRY = Registry()


def handler(name: str, *, inline: bool = False, needs_dspy: bool = False,
            args: Iterable[str] | None = None, opens_session: bool = False) -> Callable:
    """Register ``fn(args: dict, ctx)`` as the handler of command ``name``.

    ``inline=True`` is for light, non-blocking plain functions (microseconds):
    the reader runs them directly, with no task and no thread, and their ``ctx``
    is a ``RequestView`` (no chunks, no tool calls).  ``needs_dspy``
    makes the request wait for the background DSPy import first.  ``args``
    names every argument the command takes (``()`` for none): any other is
    refused with ``bad_request`` before the handler runs.  Without it the
    arguments are free-form.  ``opens_session`` marks a command that sets a session
    up (``lm.configure``): in a session that expired or was closed it starts
    the session afresh, where other commands get ``unknown_session`` once.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY.add(name, fn, inline=inline, needs_dspy=needs_dspy, args=args, opens_session=opens_session)
        return fn

    return register
