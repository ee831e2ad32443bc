"""Changes to DSPy 3.4.1's per-call path, installed once by the warm-up (``install``).

Each is measured in ``docs/performance.md`` ("500 concurrent predicts"); none
changes what a program returns, only what a call costs:

- each LM's native client gets its ``max_connections`` (lm15's default of 100
  makes 500 concurrent calls wait in waves of 100);
- ``model_info`` is memoized where capability planning and pricing call it, and
  DSPy's price snapshot is loaded here, off the loop, instead of in a first call;
- the pydantic ``TypeAdapter`` DSPy's adapters build for every field of every
  call (``serialize_for_json``, ``parse_value``) is built once per type;
- lm15 reads the proxy settings from the environment once, not on every call
  (an ``os.environ`` scan per request);
- model names are resolved by one kept offline engine, not by a new one (and its
  router) three times per call, and an engine remembers how it
  resolved a model name (offline routing, a pure function of its frozen config);
- DSPy's four thread hops per ``acall`` run inline when they cannot block,
  each still one turn of the loop (``_inline``);
- DSPy's call history is off (``_no_history``): ``lm.history`` stays empty;
- ``lm.configure``'s ``stream_usage: false`` reaches the native client
  (``_stream_usage_option``), whose OpenAI preset always asks for stream usage.

They wrap DSPy internals, so each checks what it wraps and falls back to DSPy's
own behaviour where it is unsure.  ``dspy>=3.4,<3.5`` is pinned for that reason.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from copy import deepcopy
from typing import Any, Callable

from bridge.lm.engines import DEFAULT_MAX_CONNECTIONS

_MAX_CONNECTIONS: contextvars.ContextVar[int] = contextvars.ContextVar("bridge_max_connections",
                                                                       default=DEFAULT_MAX_CONNECTIONS)
ROUTES = 64
"""Model names one engine remembers the route of (an engine serves one model in DSPy)."""
TYPE_ADAPTERS = 256
"""Distinct types whose ``TypeAdapter`` is kept (an LRU: signatures may build types at run time)."""


def install() -> None:
    """Install every change once (the warm-up thread, after DSPy's import)."""
    from dspy.clients import execution

    if getattr(execution._select_engine, "bridge_limit", False):
        return
    _lm_settings()
    _model_info()
    _type_adapters()
    _proxies_once()
    _offline_engines()
    _remembered_routes()
    _stream_usage_option()
    _inline()  # after ``_stream_usage_option``: its rules name the wrapped ``_target``
    _no_history()


def _lm_settings() -> None:
    """Carry two of ``lm.configure``'s settings from the LM to the engine DSPy selects for it
    in ``execution._select_engine``: ``max_connections``, which DSPy never gives lm15's
    ``RouterConfig`` (the config built inside is wrapped to apply it), and a
    ``stream_usage: false`` mark on the engine, for ``_stream_usage_option``."""
    from dspy.clients import execution

    select, router_config = execution._select_engine, execution.RouterConfig

    def with_lm_settings(lm: Any, call: Any, asynchronous: bool) -> Any:
        token = _MAX_CONNECTIONS.set(getattr(lm, "bridge_max_connections", DEFAULT_MAX_CONNECTIONS))
        try:
            selected = select(lm, call, asynchronous)
        finally:
            _MAX_CONNECTIONS.reset(token)
        if getattr(lm, "bridge_stream_usage", True) is False:
            try:
                selected[0].bridge_stream_usage = False
            except AttributeError:  # an engine with slots: not the native client
                pass
        return selected

    def limited_config(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("max_connections", _MAX_CONNECTIONS.get())
        return router_config(*args, **kwargs)

    with_lm_settings.bridge_limit = True  # type: ignore[attr-defined]
    execution._select_engine, execution.RouterConfig = with_lm_settings, limited_config


def _model_info() -> None:
    """For a model missing from DSPy's price snapshot (any self-hosted one) ``model_info``
    scans every entry, several ms on each call; the snapshot itself (~100 ms to load) is
    read here rather than by a first call."""
    from dspy.clients import capabilities, costs, model_metadata

    model_metadata._load()
    original = costs.model_info
    remembered = functools.lru_cache(maxsize=1024)(
        lambda provider, model, namespaces: original(provider, model, namespaces=namespaces))

    def model_info(provider: Any, model: Any, *, namespaces: Any = None) -> dict[str, Any]:
        try:
            return deepcopy(remembered(provider, model, None if namespaces is None else tuple(namespaces)))
        except TypeError:  # an unhashable argument: ask DSPy directly
            return original(provider, model, namespaces=namespaces)

    costs.model_info = capabilities.model_info = model_info


def _type_adapters() -> None:
    """``dspy.adapters.utils`` builds ``TypeAdapter(type(value))`` per field per call (about
    0.2 ms each); a ``TypeAdapter`` depends only on its type, so one per type is kept."""
    from dspy.adapters import utils
    from pydantic import TypeAdapter

    if utils.TypeAdapter is not TypeAdapter:
        return
    kept = functools.lru_cache(maxsize=TYPE_ADAPTERS)(TypeAdapter)

    def type_adapter(kind: Any, *args: Any, **kwargs: Any) -> TypeAdapter:
        if args or kwargs:
            return TypeAdapter(kind, *args, **kwargs)
        try:
            return kept(kind)
        except TypeError:  # an unhashable annotation
            return TypeAdapter(kind)

    utils.TypeAdapter = type_adapter


def _proxies_once() -> None:
    """lm15 calls ``urllib.request.getproxies`` (a scan of the whole environment) for every
    request.  A port's environment is set when it starts, so it is read once."""
    from dspy._vendor.lm15.transports import _proxy

    _proxy.getproxies = functools.cache(_proxy.getproxies)


def _offline_engines() -> None:
    """DSPy resolves a model name offline (``env={}``) three times per call, in backend
    selection (twice) and pricing, each time through a new ``LM15Engine`` whose router
    checks every provider binding (about 0.2 ms).  One engine per (providers, model
    type) is kept: resolving is what DSPy's own long-lived engines do on every call."""
    from dspy.clients import backend_selection, capabilities
    from dspy.lm15 import _definitions

    build = backend_selection.LM15Engine
    kept = functools.lru_cache(maxsize=64)(
        lambda providers, model_type: build(backend_selection.RouterConfig(env={}, providers=providers),
                                            model_type=model_type))

    def offline_engine(config: Any = None, *, model_type: str = "chat") -> Any:
        if config is not None and config.env == {}:  # select_backend's only construction
            try:
                return kept(config.providers, model_type)
            except TypeError:  # an unhashable provider definition
                pass
        return build(config, model_type=model_type)

    original = capabilities.resolve

    def resolve(lm: Any) -> Any:
        try:
            engine = kept(_definitions(getattr(lm, "_providers", ())), lm.model_type)
        except TypeError:
            return original(lm)
        return engine.resolve(lm.model)

    backend_selection.LM15Engine, capabilities.resolve = offline_engine, resolve


def _remembered_routes() -> None:
    """An lm15 engine resolves its model name (offline: no network, no credential) on every
    call, several times; its config is frozen, so each engine keeps its answers."""
    from dspy.clients.engines import lm15_engine

    resolve = lm15_engine._Routing.resolve

    def remembered(engine: Any, model: str) -> Any:
        routes = engine.__dict__.setdefault("bridge_routes", {})
        route = routes.get(model)
        if route is None:
            route = resolve(engine, model)
            if len(routes) < ROUTES:
                routes[model] = route
        return route

    lm15_engine._Routing.resolve = remembered


def _stream_usage_option() -> None:
    """lm15's OpenAI preset sends ``stream_options.include_usage`` with every stream, which
    some OpenAI-compatible servers reject.  An LM configured with ``stream_usage: false``
    marks its engine (``_lm_settings``), the engine marks the provider client it
    resolves a stream to, and that client's request body leaves ``stream_options`` out."""
    from dspy._vendor.lm15.providers import openai_chat
    from dspy.clients.engines import lm15_engine

    target, payload = lm15_engine._Routing._target, openai_chat.OpenAIChatLM._payload

    @functools.wraps(target)
    def marked_target(engine: Any, request: Any, *, streaming: bool = False) -> Any:
        provider, routed = target(engine, request, streaming=streaming)
        if getattr(engine, "bridge_stream_usage", True) is False:
            getattr(provider, "_inner", provider).bridge_stream_usage = False  # the async client's body builder
        return provider, routed

    @functools.wraps(payload)
    def body(provider: Any, request: Any, stream: bool) -> dict[str, Any]:
        built = payload(provider, request, stream)
        if stream and getattr(provider, "bridge_stream_usage", True) is False:
            built.pop("stream_options", None)
        return built

    lm15_engine._Routing._target, openai_chat.OpenAIChatLM._payload = marked_target, body


def _inline() -> None:
    """Run DSPy's per-call thread hops inline when they cannot block.

    ``acall`` sends four steps to the loop's default thread pool: capability planning,
    call preparation, target resolution and pricing.  DSPy does so to protect any event
    loop from their rare blocking cases (a LiteLLM import, reading a media file,
    constructing a provider client, loading the price snapshot); otherwise each is
    pure CPU of well under a millisecond, and the hop (a thread wake-up, a GIL hand-off,
    a wake-up of the loop) costs more than the step: 500 concurrent predicts took
    0.3 s longer with them.  Each rule below names the blocking case it rules out; a
    step it does not rule out goes to the thread as before.

    An inlined step still gives the loop its turn first, as the hop did: a call's start
    then runs in several short steps, not one of 1–2 ms, and a ``ping`` arriving meanwhile
    waits for one of them (ping p99 under DSPy load: 5.4 to 3.1 ms, ``docs/performance.md``).
    """
    from dspy.clients import capabilities, execution
    from dspy.clients.engines import lm15_engine

    steps: tuple[tuple[Callable[..., Any], Callable[..., bool]], ...] = (
        (capabilities.capabilities, _litellm_loaded_or_native),
        (execution.prepare, _text_only),
        (execution._price_result, lambda *args, **kwargs: True),  # the snapshot is loaded by ``_model_info``
        (lm15_engine._Routing._target, _provider_built),
    )
    rules = {id(step): rule for step, rule in steps}
    to_thread, sleep = asyncio.to_thread, asyncio.sleep

    async def inline_or_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        rule = rules.get(id(getattr(func, "__func__", func)))  # by identity: any callable may come here
        if rule is not None and rule(func, *args, **kwargs):
            await sleep(0)  # the loop's turn, as with the hop
            return contextvars.copy_context().run(func, *args, **kwargs)  # isolated like a thread's context
        return await to_thread(func, *args, **kwargs)

    inline_or_thread.bridge_steps = steps  # type: ignore[attr-defined]  (keeps the ids' objects alive)
    asyncio.to_thread = inline_or_thread


def _no_history() -> None:
    """DSPy keeps every call (messages, reply, usage) in a global history and in each LM's,
    up to 10,000 entries each.  In a long-lived worker that is memory growing with prompt
    size and session count, and garbage-collector work on every call.  The worker accounts
    for calls itself (``meta``, telemetry, transcripts), so the default is set off; without
    claiming ``dspy.configure`` (only its first thread may call it), which stays the
    operator's: a handler module may turn history back on."""
    import importlib

    importlib.import_module("dspy.dsp.utils.settings").main_thread_config["disable_history"] = True


def _litellm_loaded_or_native(func: Any, lm: Any, *args: Any, **kwargs: Any) -> bool:
    """Capability planning imports LiteLLM for a call routed through it: inline once LiteLLM
    is loaded, or for an LM on its native route.  The route depends on the LM and on client
    settings given per call; an LM's own route is settled once (offline, as DSPy does)."""
    import sys

    from dspy.clients.backend_selection import CLIENT_KEYS, select_backend
    from dspy.clients.capabilities import _planning

    if "litellm" in sys.modules:
        return True
    scope = _planning.get()
    if scope is not None and scope.lm is lm and scope.options and not CLIENT_KEYS.isdisjoint(scope.options):
        return False
    native = getattr(lm, "bridge_native", None)
    if native is None:
        try:
            native = bool(select_backend(lm).native)
        except Exception:  # DSPy raises it again in the thread, where it is reported
            return False
        lm.bridge_native = native
    return native


def _text_only(func: Any, lm: Any, prompt: Any, messages: Any, kwargs: Any, **options: Any) -> bool:
    """Preparation snapshots media, which may read files: inline only for text."""
    if "request" in kwargs:
        return False
    if messages is None:
        return isinstance(prompt, str)
    return isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              for m in messages)


def _provider_built(func: Any, request: Any, **kwargs: Any) -> bool:
    """Resolving the target constructs the provider's client once (it may load
    credentials): inline once this engine has built one."""
    return bool(getattr(func.__self__, "_providers", None))
