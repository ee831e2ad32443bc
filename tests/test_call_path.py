"""The worker's changes to DSPy's per-call path (``bridge.lm.call_path``), in process.

The thread hops: a text call on a built provider sends nothing to a thread, and
every case that can block (a provider not yet built, media, LiteLLM not loaded
on a LiteLLM route, per-call client settings) still goes to one.  The calls are
real ``acall``s against the local OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import dspy
import pytest
from dspy.adapters import utils
from dspy.clients import capabilities, execution

from bridge.lm import call_path
from tests.lmserver import LMServer

call_path.install()
QA = "question -> answer"


class Recording(ThreadPoolExecutor):
    """The loop's default thread pool, noting the name of each function sent to it."""

    def __init__(self) -> None:
        super().__init__(2)
        self.sent: list[str] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        func = fn.args[0] if isinstance(fn, functools.partial) else fn  # to_thread: partial(ctx.run, func, ...)
        self.sent.append(getattr(func, "__name__", repr(func)))
        return super().submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def server():
    with LMServer() as s:
        s.add("m", [{"when": {}, "reply": {"answer": "ok"}}])
        yield s


def native_lm(server: LMServer) -> dspy.LM:
    return dspy.LM("openai/m", api_base=server.url, api_key="sk-test", cache=False, num_retries=0)


def hops_per_call(lm: dspy.LM, calls: int) -> list[list[str]]:
    """Run ``calls`` sequential predicts on one loop; what each sent to a thread."""
    executor, program, sent = Recording(), dspy.Predict(QA), []

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(executor)
        with dspy.context(lm=lm):
            for i in range(calls):
                before = len(executor.sent)
                prediction = await program.acall(question=f"q{i}")
                assert prediction.answer == "ok"
                sent.append(executor.sent[before:])

    asyncio.run(main())
    return sent


def test_a_text_call_sends_nothing_to_a_thread_once_its_provider_is_built(server, monkeypatch):
    monkeypatch.delitem(sys.modules, "litellm", raising=False)  # the native route decides, not a loaded LiteLLM
    first, second, third = hops_per_call(native_lm(server), 3)
    assert first == ["_target"]  # the provider's client is built, with its credentials, in a thread
    assert second == third == []


def test_capabilities_are_planned_in_a_thread_on_a_litellm_route_before_litellm_is_loaded(server, monkeypatch):
    monkeypatch.delitem(sys.modules, "litellm", raising=False)
    lm = dspy.LM("openai/m", api_base=server.url, api_key="sk-test", engine="litellm")
    assert not call_path._litellm_loaded_or_native(capabilities.capabilities, lm)
    assert lm.bridge_native is False


def test_per_call_client_settings_plan_capabilities_in_a_thread(server, monkeypatch):
    monkeypatch.delitem(sys.modules, "litellm", raising=False)
    lm = native_lm(server)
    assert call_path._litellm_loaded_or_native(capabilities.capabilities, lm)
    with capabilities.planning_scope(lm, {"api_base": "http://127.0.0.1:9/v1"}):
        assert not call_path._litellm_loaded_or_native(capabilities.capabilities, lm)
    with capabilities.planning_scope(lm, {"temperature": 0.5}):
        assert call_path._litellm_loaded_or_native(capabilities.capabilities, lm)


def test_media_and_canonical_requests_are_prepared_in_a_thread(server):
    lm = native_lm(server)
    text = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]
    assert call_path._text_only(execution.prepare, lm, None, text, {})
    assert call_path._text_only(execution.prepare, lm, "a prompt", None, {})
    assert not call_path._text_only(execution.prepare, lm, None, image, {})
    assert not call_path._text_only(execution.prepare, lm, None, None, {"request": object()})
    assert not call_path._text_only(execution.prepare, lm, None, "not a list", {})


def test_a_type_adapter_is_built_once_per_type_and_unhashable_annotations_still_work():
    assert utils.TypeAdapter(list[int]) is utils.TypeAdapter(list[int])
    assert utils.serialize_for_json({"a": [1, 2]}) == {"a": [1, 2]}
    unhashable = Annotated[int, {"a": "dict"}]
    assert utils.TypeAdapter(unhashable).validate_python("3") == 3
    assert utils.TypeAdapter(unhashable) is not utils.TypeAdapter(unhashable)


def test_the_proxy_settings_are_read_from_the_environment_once():
    from dspy._vendor.lm15.transports import _proxy

    assert _proxy.getproxies() is _proxy.getproxies()


def test_install_is_idempotent():
    to_thread = asyncio.to_thread
    call_path.install()
    assert asyncio.to_thread is to_thread


def test_model_names_resolve_as_dspy_resolves_them_with_one_kept_engine(server):
    from dspy.clients.backend_selection import select_backend
    from dspy.clients.engines.lm15_engine import LM15Engine
    from dspy.lm15 import RouterConfig

    for model in ("openai/m", "anthropic/claude-x", "openai-chat:gpt-x"):
        lm = dspy.LM(model, api_key="sk-test", cache=False)
        fresh = LM15Engine(RouterConfig(env={}, providers=()), model_type="chat").resolve(model)
        assert capabilities.resolve(lm) == select_backend(lm).resolution == fresh
        assert capabilities.resolve(lm) is capabilities.resolve(lm)  # remembered, not resolved again


def test_dspy_keeps_no_call_history_in_the_worker(server):
    lm = native_lm(server)
    hops_per_call(lm, 2)
    assert dspy.settings.disable_history
    assert lm.history == []


def test_other_callables_still_go_to_a_thread_even_unhashable_ones():
    class Unhashable:
        __hash__ = None

        def __call__(self) -> str:
            return threading.current_thread().name

    assert asyncio.run(asyncio.to_thread(Unhashable())) != threading.main_thread().name


def test_an_inlined_hop_still_lets_the_loop_run():
    """Each of DSPy's hops that runs inline still yields to the loop once, as the hop did, so a
    call's CPU comes in several steps and the worker's reader is not held for a whole call
    start (ping p99 under DSPy load, ``docs/performance.md``)."""
    from bridge.lm.engines import build_lm

    lm = build_lm("scripted/yields", {"script": [{"answer": "ok"}] * 2})
    executor, program = Recording(), dspy.Predict(QA)

    async def main() -> list[int]:
        asyncio.get_running_loop().set_default_executor(executor)
        turns = 0

        async def other_task() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        with dspy.context(lm=lm):
            await program.acall(question="warm")  # builds what the first call builds, in threads
            ticker = asyncio.create_task(other_task())
            await asyncio.sleep(0)
            before, sent = turns, len(executor.sent)
            assert (await program.acall(question="q")).answer == "ok"
            counted = [turns - before, len(executor.sent) - sent]
            ticker.cancel()
        return counted

    turns, threaded = asyncio.run(main())
    assert threaded == 0  # every hop of this call ran inline
    assert turns >= 3  # one around the call, one at each inlined hop: preparation and pricing here
