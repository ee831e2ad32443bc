"""The base of the offline engines: a DSPy 3.4 engine object that answers locally.

Engines are ``complete``/``stream`` objects on lm15 types, so calls, streaming,
callbacks and usage all take DSPy's real path.  DSPy is imported lazily.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

import anyio

if TYPE_CHECKING:
    from dspy.lm15 import Request, Response, Usage

_TOKENS = re.compile(r"\S+\s*|\s+")
_MARKER = re.compile(r"(\[\[ ## \w+ ## \]\])")


def int_option(options: dict[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    """Pop an integer engine option, checked."""
    value = options.pop(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ValueError(f"'{key}' must be an integer >= {minimum}")
    return value


def request_text(request: "Request") -> str:
    """Everything the model reads: the system prompt and every message."""
    system = request.system
    if system is not None and not isinstance(system, str):
        system = "".join(getattr(part, "text", "") or "" for part in system)
    return "\n".join([system or "", *(m.text or "" for m in request.messages)])


@dataclass(frozen=True, slots=True)
class Reply:
    """One planned answer: its full text, the pieces it streams as, and their timing.

    ``waits[i]`` is the time before piece ``i``.  A reply that does not ``end``
    (a recorded call that never finished) waits after its pieces until cancelled.
    """

    text: str
    pieces: list[str]
    waits: list[float]
    ends: bool = True


class OfflineEngine:
    """A sync DSPy engine that answers locally.  Subclasses implement ``reply_text``.

    ``token_delay_ms`` is the time each piece takes (before it is sent when
    streaming; all at once for ``complete``), so a slow model can be simulated.
    Pieces are words with their trailing whitespace, or ``chunk_chars``
    characters each; a ``[[ ## field ## ]]`` marker is always one piece.
    Usage counts whitespace-separated words.
    """

    def __init__(self, token_delay_ms: int | None = None, chunk_chars: int | None = None) -> None:
        self.delay = (token_delay_ms or 0) / 1000
        self.chunk_chars = chunk_chars
        self._ids = itertools.count(1)

    def reply_text(self, request: "Request", streaming: bool) -> str:
        raise NotImplementedError

    def plan(self, request: "Request", streaming: bool) -> Reply:
        text = self.reply_text(request, streaming)
        pieces = self.pieces(text)
        return Reply(text, pieces, [self.delay] * len(pieces))

    def pieces(self, text: str) -> list[str]:
        """``text`` as it streams: words (or ``chunk_chars`` slices), each field marker whole."""
        return [piece for part in _MARKER.split(text) for piece in self._split(part)]

    def _split(self, text: str) -> list[str]:
        """A field marker is one piece: DSPy's stream listener must see it within 10 pieces."""
        if _MARKER.fullmatch(text):
            return [text]
        if self.chunk_chars:
            return [text[i:i + self.chunk_chars] for i in range(0, len(text), self.chunk_chars)]
        return _TOKENS.findall(text)

    def response(self, request: "Request", reply: Reply) -> "Response":
        from dspy.lm15 import Message, Response, TextPart

        return Response(id=f"offline-{next(self._ids)}", model=request.model,
                        message=Message.assistant(TextPart(reply.text)), finish_reason="stop",
                        usage=self.usage(request, reply))

    @staticmethod
    def usage(request: "Request", reply: Reply) -> "Usage":
        from dspy.lm15 import Usage

        used_in, used_out = len(request_text(request).split()), len(reply.text.split())
        return Usage(input_tokens=used_in, output_tokens=used_out, total_tokens=used_in + used_out)

    def events(self, request: "Request", reply: Reply) -> tuple[Any, list[Any], Any]:
        """The lm15 stream of ``reply``: start event, one delta per piece, end event."""
        from dspy.lm15 import StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta

        return (StreamStartEvent(id=f"offline-{next(self._ids)}", model=request.model),
                [StreamDeltaEvent(delta=TextDelta(text=piece)) for piece in reply.pieces],
                StreamEndEvent(finish_reason="stop", usage=self.usage(request, reply)))

    # ---- the engine protocol (sync: DSPy's thread paths) -------------------------

    def complete(self, request: "Request") -> "Response":
        reply = self.plan(request, streaming=False)
        time.sleep(sum(reply.waits))
        if not reply.ends:
            threading.Event().wait()  # never set: the call ends when its request is abandoned
        return self.response(request, reply)

    def stream(self, request: "Request") -> Iterator[Any]:
        reply = self.plan(request, streaming=True)
        start, deltas, end = self.events(request, reply)
        yield start
        for wait, delta in zip(reply.waits, deltas):
            time.sleep(wait)
            yield delta
        if not reply.ends:
            threading.Event().wait()
        yield end

    def close(self) -> None:
        pass


class AsyncOfflineEngine:
    """The async twin DSPy's ``acall`` path needs; shares the sync engine's state."""

    def __init__(self, sync: OfflineEngine) -> None:
        self.sync = sync

    async def complete(self, request: "Request") -> "Response":
        reply = self.sync.plan(request, streaming=False)
        await anyio.sleep(sum(reply.waits))
        if not reply.ends:
            await anyio.sleep_forever()
        return self.sync.response(request, reply)

    async def stream(self, request: "Request") -> AsyncIterator[Any]:
        reply = self.sync.plan(request, streaming=True)
        start, deltas, end = self.sync.events(request, reply)
        yield start
        for wait, delta in zip(reply.waits, deltas):
            await anyio.sleep(wait)
            yield delta
        if not reply.ends:
            await anyio.sleep_forever()
        yield end

    async def aclose(self) -> None:
        pass
