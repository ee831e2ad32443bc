"""What ``call`` may reach: an explicit table of callables, a few methods on refs, and what the operator adds.

The table (``DEFAULT_NAMES``, written out in ``docs/security.md``) holds DSPy's
prediction modules, optimizers, ``Example``/``Prediction`` and three metrics:
nothing that executes code, imports modules, reads pickles or walks attributes
by name.  A target string must be exactly a name of the table, an ``--allow``
name, or lie under an ``--allow-module`` prefix (the operator's wider grant,
walked segment by segment, each object reached checked to come from the prefix).

A ref is checked every time it is called: its object must be an instance of an
allowed class (or itself an allowed callable), and its method one of
``REF_METHODS`` defined on the class, not an attribute set on the instance.
Dunder and private names are never reachable.  Arguments that would read
pickles, import LM classes or ask the terminal are refused; paths go through
``worker.paths``.  A callable, class or module that a call returns is kept as a
ref only when it is itself allowed (``may_keep``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from typing import Any, Callable

from bridge.wire.errors import ErrorType, PeerError
from bridge.wire.protocol import quote
from bridge.worker import paths

DEFAULT_NAMES = (
    # prediction modules
    "dspy.Predict", "dspy.ChainOfThought", "dspy.ReAct", "dspy.MultiChainComparison", "dspy.BestOfN", "dspy.Refine",
    # optimizers
    "dspy.LabeledFewShot", "dspy.BootstrapFewShot", "dspy.BootstrapFewShotWithRandomSearch", "dspy.BootstrapRS",
    "dspy.MIPROv2", "dspy.COPRO", "dspy.SIMBA", "dspy.Ensemble", "dspy.InferRules",
    # data and metrics
    "dspy.Example", "dspy.Prediction",
    "dspy.evaluate.metrics.EM", "dspy.evaluate.answer_exact_match", "dspy.evaluate.answer_passage_match",
)
REF_METHODS = frozenset({"forward", "acall", "dump_state", "load_state", "named_predictors", "deepcopy",
                         "reset_copy", "compile", "save", "load"})
REFUSED_FLAGS = ("allow_pickle", "save_program", "modules_to_serialize", "allow_unsafe_lm_state",
                 "requires_permission_to_run")  # pickles, custom LM classes, input() on the frame pipe
PATH_KEYWORDS = ("path", "log_dir", "save_as_csv", "save_as_json")  # the last two: --allow dspy.Evaluate


def forbidden(target: Any, reason: str) -> PeerError:
    shown = target if isinstance(target, str) else quote(target)
    return PeerError(ErrorType.FORBIDDEN, f"cannot call {quote(target)}: {reason}", {"target": shown, "reason": reason})


def under(name: str | None, prefixes: tuple[str, ...]) -> bool:
    return name is not None and any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def home(obj: Any) -> str | None:
    """Where ``obj`` comes from: a module's name; a class's, function's or instance's ``__module__``."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    found = getattr(obj, "__module__", None)
    return found if isinstance(found, str) else None


def _segments(path: Any, target: Any) -> list[str]:
    if not isinstance(path, str) or not path:
        raise PeerError(ErrorType.BAD_REQUEST, "a call target is a dotted path like 'dspy.Predict'")
    segments = path.split(".")
    if any(not segment.isidentifier() or segment.startswith("_") for segment in segments):
        raise forbidden(target, "private, dunder or malformed path segment")
    return segments


class Policy:
    """The allow-list of one worker: table names plus ``--allow`` names, ``--allow-module`` prefixes."""

    def __init__(self, modules: tuple[str, ...] = (), names: tuple[str, ...] = (), max_threads: int = 32) -> None:
        self.modules = tuple(modules)
        self.names = tuple(sorted(set(DEFAULT_NAMES) | set(names)))
        self.max_threads = max_threads
        self._resolved: dict[str, Any] | None = None
        self._ids: dict[int, Any] = {}  # id -> object of every resolved name (kept alive by ``_resolved``)

    def describe(self) -> dict[str, list[str]]:
        return {"modules": list(self.modules), "names": list(self.names), "paths": list(paths.policy().dirs)}

    # ---- what is allowed -----------------------------------------------------------

    def resolved(self) -> dict[str, Any]:
        """The table's names as objects, resolved once (after DSPy's import): no host input is involved."""
        if self._resolved is None:
            found = {}
            for name in self.names:
                try:
                    found[name] = _lookup(name)
                except (ImportError, AttributeError):
                    continue  # a name this DSPy lacks: nothing to allow
            self._ids = {id(obj): obj for obj in found.values()}
            self._resolved = found
        return self._resolved

    def allowed_object(self, obj: Any) -> bool:
        """A callable, class or module the table names, or one from under an ``--allow-module`` prefix."""
        self.resolved()
        return self._ids.get(id(obj)) is obj or under(home(obj), self.modules)

    def allowed_instance(self, obj: Any) -> bool:
        """An object of an allowed class (its exact class: a subclass may add what the class lacks)."""
        return not isinstance(obj, (type, types.ModuleType)) and self.allowed_object(type(obj))

    def may_keep(self, value: Any) -> bool:
        """May a call's result be kept as a ref?  Data, yes; a callable, class or module only if allowed."""
        if not (callable(value) or isinstance(value, (type, types.ModuleType))):
            return True
        return self.allowed_object(value) or self.allowed_instance(value)

    # ---- targets -------------------------------------------------------------------

    def target(self, target: str) -> Callable[..., Any]:
        """A dotted target: a table or ``--allow`` name, or a public callable under a prefix."""
        segments = _segments(target, target)
        if target in self.names:
            obj = self.resolved().get(target)
            if obj is None:
                raise PeerError(ErrorType.BAD_REQUEST, f"{quote(target)} does not exist in this DSPy")
            return obj
        prefix = next((p for p in self.modules if under(target, (p,))), None)
        if prefix is None:
            raise forbidden(target, "not in the allow-list (see stats.allow; --allow NAME adds one)")
        try:
            root = importlib.import_module(segments[0])
        except ImportError:
            raise PeerError(ErrorType.BAD_REQUEST, f"{quote(target)}: cannot import {quote(segments[0])}") from None
        return self._walk(root, segments[1:], prefix.count("."), target)

    def _walk(self, obj: Any, segments: list[str], checked_from: int, target: str) -> Any:
        """Follow ``segments`` from ``obj``; objects from index ``checked_from`` on must come from a prefix."""
        for i, segment in enumerate(segments):
            try:
                obj = inspect.getattr_static(obj, segment)
            except AttributeError:
                submodule = f"{obj.__name__}.{segment}" if isinstance(obj, types.ModuleType) else None
                if not under(submodule, self.modules):
                    raise PeerError(ErrorType.BAD_REQUEST, f"{quote(target)}: no attribute {quote(segment)}") from None
                try:
                    obj = importlib.import_module(submodule)
                except ImportError:
                    raise PeerError(ErrorType.BAD_REQUEST, f"{quote(target)}: no attribute {quote(segment)}") from None
            if isinstance(obj, (staticmethod, classmethod)):
                obj = obj.__func__
            if i >= checked_from and not under(home(obj), self.modules):
                raise forbidden(target, f"its part {quote(segment)} comes from {quote(home(obj))}")
        return obj

    def method(self, obj: Any, method: Any, target: Any) -> Callable[..., Any]:
        """``obj`` (a ref's object) called as itself or through one method: both checked now."""
        if not (self.allowed_instance(obj) or self.allowed_object(obj)):
            raise forbidden(target, f"the ref holds a {quote(type(obj).__qualname__)}, which is not allowed")
        if method is None:
            return obj
        if not isinstance(method, str) or not method.isidentifier() or method.startswith("_"):
            raise forbidden(target, "a method is one public name, e.g. 'forward'")
        name = method
        cls = type(obj)
        defined = inspect.getattr_static(cls, name, None)
        if not isinstance(defined, types.FunctionType) or name in getattr(obj, "__dict__", {}):
            raise forbidden(target, f"{quote(name)} is not a method of {quote(cls.__qualname__)}")
        if name not in REF_METHODS and not under(home(defined), self.modules):
            raise forbidden(target, f"method {quote(name)} is not allowed on refs (allowed: {sorted(REF_METHODS)})")
        if name == "load":
            return functools.partial(_load_json, obj)
        return getattr(obj, name)

    # ---- arguments -----------------------------------------------------------------

    def arguments(self, target: Any, method: Any, args: list[Any],
                  kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Refuse flags that read pickles or import code; confine paths (a ref's ``save``/``load``
        takes its path first); bound ``num_threads`` by ``--max-threads``."""
        threads = kwargs.get("num_threads")
        if isinstance(threads, int) and threads > self.max_threads:
            raise PeerError(ErrorType.BAD_REQUEST, f"'num_threads' must be at most --max-threads={self.max_threads}")
        kwargs = checked_keywords(target, kwargs, method)
        if method in ("save", "load") and args:
            args = [_path(args[0], method), *args[1:]]
        return args, kwargs


def checked_keywords(target: Any, kwargs: dict[str, Any], method: Any = None) -> dict[str, Any]:
    """Keyword arguments for DSPy from a host (``call``, ``dspy.optimize`` params): flags that read
    pickles or run code refused, paths (``PATH_KEYWORDS``) confined to ``--allow-path``."""
    for flag in REFUSED_FLAGS:
        if kwargs.get(flag):
            raise forbidden(target, f"'{flag}' is never allowed: it would read pickles or run code")
    return {k: (_path(v, k if k == "log_dir" else method) if k in PATH_KEYWORDS else v) for k, v in kwargs.items()}


@functools.lru_cache(maxsize=8)
def policy(modules: tuple[str, ...], names: tuple[str, ...], max_threads: int) -> Policy:
    """The policy of a worker's options, built once."""
    return Policy(modules, names, max_threads)


def of(config: Any) -> Policy:
    """The policy of a ``server.Config``."""
    return policy(config.allow_modules, config.allow_names, config.max_threads)


def _lookup(name: str) -> Any:
    """An operator's or the table's dotted name as its object (importing its root module)."""
    first, *rest = name.split(".")
    obj: Any = importlib.import_module(first)
    for segment in rest:
        try:
            obj = getattr(obj, segment)
        except AttributeError:
            obj = importlib.import_module(f"{obj.__name__}.{segment}")
    return obj


def _path(value: Any, method: Any) -> str:
    """A confined real path (a directory for ``log_dir``); a ref's ``save``/``load`` only of ``.json``."""
    real = paths.confine(value) if method in ("load", "log_dir") else paths.confine_new(value)
    if method in ("save", "load") and not real.endswith(".json"):
        raise paths.forbidden(str(value), "save and load take .json files only (a pickle would run code)")
    return real


def _load_json(module: Any, path: str) -> None:
    """``module.load(path)`` read through ``worker.paths`` (a regular file, bounded) and restored
    with ``load_state``, so DSPy never opens a host path itself."""
    import json  # only for load(path): kept off the start-up

    try:
        state = json.loads(paths.read_file(path))
    except ValueError as exc:
        raise PeerError(ErrorType.BAD_REQUEST, f"{quote(path)} is not JSON: {exc}") from None
    module.load_state(state)
