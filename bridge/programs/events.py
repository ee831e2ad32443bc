"""Events that tools and callbacks publish into a run's chunk stream, in order with its tokens.

Apart from ``streaming`` so that ReAct (which publishes) and streaming (which
relays) share it without importing each other.  Imports DSPy: after warm-up only.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import anyio
import dspy

Emit = Callable[[dict[str, Any]], Awaitable[None]]


class Published:
    """An event a tool or callback publishes into the token stream, to keep its place among the tokens."""

    __slots__ = ("event", "delivered")

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        self.delivered = anyio.Event()


async def publish(event: dict[str, Any], emit: Emit) -> None:
    """Emit ``event`` in order with the run's tokens: through the stream while one is open, else directly.

    Returns once the event is out, so what the caller does next (a tool call's
    ``rpc_request``) reaches the host after it, as it does without streaming.
    """
    stream = dspy.settings.send_stream
    if stream is None:
        await emit(event)
        return
    item = Published(event)
    await stream.send(item)
    await item.delivered.wait()
