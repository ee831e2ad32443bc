"""Token and status streaming for one program call, owned by the request's handler.

This is ``dspy.streamify`` rebuilt inside the handler: the program runs with
``acall`` under ``dspy.context(send_stream=…, stream_listeners=…, callbacks=…)``
in a task group the handler owns, so cancelling the request cancels the program
cleanly (breaking out of streamify's generator does not).  Status comes from
our own callback, which never blocks: DSPy's StatusMessageProvider sends with a
blocking call into a 16-item buffer and deadlocks the loop when the host is slow.

Imports DSPy at module level: load it only after warm-up.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import anyio
import dspy
from dspy.streaming import StatusMessage, StreamListener
from dspy.streaming.streaming_listener import find_predictor_for_stream_listeners
from dspy.utils.callback import BaseCallback

from bridge.programs.events import Emit, Published
from bridge.programs.program import Program, field_text

BUFFER = 64  # token items between the LM and the host; beyond it DSPy's ``await send`` waits


def status(message: str) -> dict[str, Any]:
    return {"event": "status", "message": message}


def token(field: str, text: str, predictor: str | None) -> dict[str, Any]:
    return {"event": "token", "field": field, "text": text, "predictor": predictor}


class StatusCallback(BaseCallback):
    """Module and LM start/end as status chunks.

    DSPy calls it synchronously on the thread running the program — the event
    loop, on the ``acall`` path — so ``post`` must not block.
    """

    def __init__(self, post: Callable[[StatusMessage], None]) -> None:
        self._post = post
        self._names: dict[str, str] = {}

    def _start(self, call_id: str, name: str) -> None:
        self._names[call_id] = name
        self._post(StatusMessage(f"{name} started"))

    def _end(self, call_id: str, exception: BaseException | None) -> None:
        name = self._names.pop(call_id, "call")
        self._post(StatusMessage(f"{name} failed: {exception}" if exception else f"{name} finished"))

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start(call_id, type(instance).__name__)

    def on_module_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        self._end(call_id, exception)

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start(call_id, f"LM {getattr(instance, 'model', type(instance).__name__)}")

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        self._end(call_id, exception)


def listeners_for(program: Program, fields: Any) -> dict[int, list[StreamListener]]:
    """One listener per field (default: every output field), keyed by the id of the predictor writing it.

    Listeners allow reuse: ReAct runs its predictor once per step.  Unknown fields
    are checked here: DSPy 3.4.1's lookup fails on them with a TypeError.
    """
    known = program.output_fields()
    fields = known if fields is None else fields
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise ValueError("'fields' must be a list of output field names")
    unknown = set(fields) - set(known)
    if unknown:
        raise ValueError(f"'fields' names no output field: {sorted(unknown)}; outputs are {known}")
    return find_predictor_for_stream_listeners(program.module,
                                               [StreamListener(signature_field_name=f, allow_reuse=True)
                                                for f in fields])


async def stream_program(program: Program, inputs: dict[str, Any], lm: Any,
                         routes: dict[int, list[StreamListener]], emit: Emit) -> dspy.Prediction:
    """Run ``program`` once, emitting token and status chunks as they happen; return its prediction.

    A field that streamed no token (a cached reply, or one delivered in a single
    chunk) is sent whole as one token chunk at the end, so its token chunks
    still concatenate to its final value.
    """
    listeners = [listener for group in routes.values() for listener in group]
    send, receive = anyio.create_memory_object_stream[Any](BUFFER)
    outcome: dict[str, Any] = {}
    streamed: set[str] = set()

    def post(item: StatusMessage) -> None:
        """Status is best effort: a callback must not block, so a full buffer drops it."""
        try:
            send.send_nowait(item)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def run() -> None:
        async with send:
            callbacks = [*dspy.settings.callbacks, StatusCallback(post)]
            try:
                # track_usage makes DSPy's LiteLLM path ask for stream_options.include_usage
                # (lm15 asks by itself): exact usage instead of LiteLLM's estimate.
                with dspy.context(lm=lm, send_stream=send, stream_listeners=listeners, callbacks=callbacks,
                                  track_usage=getattr(lm, "bridge_stream_usage", True)):
                    outcome["prediction"] = await program.module.acall(**inputs)
            except Exception as exc:  # re-raised below, outside the task group
                outcome["error"] = exc

    async def forward(response: Any) -> None:
        if response is not None and response.chunk:
            streamed.add(response.signature_field_name)
            await emit(token(response.signature_field_name, response.chunk, response.predict_name))

    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(run)
        async for item in receive:
            if isinstance(item, StatusMessage):
                await emit(status(item.message))
            elif isinstance(item, Published):
                await emit(item.event)
                item.delivered.set()
            else:
                for listener in routes.get(getattr(item, "predict_id", None), ()):
                    await forward(listener.receive(item))
    if "error" in outcome:
        raise outcome["error"]
    prediction = outcome["prediction"]
    for listener in listeners:
        await forward(listener.finalize())
        field = listener.signature_field_name
        if field not in streamed and prediction.get(field) is not None:
            await emit(token(field, field_text(prediction[field]), listener.predict_name))
    return prediction


class Relay:
    """A request context whose chunks pass through ``transform`` first.

    A pipeline step's chunks carry its path, and an OpenAI-format stream reshapes
    its tokens, while ``run``, ReAct and ``stream_program`` stay unchanged:
    everything but ``emit`` is the request's own context.
    """

    __slots__ = ("_ctx", "_transform")

    def __init__(self, ctx: Any, transform: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._ctx = ctx
        self._transform = transform

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Relay.__slots__:
            object.__setattr__(self, name, value)
        else:  # the request's own state (``meta``'s counters)
            setattr(self._ctx, name, value)

    async def emit(self, data: Any) -> None:
        await self._ctx.emit(self._transform(data))


FORMATS = ("dspy", "openai")


class OpenAIChunks:
    """Token chunks as OpenAI ``chat.completion.chunk`` objects, for hosts that forward a stream
    to an OpenAI-style client.  Other chunks (status, ReAct steps) pass through unchanged."""

    def __init__(self, request_id: Any, model: str) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.started = False

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def __call__(self, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") != "token":
            return event
        delta = {"content": event["text"]} if self.started else {"role": "assistant", "content": event["text"]}
        self.started = True
        return {**self.chunk(delta), "field": event["field"]}

    def finish(self) -> dict[str, Any]:
        """The last chunk: an empty delta with ``finish_reason: "stop"``."""
        return self.chunk({}, "stop")
