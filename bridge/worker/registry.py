"""The handler registry: command name -> callable, classified once at registration.

Users write ``@handler("name")`` on a plain function, a coroutine function, or a
generator of either kind.  Classifying at import time keeps dispatch a dict
lookup plus one branch.
"""

from __future__ import annotations

import enum
import importlib
import inspect
from typing import Any, Callable, NamedTuple


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
        self._entries: dict[str, Entry] = {}
        self.warmups: list[Callable[[], None]] = []

    def add(self, name: str, fn: Callable[..., Any], *, inline: bool = False,
            needs_dspy: bool = False) -> Entry:
        entry = Entry(name, fn, classify(fn, inline), needs_dspy)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def warmup(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Run ``fn`` in a thread right after ``ready``; ``needs_dspy`` requests wait for it."""
        if fn not in self.warmups:
            self.warmups.append(fn)
        return fn

    def load(self, module: str) -> None:
        """Import a handler module; its ``@handler`` decorators register into this registry."""
        importlib.import_module(module)


REGISTRY = Registry()


def handler(name: str, *, inline: bool = False, needs_dspy: bool = False) -> Callable:
    """Register ``fn(args: dict, ctx)`` as the handler of command ``name``.

    ``inline=True`` is for light, non-blocking plain functions (microseconds):
    the reader runs them directly, with no task and no thread.  ``needs_dspy``
    makes the request wait for the background DSPy import first.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY.add(name, fn, inline=inline, needs_dspy=needs_dspy)
        return fn

    return register
