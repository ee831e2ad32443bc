"""ReAct whose tools live on the host, streamed step by step.

Each host tool is a ``dspy.Tool`` proxy with the host's name, description and
JSON-schema arguments (so the LM sees the true arguments); calling it parks an
``rpc_request`` through the *current* request's context, so a stored ReAct
program works from any later request.  The run is ``acall`` with async tools:
an async tool inside sync ReAct would run in a throwaway loop and hang.

A sync DSPy callback only records each step's thought; the async proxies then
publish thought, ``tool_call`` and ``observation`` in order, through the same
stream as the tokens when streaming.  Imports DSPy: load after warm-up.
"""

from __future__ import annotations

from collections import deque
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, AsyncIterator

import dspy
from dspy.utils.callback import BaseCallback

from bridge.programs.events import publish
from bridge.wire.errors import ToolError
from bridge.worker.context import Context

_RUN: ContextVar["ReactRun"] = ContextVar("bridge_react_run")
_JSON_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list, "object": dict}


def check_tool_specs(specs: Any) -> list[dict[str, Any]]:
    """``tools: [{name, description, parameters}]`` as the host sent them; ValueError if malformed."""
    if not isinstance(specs, list) or not specs:
        raise ValueError("'tools' must be a non-empty list of {name, description, parameters}")
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ValueError(f"each tool needs a 'name': {spec!r}")
        if spec["name"] == "finish":
            raise ValueError("'finish' is ReAct's own tool; give the host tool another name")
        params = spec.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
            raise ValueError(f"tool {spec['name']!r}: 'parameters' must be a JSON-schema object")
    return specs


def host_tool(spec: dict[str, Any]) -> dspy.Tool:
    """A ``dspy.Tool`` that calls ``spec['name']`` on the host."""
    name = spec["name"]
    properties = spec.get("parameters", {}).get("properties", {})

    async def call_host(**kwargs: Any) -> Any:
        return await _RUN.get().call(name, kwargs)

    return dspy.Tool(call_host, name=name, desc=spec.get("description") or name, args=properties,
                     arg_types={arg: _JSON_TYPES.get(schema.get("type"), Any) for arg, schema in properties.items()})


def build_react(signature: type[dspy.Signature], specs: list[dict[str, Any]], config: dict[str, Any]) -> dspy.ReAct:
    """``dspy.ReAct`` over host tools; its ``finish`` tool also publishes the last thought."""
    react = dspy.ReAct(signature, tools=[host_tool(spec) for spec in check_tool_specs(specs)], **config)
    original = react.tools["finish"]
    react.tools["finish"] = dspy.Tool(_finish, name="finish", desc=original.desc, args={})
    return react


async def _finish() -> str:
    await _RUN.get().flush_thoughts()
    return "Completed."


class _StepCallback(BaseCallback):
    """Notes each finished step of the ReAct predictor.  Runs synchronously: it must not block."""

    def __init__(self, run: "ReactRun") -> None:
        self._run = run
        self._calls: set[str] = set()

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if instance is self._run.predictor:
            self._calls.add(call_id)

    def on_module_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        if call_id in self._calls:
            self._calls.discard(call_id)
            if exception is None:
                self._run.step += 1
                self._run.thoughts.append((self._run.step, outputs.next_thought))


class ReactRun:
    """One ReAct run of one request: its step counter and the step chunks it publishes."""

    def __init__(self, ctx: Context, react: dspy.ReAct) -> None:
        self.ctx = ctx
        self.predictor = react.react
        self.step = 0
        self.thoughts: deque[tuple[int, str]] = deque()
        self.callback = _StepCallback(self)

    async def flush_thoughts(self) -> None:
        while self.thoughts:
            step, text = self.thoughts.popleft()
            await publish({"event": "thought", "step": step, "text": text}, self.ctx.emit)

    async def call(self, tool: str, kwargs: dict[str, Any]) -> Any:
        """One host tool call of the current step: thought, tool_call, the call, observation."""
        await self.flush_thoughts()
        step = self.step

        async def announce(rpc_id: int) -> None:
            await publish({"event": "tool_call", "step": step, "tool": tool, "args": kwargs, "rpc_id": rpc_id},
                          self.ctx.emit)

        observation: dict[str, Any] = {"event": "observation", "step": step, "tool": tool}
        try:
            result = await self.ctx.shared.tools.call(self.ctx, tool, [], kwargs, announce=announce)
        except (ToolError, TimeoutError) as exc:
            error = ({"type": exc.type, "message": exc.message} if isinstance(exc, ToolError)
                     else {"type": "timeout", "message": str(exc)})
            await publish({**observation, "error": error}, self.ctx.emit)
            # What DSPy writes for a failing local tool, minus a traceback of this proxy: the LM
            # needs the host's error, and the trajectory must not depend on where we are installed.
            return f"Execution error in {tool}: {error['type']}: {error['message']}"
        await publish({**observation, "result": result}, self.ctx.emit)
        return result


@asynccontextmanager
async def steps(ctx: Context, react: dspy.ReAct) -> AsyncIterator[None]:
    """Run the body as ``ctx``'s ReAct run: tool proxies call through ``ctx``, steps become chunks."""
    run = ReactRun(ctx, react)
    token = _RUN.set(run)
    try:
        with dspy.context(callbacks=[*dspy.settings.callbacks, run.callback]):
            yield
        await run.flush_thoughts()  # a last step whose tool name was invalid still shows its thought
    finally:
        _RUN.reset(token)


def trajectory(prediction: dspy.Prediction) -> list[dict[str, Any]]:
    """DSPy's ``thought_0, tool_name_0, …`` trajectory as a list of steps."""
    steps_ = prediction.get("trajectory") or {}
    return [{"thought": steps_.get(f"thought_{i}"), "tool": steps_.get(f"tool_name_{i}"),
             "args": steps_.get(f"tool_args_{i}"), "observation": steps_.get(f"observation_{i}")}
            for i in range(sum(1 for key in steps_ if key.startswith("thought_")))]
