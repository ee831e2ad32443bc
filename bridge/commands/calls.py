"""``call`` and ``release``: allow-listed callables and refs' methods, by reference.

The policy is ``programs.allowlist``, the value conversions ``programs.calls``; this module only
runs the call in a worker thread, inside ``dspy.context(lm=<session LM>)`` when
the session has one.  A cancel abandons the thread, which stops at the next DSPy
module or LM call it starts (``Checkpoints``); other code runs on to its end.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, ContextManager

from bridge.programs import allowlist
from bridge.programs.calls import check_name, encode, keeper, resolve_args, resolve_target
from bridge.programs.runner import reported
from bridge.wire.errors import ErrorType, PeerError
from bridge.worker.context import Context
from bridge.worker.registry import handler


def lm_context(lm: Any) -> ContextManager[Any]:
    import dspy

    return dspy.context(lm=lm) if lm is not None else nullcontext()


def checkpoints(ctx: Context) -> ContextManager[Any]:
    """A cancelled ``call`` stops its thread at the next DSPy module or LM call it starts."""
    import dspy

    from bridge.programs.optimize import Checkpoints

    return dspy.context(callbacks=[*dspy.settings.callbacks, Checkpoints(ctx)])


@handler("call", needs_dspy=True, args=("target", "args", "kwargs", "store_as"))
async def call(args: dict, ctx: Context) -> Any:
    """Call ``target`` with ``args``/``kwargs`` (refs resolved); the result as data or as a ref."""
    positional, keywords = args.get("args", []), args.get("kwargs", {})
    if not isinstance(positional, list) or not isinstance(keywords, dict) \
            or not all(isinstance(key, str) for key in keywords):
        raise PeerError(ErrorType.BAD_REQUEST, "'args' must be a list and 'kwargs' a map with string keys")
    name = check_name(args.get("store_as"))
    policy = allowlist.of(ctx.shared.config)
    fn, method = resolve_target(args.get("target"), ctx, policy)
    positional, keywords = policy.arguments(args.get("target"), method, positional, keywords)
    positional, keywords = resolve_args(positional, ctx), resolve_args(keywords, ctx)
    lm = ctx.session.lm

    def work() -> Any:
        with lm_context(lm), checkpoints(ctx):
            return fn(*positional, **keywords)

    with reported():
        result = await ctx.shared.threads.run_sync(work)
        if inspect.isawaitable(result):  # an async method such as acall: awaited on the loop
            with lm_context(lm):
                result = await result
    return keeper(ctx, policy, name)(result) if name else encode(result, keeper(ctx, policy))


@handler("release", inline=True, args=("ref",))
def release(args: dict, ctx: Context) -> dict[str, bool]:
    """Free one ref of the request's session; ``unknown_ref`` if it holds none by that id."""
    ctx.shared.sessions.release(ctx.session, args.get("ref"))
    return {"released": True}
