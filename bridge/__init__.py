"""bridge: a DSPy worker for Erlang/Elixir hosts, speaking packet-4 msgpack frames over a port.

The public API for handler authors is small: ``handler`` to register a command,
``Context`` (the second argument of every handler), ``PeerError`` for errors the
host caused, and ``ToolError`` for a host tool's error answer.
"""

__version__ = "0.1.0"

from .context import Context, RequestClosed  # noqa: E402
from .protocol import PeerError  # noqa: E402
from .registry import handler  # noqa: E402
from .tools import ToolError  # noqa: E402

__all__ = ["Context", "PeerError", "RequestClosed", "ToolError", "__version__", "handler"]
