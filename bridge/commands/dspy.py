"""The DSPy commands: LMs per session, predict/stream/batch, programs by reference, sessions.

Nothing here imports DSPy at module import: ``ready`` must go out before the
~1 s DSPy import, which the warm-up does in the background (``needs_dspy``
requests wait for it).  How a program call runs, and what a cancel does to it,
is in ``bridge.programs.runner``.
"""

from __future__ import annotations

from typing import Any

import anyio

from bridge.lm.engines import build_lm, offline, option_warnings, preload_litellm
from bridge.programs.program import build_program, load_program, outputs
from bridge.programs.runner import bad_request, concurrency, dspy_error, new_ref, on_loop, run, session_lm, stored
from bridge.wire.errors import ErrorType, PeerError
from bridge.worker.context import Context
from bridge.worker.registry import REGISTRY, handler
from bridge.worker.tasks import each


@REGISTRY.warmup
def warm_up() -> None:
    """Import DSPy and every module that needs it after ``ready`` (about 1 s), off the event loop."""
    import dspy  # noqa: F401

    from bridge.lm import engines, scripted  # noqa: F401
    from bridge.programs import calls, optimize, pipelines, react, streaming  # noqa: F401

    engines.install_client_hooks()


# ---- language models ----------------------------------------------------------------

@handler("lm.configure", needs_dspy=True)
async def lm_configure(args: dict, ctx: Context) -> dict[str, Any]:
    """Give the request's session its LM (``scripted/…`` and ``replay/…`` are offline engines).

    With ``engine: "litellm"`` (and a real provider), LiteLLM is loaded first, in a thread
    (about 6 s, once).
    Options nobody knows come back as ``warnings``; they still reach the provider.
    """
    options = {k: v for k, v in args.items() if k not in ("model", "price")}
    if options.get("engine") == "litellm" and not offline(args.get("model")):
        await anyio.to_thread.run_sync(preload_litellm, limiter=ctx.shared.threads)
    try:
        lm = build_lm(args.get("model"), options)
    except (ValueError, TypeError) as exc:
        raise PeerError(ErrorType.BAD_REQUEST, f"cannot configure the LM: {exc}") from None
    if "price" in args:
        lm.bridge_price = price_option(args["price"])  # read by observe.lm_usage when DSPy cannot price a call
    session = ctx.session
    session.lm = lm
    reply: dict[str, Any] = {"model": lm.model, "session_id": session.id}
    warnings = option_warnings(options)
    if warnings:
        reply["warnings"] = warnings
    return reply


def price_option(price: Any) -> tuple[float, float]:
    """``price: {"input_per_mtok", "output_per_mtok"}`` (USD per million tokens): the cost of
    calls DSPy cannot price itself (self-hosted and offline models)."""
    keys = ("input_per_mtok", "output_per_mtok")
    if not isinstance(price, dict) or set(price) != set(keys) or not all(
            isinstance(price[k], (int, float)) and not isinstance(price[k], bool) and price[k] >= 0 for k in keys):
        raise PeerError(ErrorType.BAD_REQUEST, "'price' must be {\"input_per_mtok\": USD, \"output_per_mtok\": USD}, "
                        "numbers >= 0")
    return float(price["input_per_mtok"]), float(price["output_per_mtok"])


# ---- one-shot programs -------------------------------------------------------------------

@handler("dspy.predict", needs_dspy=True)
async def predict(args: dict, ctx: Context) -> dict[str, Any]:
    with bad_request():
        program = build_program(args)
    return await run(program, args.get("inputs"), ctx, stream=False)


@handler("dspy.stream", needs_dspy=True)
async def stream(args: dict, ctx: Context) -> dict[str, Any]:
    """``format: "openai"`` sends the tokens as OpenAI ``chat.completion.chunk`` objects, then a stop chunk."""
    from bridge.programs.streaming import FORMATS, OpenAIChunks, Relay

    chunk_format = args.get("format", "dspy")
    if chunk_format not in FORMATS:
        raise PeerError(ErrorType.BAD_REQUEST, f"'format' must be one of {list(FORMATS)}")
    with bad_request():
        program = build_program(args)
    if chunk_format == "dspy":
        return await run(program, args.get("inputs"), ctx, stream=True, fields=args.get("fields"))
    openai = OpenAIChunks(ctx.id, session_lm(ctx).model)
    result = await run(program, args.get("inputs"), Relay(ctx, openai), stream=True, fields=args.get("fields"))
    await ctx.emit(openai.finish())
    return result


@handler("dspy.batch", needs_dspy=True)
async def batch(args: dict, ctx: Context) -> dict[str, int]:
    """Run ``items`` with bounded concurrency; one chunk per item as it finishes."""
    with bad_request():
        program = build_program(args)
        items = args.get("items")
        if not isinstance(items, list):
            raise ValueError("'items' must be a list of input maps")
        items = [program.check_inputs(item, f"items[{i}]") for i, item in enumerate(items)]
    lm, total = session_lm(ctx), len(items)
    counts = {"done": 0, "failed": 0}

    async def one(index: int) -> None:
        try:
            chunk = {"event": "item", "index": index, "outputs": outputs(await on_loop(program, items[index], lm))}
        except Exception as exc:
            counts["failed"] += 1
            error = dspy_error(exc) or PeerError(ErrorType.HANDLER_ERROR, str(exc) or type(exc).__name__)
            chunk = {"event": "item_error", "index": index, "error": {"type": error.type, "message": error.message}}
        counts["done"] += 1
        await ctx.emit({**chunk, "progress": {"done": counts["done"], "total": total}})

    await each(total, concurrency(args), one)
    return {"total": total, "succeeded": total - counts["failed"], "failed": counts["failed"]}


# ---- sessions ----------------------------------------------------------------------------

@handler("session.create", inline=True)
def session_create(args: dict, ctx: Context) -> dict[str, Any]:
    """Create (or touch) the request's session; ``ttl_s`` sets how long it may sit idle."""
    ttl = args.get("ttl_s")
    if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
        raise PeerError(ErrorType.BAD_REQUEST, "'ttl_s' must be a number > 0")
    session = ctx.session
    session.ttl_s = ttl
    return {"session_id": session.id, "ttl_s": ttl}


@handler("session.close", inline=True)
def session_close(args: dict, ctx: Context) -> dict[str, Any]:
    """Release the request's session: its LM and every ref it holds."""
    ctx.shared.sessions.close(ctx.session_id)
    return {"closed": True}


# ---- programs by reference -------------------------------------------------------------------

@handler("program.create", needs_dspy=True)
async def program_create(args: dict, ctx: Context) -> dict[str, str]:
    with bad_request():
        return new_ref(ctx, build_program(args, module_default=None))


@handler("dspy.react", needs_dspy=True)
async def react(args: dict, ctx: Context) -> dict[str, Any]:
    """ReAct with tools that live on the host; thought, tool_call and observation chunks per step."""
    with bad_request():
        program = build_program({**args, "module": "ReAct"})
    return await run(program, args.get("inputs"), ctx, stream=bool(args.get("stream")), fields=args.get("fields"))


@handler("program.call", needs_dspy=True)
async def program_call(args: dict, ctx: Context) -> dict[str, Any]:
    """Call a stored program; a ReAct program may be given other host ``tools`` for this call."""
    program = stored(ctx, args.get("ref"))
    if "tools" in args:
        with bad_request():
            program = program.with_tools(args["tools"])
    return await run(program, args.get("inputs"), ctx, stream=bool(args.get("stream")), fields=args.get("fields"))


@handler("program.save", needs_dspy=True)
async def program_save(args: dict, ctx: Context) -> dict[str, Any]:
    return {"state": stored(ctx, args.get("ref")).state()}


@handler("program.load", needs_dspy=True)
async def program_load(args: dict, ctx: Context) -> dict[str, str]:
    with bad_request():
        return new_ref(ctx, load_program(args))
