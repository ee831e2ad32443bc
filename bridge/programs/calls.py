"""Generic calls by reference: an allow-listed callable, or an allowed method of a ref.

What may be called is ``programs.allowlist``'s policy (``docs/security.md``); this
module resolves targets and refs through it and converts values.

Values cross as plain data when msgpack can carry them; a Prediction or Example
becomes the map of its fields; anything else stays in the session and crosses
as ``{"__ref__": ID, "type": "module.Class"}``, which the host may pass back in
arguments at any depth.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from bridge.programs.allowlist import Policy, forbidden
from bridge.programs.program import Program
from bridge.wire.errors import ErrorType, PeerError
from bridge.wire.protocol import quote
from bridge.worker.context import Context

REF = "__ref__"
_GENERATED = re.compile(r"r\d+")  # the form of the refs SessionStore.store hands out


def resolve_target(target: Any, ctx: Context, policy: Policy) -> tuple[Callable[..., Any], Any]:
    """``"dspy.Predict"`` or ``{"ref": ID, "method"?: "forward"}`` as the callable it names, checked
    against ``policy`` (``programs.allowlist``); also the method name (None for a target string)."""
    if isinstance(target, dict) and "ref" in target and set(target) <= {"ref", "method"}:
        method = target.get("method")
        obj = policy.method(unwrap(ctx.session.get(target["ref"])), method, target)
    elif isinstance(target, str):
        method, obj = None, policy.target(target)
    else:
        raise PeerError(ErrorType.BAD_REQUEST, "'target' must be a dotted path or {ref, method?}")
    if not callable(obj):
        raise PeerError(ErrorType.BAD_REQUEST, f"{quote(target)} is not callable")
    return obj, method


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


def keeper(ctx: Context, policy: Policy, name: str | None = None) -> Callable[[Any], dict[str, str]]:
    """Stores an object in the request's session, as ``name`` if given; returns its ref map.
    A callable, class or module the policy does not allow is refused, not kept."""
    store = ctx.shared.sessions

    def keep(value: Any) -> dict[str, str]:
        if not policy.may_keep(value):
            raise forbidden(f"{type(value).__module__}.{type(value).__qualname__}",
                            "the call returned a callable that is not allowed, so it is not kept as a ref")
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
