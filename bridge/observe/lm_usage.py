"""LM usage per request: a hook on DSPy 3.4's ``execute``/``aexecute``.

Every ``dspy.LM`` call — sync or ``acall``, in a worker thread, a batch lane, a
stream or a ReAct step, cache hits included — runs through
``dspy.clients.execution.execute`` (or ``aexecute``), which returns the
``CallResult`` with ``usage``, ``cost`` and ``cache_hit``.  ``dspy.context(
track_usage=True)`` would only see calls that are not cache hits, and no
costs or failures.  The request is found through a context variable set in
its task (``observe.current``), which DSPy's threads and tasks inherit.

Imports DSPy: ``install`` runs in the warm-up, after DSPy's import.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bridge.observe.current import REQUEST
from bridge.observe.metrics import LmUsage

_lock = threading.Lock()  # batch lanes account from several threads at once


def install(totals: LmUsage) -> None:
    """Account every LM call of this process to its request, its session and ``totals``."""
    from dspy.clients import execution

    execute, aexecute = execution.execute, execution.aexecute
    if getattr(execute, "bridge_metrics", False):
        return

    def counted_execute(lm: Any, call: Any) -> Any:
        ctx, started = _started(lm)
        try:
            result = execute(lm, call)
        except BaseException as exc:
            _ended(totals, ctx, lm, started, None, exc)
            raise
        _ended(totals, ctx, lm, started, result, None)
        return result

    async def counted_aexecute(lm: Any, call: Any) -> Any:
        ctx, started = _started(lm)
        try:
            result = await aexecute(lm, call)
        except BaseException as exc:  # cancelled calls too: the provider was called
            _ended(totals, ctx, lm, started, None, exc)
            raise
        _ended(totals, ctx, lm, started, result, None)
        return result

    counted_execute.bridge_metrics = True  # type: ignore[attr-defined]
    execution.execute, execution.aexecute = counted_execute, counted_aexecute


def _started(lm: Any) -> tuple[Any, float]:
    ctx = REQUEST.get()
    if ctx is not None and ctx.telemetry is not None:
        ctx.telemetry.event("lm_start", {"system_time": time.time()}, {"model": lm.model})
    return ctx, time.perf_counter()


def _ended(totals: LmUsage, ctx: Any, lm: Any, started: float, result: Any, exc: BaseException | None) -> None:
    """Account one call.  A failed or cancelled call has no ``CallResult``: DSPy keeps no
    usage of a call that did not finish, so its tokens are unknown (``null`` in telemetry)."""
    outcome = None if exc is None else "failed" if isinstance(exc, Exception) else "cancelled"
    usage = (result.usage if result is not None else None) or {}
    tokens_in = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    tokens_out = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    cost = getattr(result, "cost", None)
    hit = bool(getattr(result, "cache_hit", False))
    price = getattr(lm, "bridge_price", None)  # lm.configure's ``price``: for calls DSPy cannot price
    if cost is None and price is not None and result is not None:
        cost = (tokens_in * price[0] + tokens_out * price[1]) / 1e6
    if hit and cost is not None:
        cost = 0.0  # DSPy's cached result carries the cost of the call that filled the cache
    with _lock:
        for usage_of in (totals, ctx and ctx.session.usage, ctx and _request_usage(ctx)):
            if usage_of is not None:
                usage_of.add(tokens_in, tokens_out, cost, hit, outcome)
    if ctx is not None and ctx.telemetry is not None:
        metadata: dict[str, Any] = {"model": lm.model, "cache_hit": hit}
        if exc is not None:
            metadata["error"] = type(exc).__name__
        known = result is not None
        ctx.telemetry.event("lm_end", {"duration_ms": (time.perf_counter() - started) * 1000,
                                       "input_tokens": tokens_in if known else None,
                                       "output_tokens": tokens_out if known else None,
                                       "cost_usd": cost}, metadata)


def _request_usage(ctx: Any) -> LmUsage:
    if ctx.lm is None:
        ctx.lm = LmUsage()
    return ctx.lm
