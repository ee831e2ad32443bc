"""A local OpenAI-compatible LM server for the tests and the bench: 127.0.0.1 only.

``POST /v1/chat/completions`` answers as the scripted engine would
(``bridge.lm.scripted``: the same prompt reading and the same formatter), as
JSON or as SSE token by token, with ``usage`` (and the usage chunk of
``stream_options.include_usage``).  Each model the tests ``add`` has its script,
its pacing (``token_delay_ms``, ``first_byte_ms``), an optional API key it
requires, and a queue of faults that the next requests get: ``500``, ``429``
(with ``Retry-After``), ``bad_json``, ``bad_sse`` (a malformed ``data:`` line),
``drop`` (the connection closed mid-reply).

One asyncio loop in a daemon thread serves every connection (backlog 2048,
so hundreds connect at once).  Every request, every reply, every client
disconnect before the reply ended (``disconnect``), every reply the server cut
(``dropped``) and any failure of the server itself (``server_error``) goes to
``log`` with its ``time.monotonic()``; tests wait on it with ``wait_for``.  A
``reply`` is logged just before the reply's last bytes are written, so a client
that has read a whole reply finds it in the log.  Replies carry ``Connection:
close``: one request per connection, so a closed connection always means a
closed request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from bridge.lm.scripted import Prompt, ScriptedEngine, chat_text

FAULTS = ("500", "429", "bad_json", "bad_sse", "drop")
BACKLOG = 2048


@dataclass
class Model:
    """One model the server serves: replies from a script, paced, with faults on demand."""

    engine: ScriptedEngine
    token_delay_ms: float = 0.0
    first_byte_ms: float = 0.0
    key: str | None = None
    faults: deque[str] = field(default_factory=deque)


class Disconnected(Exception):
    """The client closed its connection before the reply ended."""


class LMServer:
    """``with LMServer() as server: server.add("m", [{"answer": "42"}]); server.url``"""

    def __init__(self) -> None:
        self.models: dict[str, Model] = {}
        self.log: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---- control, from the test's thread ----------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def add(self, name: str, script: list[Any], *, token_delay_ms: float = 0.0, first_byte_ms: float = 0.0,
            key: str | None = None) -> Model:
        model = Model(ScriptedEngine(script), token_delay_ms, first_byte_ms, key)
        self.models[name] = model
        return model

    def fault(self, name: str, *kinds: str) -> None:
        """The next ``len(kinds)`` requests for model ``name`` get these faults, in order."""
        assert all(kind in FAULTS for kind in kinds), kinds
        self.models[name].faults.extend(kinds)

    def events(self, kind: str, model: str | None = None) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.log if e["event"] == kind and (model is None or e.get("model") == model)]

    def wait_for(self, test: Callable[[list[dict[str, Any]]], Any], timeout: float = 10.0) -> Any:
        """Block until ``test(log)`` is truthy (returns it) or fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (found := test(self.log)):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting on the LM server's log: {self.log[-5:]}"
                self._changed.wait(left)
        return found

    def start(self) -> "LMServer":
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="lmserver", daemon=True)
        self._thread.start()
        ready.wait(10)
        assert self.port, "the LM server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "LMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- the server, on its own loop ----------------------------------------------------

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=BACKLOG))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()
        self._server.close()
        self._loop.close()

    def _note(self, event: str, **data: Any) -> None:
        with self._changed:
            self.log.append({"event": event, "t": time.monotonic(), **data})
            self._changed.notify_all()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()
            return
        self._requests += 1
        n = self._requests
        eof = asyncio.ensure_future(reader.read(1))  # b"" when the client closes its side
        reply = asyncio.ensure_future(self._reply(n, line, headers, body, writer))
        await asyncio.wait([eof, reply], return_when=asyncio.FIRST_COMPLETED)
        if not reply.done():
            reply.cancel()
            self._note("disconnect", n=n, model=self._model_of(body))
        elif (exc := reply.exception()) is not None:  # a fault that cut the reply, or a bug here
            self._note("dropped" if isinstance(exc, Disconnected) else "server_error", n=n,
                       model=self._model_of(body), error=repr(exc))
        eof.cancel()
        writer.close()

    @staticmethod
    def _model_of(body: bytes) -> str | None:
        try:
            return json.loads(body).get("model")
        except ValueError:
            return None

    async def _reply(self, n: int, line: str, headers: dict[str, str], raw: bytes,
                     writer: asyncio.StreamWriter) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            return await self._error(writer, 400, "the request body is not JSON")
        name = body.get("model")
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._note("request", n=n, model=name, path=line.split(" ")[1] if " " in line else line, stream=stream,
                   include_usage=include_usage, auth=headers.get("authorization"),
                   stream_options="stream_options" in body)
        model = self.models.get(name)
        if not line.startswith("POST /v1/chat/completions "):
            return await self._error(writer, 404, f"no such endpoint: {line}")
        if model is None:
            return await self._error(writer, 404, f"The model `{name}` does not exist")
        if model.key is not None and headers.get("authorization") != f"Bearer {model.key}":
            return await self._error(writer, 401, "Incorrect API key provided")
        fault = model.faults.popleft() if model.faults else None
        if fault == "500":
            return await self._error(writer, 500, "The server had an error while processing your request")
        if fault == "429":
            return await self._error(writer, 429, "Rate limit reached", {"Retry-After": "1"})
        await asyncio.sleep(model.first_byte_ms / 1000)
        prompt = Prompt.from_chat(body.get("messages") or [])
        try:
            text = model.engine.answer(prompt, stream)
        except Exception as exc:  # the script ran out
            return await self._error(writer, 400, str(exc))
        used_in = sum(len(chat_text(m).split()) for m in body.get("messages") or [])
        usage = {"prompt_tokens": used_in, "completion_tokens": len(text.split()),
                 "total_tokens": used_in + len(text.split())}
        def replied() -> None:  # logged before the reply's last bytes: a client that has them sees it here
            self._note("reply", n=n, model=name, usage=usage, stream=stream, fault=fault)

        if stream:
            await self._stream(n, name, model, text, usage if include_usage else None, fault, writer, replied)
        else:
            await asyncio.sleep(model.token_delay_ms * len(model.engine.pieces(text)) / 1000)
            await self._json(n, name, text, usage, fault, writer, replied)

    async def _error(self, writer: asyncio.StreamWriter, status: int, message: str,
                     extra: dict[str, str] | None = None) -> None:
        payload = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                        "invalid_request_error", "code": status}}).encode()
        self._head(writer, status, "application/json", {"Content-Length": str(len(payload)), **(extra or {})})
        writer.write(payload)
        await writer.drain()

    @staticmethod
    def _head(writer: asyncio.StreamWriter, status: int, content_type: str, extra: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", "Connection: close",
                 *(f"{k}: {v}" for k, v in extra.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def _json(self, n: int, name: str, text: str, usage: dict[str, int], fault: str | None,
                    writer: asyncio.StreamWriter, replied: Callable[[], None]) -> None:
        payload = json.dumps({"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                              "model": name, "usage": usage,
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}]}).encode()
        if fault in ("bad_json", "bad_sse"):
            payload = payload[: len(payload) // 2]
        self._head(writer, 200, "application/json", {"Content-Length": str(len(payload))})
        if fault == "drop":
            writer.write(payload[: len(payload) // 2])
            await writer.drain()
            raise Disconnected  # ends the connection mid-body
        replied()
        writer.write(payload)
        await writer.drain()

    async def _stream(self, n: int, name: str, model: Model, text: str, usage: dict[str, int] | None,
                      fault: str | None, writer: asyncio.StreamWriter, replied: Callable[[], None]) -> None:
        self._head(writer, 200, "text/event-stream", {"Transfer-Encoding": "chunked"})

        async def send(data: str) -> None:
            event = f"data: {data}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return json.dumps({"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "model": name,
                               "created": int(time.time()),
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        pieces = model.engine.pieces(text)
        for i, piece in enumerate(pieces):
            await asyncio.sleep(model.token_delay_ms / 1000)
            if fault == "bad_sse" and i == 1:
                await send('{"id": broken')
            if fault == "drop" and i == len(pieces) // 2:
                raise Disconnected
            await send(chunk({"role": "assistant", "content": piece} if i == 0 else {"content": piece}))
        replied()
        await send(chunk({}, "stop"))
        if usage is not None:
            await send(json.dumps({"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "model": name,
                                   "created": int(time.time()), "choices": [], "usage": usage}))
        await send("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

