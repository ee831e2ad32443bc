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

from bridge.lm.offline import AsyncOfflineEngine, OfflineEngine
from bridge.lm.scripted import ScriptedEngine

if TYPE_CHECKING:
    import dspy

EngineFactory = Callable[[str, dict[str, Any]], "OfflineEngine"]
"""``factory(name, options)``: ``name`` is the model id after the prefix; the factory
pops the options it consumes, and the rest go to ``dspy.LM``."""

_ENGINES: dict[str, EngineFactory] = {}
_FORCED: EngineFactory | None = None


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


def build_lm(model: Any, options: dict[str, Any]) -> "dspy.LM":
    """A ``dspy.LM`` for ``lm.configure``.  Raises ValueError/TypeError for bad arguments.

    Offline engines default to ``cache=False`` (a cached reply would not consume
    the script) and ``num_retries=0`` (a retry would).
    """
    import dspy

    if not isinstance(model, str) or not model:
        raise ValueError("'model' must be a non-empty string, e.g. 'openai/gpt-4o-mini' or 'scripted/demo'")
    prefix, _, name = model.partition("/")
    factory = _ENGINES.get(prefix) if name else None
    if factory is None and _FORCED is None:
        return dspy.LM(model, **options)
    options = dict(options)
    engine = factory(name, options) if factory is not None else None
    if _FORCED is not None:
        engine = _FORCED(name, options)
    options.setdefault("cache", False)
    options.setdefault("num_retries", 0)
    return dspy.LM(model, engine=engine, async_engine=AsyncOfflineEngine(engine), **options)


def _scripted(name: str, options: dict[str, Any]) -> OfflineEngine:
    return ScriptedEngine.from_options(options)


register_engine("scripted", _scripted)
