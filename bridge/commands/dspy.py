"""The DSPy commands: LMs per session, predict/stream/batch, programs by reference, sessions.

Nothing here imports DSPy at module import: ``ready`` must go out before the
~1 s DSPy import, which the warm-up does in the background (``needs_dspy``
requests wait for it).  How a program call runs, and what a cancel does to it,
is in ``bridge.programs.runner``.
"""

from __future__ import annotations

import math
from typing import Any


from bridge.lm.engines import build_lm, offline, option_warnings, preload_litellm
from bridge.programs.program import PROGRAM_ARGS, build_program, load_program, outputs
from bridge.programs.runner import bad_request, concurrency, dspy_error, new_ref, on_loop, run, session_lm, stored
from bridge.wire.errors import ErrorType, PeerError
from bridge.wire.protocol import quote
from bridge.worker.context import Context
from bridge.worker.registry import REGISTRY, handler
from bridge.worker.tasks import each


@REGISTRY.warmup
def warm_up() -> None:
    """Import DSPy and every module that needs it after ``ready`` (about 1 s), off the event loop."""
    import dspy  # noqa: F401

    from bridge.lm import call_path, engines, scripted  # noqa: F401
    from bridge.programs import calls, optimize, pipelines, react, streaming  # noqa: F401
    from bridge.programs.typenames import guard_dspy_parser

    guard_dspy_parser()  # a signature string reaching DSPy by any route imports nothing

    call_path.install()


# ---- language models ----------------------------------------------------------------

@handler("lm.configure", needs_dspy=True, opens_session=True)  # provider options: an open set (args free-form)
async def lm_configure(args: dict, ctx: Context) -> dict[str, Any]:
    """Give the request's session its LM (``scripted/…`` and ``replay/…`` are offline engines).

    A ``replay/<path>`` LM reads a file, so it is built in a worker thread; any other is
    built on the loop, before this handler first yields, so requests pipelined behind
    it in the same session (a shell pipe cannot wait for the answer) already see it.
    With ``engine: "litellm"`` (and a real provider), LiteLLM is loaded first, in a thread
    (about 6 s, once).  Options nobody knows come back as ``warnings``; they still reach
    the provider."""
    options = {k: v for k, v in args.items() if k not in ("model", "price")}
    check_api_base(options, ctx.shared.config.allow_api_bases)
    model = args.get("model")
    if options.get("engine") == "litellm" and not offline(model):
        await ctx.shared.threads.run_sync(preload_litellm)
    try:
        if isinstance(model, str) and model.startswith("replay/"):
            lm = await ctx.shared.threads.run_sync(build_lm, model, options)
        else:
            lm = build_lm(model, options)
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


def check_api_base(options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """An ``api_base``/``base_url`` goes with the frame's own ``api_key``, or matches an
    ``--allow-api-base`` prefix: no frame sends the operator's key to a URL of its choosing."""
    from urllib.parse import urlsplit

    for key in ("api_base", "base_url"):
        url = options.get(key)
        if url is None or (isinstance(options.get("api_key"), str) and options["api_key"]):
            continue
        if isinstance(url, str) and any(_url_under(urlsplit(url), urlsplit(prefix)) for prefix in allowed):
            continue
        raise PeerError(ErrorType.FORBIDDEN, f"'{key}' {quote(url)} needs an 'api_key' in the same frame, or a "
                        "URL under an --allow-api-base prefix", {"option": key, "url": url if isinstance(url, str)
                                                                 else quote(url)})


def _url_under(url: Any, prefix: Any) -> bool:
    """Same scheme, host and port, and a path under the prefix's (so ``http://localhost`` does
    not admit ``http://localhost.evil.example``)."""
    try:
        same = (url.scheme, url.hostname, url.port) == (prefix.scheme, prefix.hostname, prefix.port)
    except ValueError:  # a port that is not a number
        return False
    base = prefix.path.rstrip("/")
    return same and bool(url.scheme) and (url.path == base or url.path.startswith(base + "/"))


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

@handler("dspy.predict", needs_dspy=True, args=(*PROGRAM_ARGS, "inputs"))
async def predict(args: dict, ctx: Context) -> dict[str, Any]:
    with bad_request():
        program = build_program(args)
    return await run(program, args.get("inputs"), ctx, stream=False)


@handler("dspy.stream", needs_dspy=True, args=(*PROGRAM_ARGS, "inputs", "fields", "format"))
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


@handler("dspy.batch", needs_dspy=True, args=(*PROGRAM_ARGS, "items", "concurrency"))
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

@handler("session.create", inline=True, args=("ttl_s",), opens_session=True)
def session_create(args: dict, ctx: Context) -> dict[str, Any]:
    """Create (or touch) the request's session; ``ttl_s`` sets how long it may sit idle."""
    ttl = args.get("ttl_s")
    if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl < math.inf):
        raise PeerError(ErrorType.BAD_REQUEST, "'ttl_s' must be a finite number > 0")
    session = ctx.session
    ctx.shared.sessions.set_ttl(session, ttl)
    return {"session_id": session.id, "ttl_s": ttl}


@handler("session.close", inline=True, args=())
def session_close(args: dict, ctx: Context) -> dict[str, Any]:
    """Release the request's session: its LM and every ref it holds."""
    ctx.shared.sessions.close(ctx.session_id)
    return {"closed": True}


# ---- programs by reference -------------------------------------------------------------------

@handler("program.create", needs_dspy=True, args=PROGRAM_ARGS)
async def program_create(args: dict, ctx: Context) -> dict[str, str]:
    with bad_request():
        return new_ref(ctx, build_program(args, module_default=None))


@handler("dspy.react", needs_dspy=True,
         args=(*(a for a in PROGRAM_ARGS if a != "module"), "inputs", "stream", "fields"))
async def react(args: dict, ctx: Context) -> dict[str, Any]:
    """ReAct with tools that live on the host; thought, tool_call and observation chunks per step."""
    with bad_request():
        program = build_program({**args, "module": "ReAct"})
    return await run(program, args.get("inputs"), ctx, stream=bool(args.get("stream")), fields=args.get("fields"))


@handler("program.call", needs_dspy=True, args=("ref", "inputs", "tools", "stream", "fields"))
async def program_call(args: dict, ctx: Context) -> dict[str, Any]:
    """Call a stored program; a ReAct program may be given other host ``tools`` for this call."""
    program = stored(ctx, args.get("ref"))
    if "tools" in args:
        with bad_request():
            program = program.with_tools(args["tools"])
    return await run(program, args.get("inputs"), ctx, stream=bool(args.get("stream")), fields=args.get("fields"))


@handler("program.save", needs_dspy=True, args=("ref",))
async def program_save(args: dict, ctx: Context) -> dict[str, Any]:
    return {"state": stored(ctx, args.get("ref")).state()}


@handler("program.load", needs_dspy=True, args=(*PROGRAM_ARGS, "state"), opens_session=True)
async def program_load(args: dict, ctx: Context) -> dict[str, str]:
    with bad_request():
        return new_ref(ctx, load_program(args))
