"""Recording every LM call DSPy makes, whatever the LM: a hook on DSPy 3.4's engine selection.

DSPy 3.4 runs every call of every ``dspy.LM`` (a native lm15 provider, LiteLLM,
or a custom engine such as ``scripted/``) through ``dspy.clients.execution``,
which picks the engine object for the call with ``_engine(lm, call, asynchronous)``
and then calls its ``complete``/``stream`` (lm15 requests) or ``complete_legacy``
(LiteLLM's compatibility path).  Wrapping the engine returned there sees the
exact request, the completion, and each stream delta as it arrives.  DSPy's
``on_lm_start``/``on_lm_end`` callbacks would see no deltas.  A call DSPy
answers from its cache never reaches an engine, so it is not recorded.

Imports DSPy: ``install`` runs in the warm-up, after DSPy's import.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

from bridge.observe.current import REQUEST


class Recorder(Protocol):
    """Where LM calls are written: ``bridge.transcripts.recorder.Recorder``, installed at start-up."""

    open_calls: set[Any]

    def now(self) -> float: ...

    def lm(self, t: float, call: dict[str, Any]) -> None: ...


def install(recorder: Recorder) -> None:
    """Record every LM call of this process into ``recorder``."""
    from dspy.clients import execution

    select = execution._engine
    if getattr(select, "recorder", None) is not None:
        return

    def recording_engine(lm: Any, call: Any, asynchronous: bool) -> tuple[Any, Any, Any]:
        backend, request, provider = select(lm, call, asynchronous)
        wrapper = AsyncRecordingEngine if asynchronous else RecordingEngine
        return wrapper(backend, recorder, lm.model), request, provider

    recording_engine.recorder = recorder  # type: ignore[attr-defined]
    execution._engine = recording_engine


# ---- requests as recorded (and matched on replay) ----------------------------------------

def request_record(request: Any) -> dict[str, Any]:
    """An lm15 request as ``{"messages": [{role, content}], "config"?, "tools"?}``; the system
    prompt is the first message.  Non-text parts are kept whole in ``parts``."""
    from dspy._vendor.lm15.serde import request_to_dict

    data = request_to_dict(request)
    messages = [] if request.system is None else [_message("system", request.system)]
    messages += [_message(m.role, m.parts) for m in request.messages]
    return {"messages": messages, **{k: data[k] for k in ("config", "tools") if data.get(k)}}


def legacy_record(legacy: dict[str, Any]) -> dict[str, Any]:
    """A LiteLLM-path request (OpenAI-shaped messages) in the same shape; never its credentials."""
    from dspy.clients.backend_selection import CLIENT_KEYS

    messages = [_legacy_message(m) for m in legacy.get("messages") or []]
    config = {k: _plain(v) for k, v in legacy.items() if k not in CLIENT_KEYS | {"model", "messages"}}
    return {"messages": messages, **({"config": config} if config else {})}


def described(describe: Callable[[Any], dict[str, Any]], request: Any) -> dict[str, Any]:
    """``describe(request)``; recording must not fail the call, so a request it cannot
    describe is recorded as such (and will not match on replay)."""
    try:
        return describe(request)
    except Exception as exc:
        return {"messages": [], "unrecordable": f"{type(exc).__name__}: {exc}"}


def request_key(record: dict[str, Any]) -> str:
    """What replay matches on: the messages, exactly (not the model or the settings)."""
    return json.dumps(record["messages"], sort_keys=True, ensure_ascii=False)


def _message(role: str, parts: Any) -> dict[str, Any]:
    from dspy._vendor.lm15.serde import part_to_dict

    if isinstance(parts, str):
        return {"role": role, "content": parts}
    texts = [p.text for p in parts if getattr(p, "type", None) == "text"]
    message: dict[str, Any] = {"role": role, "content": "".join(texts)}
    if len(texts) != len(parts):
        message["parts"] = [part_to_dict(p) for p in parts]
    return message


def _legacy_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return {"role": message.get("role"), "content": content or ""}
    texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    out: dict[str, Any] = {"role": message.get("role"), "content": "".join(texts)}
    if len(texts) != len(content):
        out["parts"] = _plain(content)
    return out


def _plain(value: Any) -> Any:
    """JSON as is, else its repr (a pydantic ``response_format`` class, say)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


# ---- one call ----------------------------------------------------------------------------

class LMCall:
    """One LM call being recorded.  Written once, when it ends, or at exit as ``incomplete``.

    ``incomplete`` marks a call whose answer the worker never used: it was
    cancelled, or it ended after its request had already ended (an abandoned
    worker thread).  Replay answers such a call never, so a cancel or timeout
    happens again where it happened.
    """

    def __init__(self, recorder: Recorder, model: str, request: dict[str, Any]) -> None:
        self.recorder = recorder
        self.t = recorder.now()
        self.ctx = REQUEST.get()
        self.model = model
        self.request = request
        self.deltas: list[list[Any]] = []
        self.outcome: dict[str, Any] = {}  # "response" or "error", and "usage"
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._done = False
        recorder.open_calls.add(self)

    def delta(self, text: str) -> None:
        self.deltas.append([round(time.monotonic() - self._started, 6), text])

    def observe(self, event: Any) -> None:
        """One lm15 stream event: text deltas with their time, usage at the end, error events."""
        if event.type == "delta" and getattr(event.delta, "type", None) == "text":
            self.delta(event.delta.text)
        elif event.type == "end" and event.usage is not None:
            from dspy._vendor.lm15.serde import usage_to_dict

            self.outcome["usage"] = usage_to_dict(event.usage)
        elif event.type == "error":
            from dspy.clients.engines.stream_guard import error_from_event

            self.fail(error_from_event(event))

    def finish(self, text: str | None = None, usage: dict[str, Any] | None = None) -> None:
        if text is not None:
            self.outcome["response"] = text
        if usage:
            self.outcome["usage"] = usage
        self._end(incomplete=self.ctx is not None and self.ctx.closed)

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            self.outcome["error"] = error_record(exc)
        self._end(incomplete=not isinstance(exc, Exception))  # cancelled, or the stream was closed

    def abandon(self) -> None:
        self._end(incomplete=True)

    def _end(self, incomplete: bool) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self.recorder.open_calls.discard(self)
        self.recorder.lm(self.t, self.as_record(incomplete))

    def as_record(self, incomplete: bool) -> dict[str, Any]:
        """``{model, id?, request, response | error, deltas?, usage?, elapsed, incomplete?}``"""
        record: dict[str, Any] = {"model": self.model}
        if self.ctx is not None:
            record["id"] = self.ctx.id
        record["request"] = self.request
        outcome = self.outcome
        if "error" in outcome:
            record["error"] = outcome["error"]
        else:
            record["response"] = outcome.get("response", "".join(t for _, t in self.deltas))
        if self.deltas:
            record["deltas"] = self.deltas
        if outcome.get("usage"):
            record["usage"] = outcome["usage"]
        record["elapsed"] = round(time.monotonic() - self._started, 6)
        if incomplete:
            record["incomplete"] = True
        return record


_ERROR_FIELDS = ("message", "code", "provider", "provider_code", "status", "request_id", "retry_after", "model",
                 "env_keys", "credential_hint", "credential_origin", "feature")


def error_record(exc: Exception) -> dict[str, Any]:
    """``{type, message, fields?}``: an lm15 error's fields (provider, HTTP status…) are kept, so
    replay rebuilds the same error, whose text DSPy composes from them."""
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    fields = {name: _plain(value) for name in _ERROR_FIELDS if (value := getattr(exc, name, None)) is not None}
    headers = getattr(exc, "rate_limit_headers", None)
    if headers:
        fields["rate_limit_headers"] = {k: list(v) for k, v in headers.items()}
    if fields:
        record["fields"] = fields
    return record


def _usage(response: Any) -> dict[str, Any]:
    from dspy._vendor.lm15.serde import usage_to_dict

    return usage_to_dict(response.usage) if response.usage is not None else {}


def _legacy_text(result: Any) -> str:
    output = result.outputs[0] if result.outputs else ""
    return output.get("text") or "" if isinstance(output, dict) else str(output)


class _Tee:
    """The LiteLLM path sends its chunks to ``settings.send_stream`` itself: note their text on the way."""

    def __init__(self, stream: Any, call: LMCall) -> None:
        self._stream = stream
        self._call = call

    async def send(self, chunk: Any) -> None:
        try:
            text = chunk.choices[0].delta.content
        except (AttributeError, IndexError, TypeError):
            text = None
        if text:
            self._call.delta(text)
        await self._stream.send(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def _teed(call: LMCall) -> Iterator[None]:
    import dspy

    stream = dspy.settings.send_stream
    if stream is None:
        yield
        return
    with dspy.settings.context(send_stream=_Tee(stream, call)):
        yield


# ---- the engine wrappers -------------------------------------------------------------------

@contextmanager
def _failing(call: LMCall) -> Iterator[None]:
    """An exception, a cancellation or a closed stream ends the call's record, then goes on."""
    try:
        yield
    except BaseException as exc:
        call.fail(exc)
        raise


class RecordingEngine:
    """Wraps the engine DSPy chose for one sync call; everything else passes through."""

    def __init__(self, inner: Any, recorder: Recorder, model: str) -> None:
        self.inner = inner
        self.recorder = recorder
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _begin(self, describe: Callable[[Any], dict[str, Any]], request: Any) -> LMCall:
        return LMCall(self.recorder, self.model, described(describe, request))

    def complete(self, request: Any) -> Any:
        call = self._begin(request_record, request)
        with _failing(call):
            response = self.inner.complete(request)
        call.finish(response.text or "", _usage(response))
        return response

    def stream(self, request: Any) -> Iterator[Any]:
        from dspy.clients.engines.lifecycle import closing_stream

        call = self._begin(request_record, request)
        with _failing(call), closing_stream(self.inner.stream(request)) as events:
            for event in events:
                call.observe(event)
                yield event
        call.finish()

    def complete_legacy(self, lm: Any, legacy: dict[str, Any], **context: Any) -> Any:
        call = self._begin(legacy_record, legacy)
        with _failing(call), _teed(call):
            result = self.inner.complete_legacy(lm, legacy, **context)
        call.finish(_legacy_text(result), result.usage)
        return result


class AsyncRecordingEngine(RecordingEngine):
    """The async twin, for DSPy's ``acall`` path."""

    async def complete(self, request: Any) -> Any:  # type: ignore[override]
        call = self._begin(request_record, request)
        with _failing(call):
            response = await self.inner.complete(request)
        call.finish(response.text or "", _usage(response))
        return response

    async def stream(self, request: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        from dspy.clients.engines.lifecycle import aclosing_stream

        call = self._begin(request_record, request)
        with _failing(call):
            async with aclosing_stream(self.inner.stream(request)) as events:
                async for event in events:
                    call.observe(event)
                    yield event
        call.finish()

    async def complete_legacy(self, lm: Any, legacy: dict[str, Any], **context: Any) -> Any:  # type: ignore[override]
        call = self._begin(legacy_record, legacy)
        with _failing(call), _teed(call):
            result = await self.inner.complete_legacy(lm, legacy, **context)
        call.finish(_legacy_text(result), result.usage)
        return result
