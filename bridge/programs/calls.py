"""Generic calls by reference: any public callable under an allowed module prefix, or a ref's method.

The allow-list (``--allow-module``, default ``dspy``) is the whole policy, so
resolution is strict: no path segment may start with ``_`` (``__class__``,
``__builtins__``, ``_private``), and every object reached beyond the allowed
prefix must itself live under an allowed prefix (a module by its name, anything
else by ``__module__``), so ``dspy.<module>.os.system`` — a module DSPy merely
imported — is refused too.

Values cross as plain data when msgpack can carry them; a Prediction or Example
becomes the map of its fields; anything else stays in the session and crosses
as ``{"__ref__": ID, "type": "module.Class"}``, which the host may pass back in
arguments at any depth.
"""

from __future__ import annotations

import importlib
import re
import types
from typing import Any, Callable

from bridge.programs.program import Program
from bridge.wire.errors import ErrorType, PeerError
from bridge.worker.context import Context

REF = "__ref__"
_GENERATED = re.compile(r"r\d+")  # the form of the refs SessionStore.store hands out


def forbidden(target: str, allowed: tuple[str, ...], why: str) -> PeerError:
    return PeerError("forbidden", f"cannot call {target!r}: {why}", {"target": target, "allowed": list(allowed)})


def under(name: str | None, allowed: tuple[str, ...]) -> bool:
    return name is not None and any(name == prefix or name.startswith(prefix + ".") for prefix in allowed)


def _home(obj: Any) -> str | None:
    """Where ``obj`` comes from: a module's name; a class's, function's or instance's ``__module__``."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    home = getattr(obj, "__module__", None)
    return home if isinstance(home, str) else None


def _segments(path: Any, target: str, allowed: tuple[str, ...]) -> list[str]:
    if not isinstance(path, str) or not path:
        raise PeerError(ErrorType.BAD_REQUEST, "a call target is a dotted path like 'dspy.Predict'")
    segments = path.split(".")
    if any(not segment.isidentifier() or segment.startswith("_") for segment in segments):
        raise forbidden(target, allowed, "private, dunder or malformed path segment")
    return segments


def _walk(obj: Any, segments: list[str], checked_from: int, target: str, allowed: tuple[str, ...]) -> Any:
    """Follow ``segments`` from ``obj``; objects from index ``checked_from`` on must live under ``allowed``."""
    for i, segment in enumerate(segments):
        try:
            obj = getattr(obj, segment)
        except AttributeError:
            submodule = f"{obj.__name__}.{segment}" if isinstance(obj, types.ModuleType) else None
            if not under(submodule, allowed):
                raise PeerError(ErrorType.BAD_REQUEST, f"{target!r}: no attribute {segment!r}") from None
            try:
                obj = importlib.import_module(submodule)
            except ImportError:
                raise PeerError(ErrorType.BAD_REQUEST, f"{target!r}: no attribute {segment!r}") from None
        if i >= checked_from and not under(_home(obj), allowed):
            raise forbidden(target, allowed, f"its part {segment!r} comes from {_home(obj)!r}")
    return obj


def resolve_target(target: Any, ctx: Context, allowed: tuple[str, ...]) -> Callable[..., Any]:
    """``"dspy.Predict"`` or ``{"ref": ID, "method"?: "forward"}`` as the callable it names."""
    if isinstance(target, dict) and "ref" in target and set(target) <= {"ref", "method"}:
        obj = unwrap(ctx.session.get(target["ref"]))
        method = target.get("method")
        if method is not None:
            obj = _walk(obj, _segments(method, str(method), allowed), 0, str(method), allowed)
    elif isinstance(target, str):
        segments = _segments(target, target, allowed)
        prefix = next((p for p in allowed if target == p or target.startswith(p + ".")), None)
        if prefix is None:
            raise forbidden(target, allowed, "not under an allowed module prefix (--allow-module)")
        try:
            root = importlib.import_module(segments[0])
        except ImportError:
            raise PeerError(ErrorType.BAD_REQUEST, f"{target!r}: cannot import {segments[0]!r}") from None
        obj = _walk(root, segments[1:], prefix.count("."), target, allowed)
    else:
        raise PeerError(ErrorType.BAD_REQUEST, "'target' must be a dotted path or {ref, method?}")
    if not callable(obj):
        raise PeerError(ErrorType.BAD_REQUEST, f"{target!r} is not callable")
    return obj


def unwrap(obj: Any) -> Any:
    """A program made by ``program.create`` or ``dspy.optimize`` is called as its DSPy module."""
    return obj.module if isinstance(obj, Program) else obj


def resolve_args(value: Any, ctx: Context) -> Any:
    """``value`` with every ``{"__ref__": ID}`` replaced by the session's object; ``unknown_ref`` otherwise."""
    if isinstance(value, dict):
        if REF in value and set(value) <= {REF, "type"}:
            return unwrap(ctx.session.get(value[REF]))
        return {key: resolve_args(item, ctx) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_args(item, ctx) for item in value]
    return value


def encode(value: Any, keep: Callable[[Any], dict[str, str]]) -> Any:
    """``value`` as msgpack can carry it; what it cannot becomes a ref (``keep``)."""
    import dspy

    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, dspy.Example):  # and so Prediction
        return {key: encode(item, keep) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(item, keep) for item in value]
    if isinstance(value, dict) and all(isinstance(key, (str, int)) for key in value):
        return {key: encode(item, keep) for key, item in value.items()}
    return keep(value)


def keeper(ctx: Context, name: str | None = None) -> Callable[[Any], dict[str, str]]:
    """Stores an object in the request's session, as ``name`` if given; returns its ref map."""
    store = ctx.shared.sessions

    def keep(value: Any) -> dict[str, str]:
        session = ctx.session
        if name is not None and name in session.objects:
            session.objects[name] = value
            ref = name
        else:
            ref = store.store(session, value)
            if name is not None:
                session.objects[name] = session.objects.pop(ref)
                ref = name
        return {REF: ref, "type": f"{type(value).__module__}.{type(value).__qualname__}"}

    return keep


def check_name(name: Any) -> str | None:
    if name is not None and (not isinstance(name, str) or not name or _GENERATED.fullmatch(name)):
        raise PeerError(ErrorType.BAD_REQUEST, "'store_as' must be a non-empty name not of the form r<digits> "
                        "(those are the refs the worker hands out)")
    return name
