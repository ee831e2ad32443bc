"""bridge: a DSPy worker for Erlang/Elixir hosts, speaking packet-4 msgpack frames over a port.

The public API: ``handler`` registers a command, ``PeerError`` is an error the
host caused, ``ToolError`` a host tool's error answer; ``Worker``, ``Call`` and
``RemoteError`` are the Python host (loaded on first use, so the worker never
imports them).
"""

from typing import Any

__version__ = "0.1.0"

from bridge.wire.errors import PeerError, ToolError  # noqa: E402
from bridge.worker.registry import handler  # noqa: E402

__all__ = ["Call", "PeerError", "RemoteError", "ToolError", "Worker", "__version__", "handler"]
_HOST = ("Worker", "Call", "RemoteError")


def __getattr__(name: str) -> Any:
    if name in _HOST:
        from bridge.host import client

        return getattr(client, name)
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
