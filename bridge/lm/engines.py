"""Language models for sessions: ``dspy.LM`` over a provider, or over an offline engine.

Offline engines (``bridge.lm.offline``) are picked by the model's prefix
(``scripted/…``, and ``replay/…`` once ``bridge.transcripts.replay_lm`` registered
it) from a registry, so a new one plugs in with ``register_engine`` and nothing
else changes; ``force_engine`` serves every model with one engine (``--replay-lm``).
``DummyLM`` never streams and ``BaseLM.forward`` is deprecated, hence engines.

DSPy is imported lazily: this module is loaded before ``ready``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import dspy

    from bridge.lm.offline import OfflineEngine

EngineFactory = Callable[[str, dict[str, Any]], "OfflineEngine"]
"""``factory(name, options)``: ``name`` is the model id after the prefix; the factory
pops the options it consumes, and the rest go to ``dspy.LM``."""

_ENGINES: dict[str, EngineFactory] = {}
_FORCED: EngineFactory | None = None

DEFAULT_MAX_CONNECTIONS = 1000
"""Connections one LM's native (lm15) client keeps open at once.  lm15's own default
is 100, which makes 500 concurrent calls wait in waves of 100."""
_LITELLM_READY = False

# What a chat-completions server takes (OpenAI's parameters), beside DSPy's own LM
# arguments and client settings: the options of ``lm.configure`` that draw no warning.
OPENAI_PARAMETERS = frozenset({
    "audio", "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
    "modalities", "n", "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
    "web_search_options", "top_k", "rollout_id"})


def register_engine(prefix: str, factory: EngineFactory) -> None:
    """Serve models named ``prefix/<name>`` with the engine ``factory`` builds."""
    _ENGINES[prefix] = factory


def force_engine(factory: EngineFactory | None) -> None:
    """Serve every model with ``factory``'s engine, whatever its name (``None``: stop).

    The model keeps its name, so results that echo it are unchanged; its own
    engine's options are still checked and consumed.  The factory also pops
    what a custom engine cannot take (client settings such as ``api_key``).
    """
    global _FORCED
    _FORCED = factory


def offline(model: Any) -> bool:
    """Is ``model`` served by an offline engine (its prefix's, or the forced one)?"""
    prefix, _, name = model.partition("/") if isinstance(model, str) else ("", "", "")
    return _FORCED is not None or (bool(name) and prefix in _ENGINES)


def build_lm(model: Any, options: dict[str, Any]) -> "dspy.LM":
    """A ``dspy.LM`` for ``lm.configure``.  Raises ValueError/TypeError for bad arguments.

    Pops what it consumes from ``options`` (the bridge's and an offline engine's
    options): what is left went to ``dspy.LM``.  Offline engines default to
    ``cache=False`` (a cached reply would not consume the script) and
    ``num_retries=0`` (a retry would).
    """
    import dspy

    if not isinstance(model, str) or not model:
        raise ValueError("'model' must be a non-empty string, e.g. 'openai/gpt-4o-mini' or 'scripted/demo'")
    limit, stream_usage = connection_options(options)
    prefix, _, name = model.partition("/")
    if not offline(model):
        lm = dspy.LM(model, **options)
    else:
        options.pop("engine", None)  # the offline engine replaces DSPy's (lm15 or LiteLLM)
        factory = _ENGINES.get(prefix) if name else None
        engine = factory(name, options) if factory is not None else None
        if _FORCED is not None:
            engine = _FORCED(name, options)
        options.setdefault("cache", False)
        options.setdefault("num_retries", 0)
        from bridge.lm.offline import AsyncOfflineEngine  # the offline engines load on first use, not before ready

        lm = dspy.LM(model, engine=engine, async_engine=AsyncOfflineEngine(engine), **options)
    lm.bridge_max_connections, lm.bridge_stream_usage = limit, stream_usage
    return lm


def _scripted(name: str, options: dict[str, Any]) -> OfflineEngine:
    from bridge.lm.scripted import ScriptedEngine

    return ScriptedEngine.from_options(options)


register_engine("scripted", _scripted)


# ---- options ---------------------------------------------------------------------------

def option_warnings(options: dict[str, Any]) -> list[dict[str, Any]]:
    """``options`` (what went to ``dspy.LM``) that neither DSPy, the chosen engine, nor the
    bridge knows, as ``{option, message, did_you_mean?}``.  Provider options are an open
    set, so these are warnings: the option was still passed on."""
    import difflib  # only when an option is unknown: kept off the start-up

    engine = options.get("engine")
    known = known_options(engine)
    warnings = []
    for option in sorted(set(options) - known):
        warning: dict[str, Any] = {"option": option, "message": f"{option!r} is an option neither DSPy nor "
                                   f"{'LiteLLM' if engine == 'litellm' else 'its native client'} knows; it "
                                   "was passed to the provider as is"}
        close = difflib.get_close_matches(option, sorted(known), n=1, cutoff=0.6)
        if close:
            warning["did_you_mean"] = close[0]
        warnings.append(warning)
    return warnings


def known_options(engine: Any) -> set[str]:
    import inspect

    import dspy
    from dspy.clients.backend_selection import CLIENT_KEYS

    known = set(inspect.signature(dspy.LM.__init__).parameters) - {"self", "kwargs"}
    known |= CLIENT_KEYS | OPENAI_PARAMETERS
    if engine == "litellm":
        import litellm
        from litellm.types.utils import all_litellm_params

        known |= set(inspect.signature(litellm.completion).parameters) | set(all_litellm_params) | {"drop_params"}
    return known


def connection_options(options: dict[str, Any]) -> tuple[int, bool]:
    """Pop ``max_connections`` (the native client's connection limit) and ``stream_usage``
    (ask streams for exact usage; default true).  ValueError if malformed."""
    limit = options.pop("max_connections", DEFAULT_MAX_CONNECTIONS)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError("'max_connections' must be an integer >= 1")
    usage = options.pop("stream_usage", True)
    if not isinstance(usage, bool):
        raise ValueError("'stream_usage' must be true or false")
    return limit, usage


def preload_litellm() -> None:
    """Import LiteLLM and what its first call and first stream import (about 6 s of CPU here),
    by one call and one stream on LiteLLM's own ``mock_response`` (no network).  Run in a
    thread before ``lm.configure`` answers, so no later request pays it on the event loop."""
    global _LITELLM_READY
    if _LITELLM_READY:
        return
    import asyncio

    import litellm
    from dspy.clients import call_result, execution  # noqa: F401  (DSPy's own lazy imports of a first call)
    from dspy.clients.engines import streaming  # noqa: F401

    litellm.suppress_debug_info = True
    messages = [{"role": "user", "content": "warm-up"}]
    litellm.completion(model="openai/warm-up", messages=messages, mock_response="ok", api_key="none")

    async def stream() -> None:
        reply = await litellm.acompletion(model="openai/warm-up", messages=messages, mock_response="ok ok",
                                          stream=True, stream_options={"include_usage": True}, api_key="none")
        litellm.stream_chunk_builder([chunk async for chunk in reply])

    asyncio.run(stream())
    import litellm._service_logger  # noqa: F401  (what a real first call adds to the mock's)
    import litellm.integrations.prometheus_services  # noqa: F401
    _LITELLM_READY = True
