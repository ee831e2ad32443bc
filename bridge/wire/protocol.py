"""Protocol v1, sans-I/O: frame maps in, typed events out; outgoing frame maps built here.

Everything the peer can get wrong is caught here and returned as a ``Rejected``
event carrying the error frame to send, so the server never has to guess which
side caused an error.  See ``docs/protocol.md`` for the full contract.
"""

from __future__ import annotations

import reprlib
from typing import Any, NamedTuple

from bridge.wire.errors import ErrorType, PeerError

PROTOCOL_VERSION = 1
QUOTE_BYTES = 200  # a host value quoted in an error is cut to this many bytes, then "…"
MESSAGE_BYTES = 2048  # the most of an error message; a traceback gets eight times as much

RequestId = int | str


class Request(NamedTuple):
    id: RequestId
    command: str
    args: dict
    session_id: str | None = None
    timeout_ms: int | None = None
    window: int | None = None
    telemetry: bool = False


class Cancel(NamedTuple):
    id: RequestId


class Credit(NamedTuple):
    id: RequestId
    n: int


class RpcResponse(NamedTuple):
    rpc_id: RequestId
    ok: bool
    result: Any = None
    error: dict | None = None  # {"type", "message"} when not ok


class Shutdown(NamedTuple):
    """Stop accepting requests; drain; exit 0."""


class Rejected(NamedTuple):
    """A frame the peer got wrong; ``frame`` is the error frame to answer with."""

    frame: dict


Event = Request | Cancel | Credit | RpcResponse | Shutdown | Rejected


def int_arg(args: dict, name: str, default: int | None = None, minimum: int = 0) -> int:
    """A handler's integer argument, checked: anything else is the host's ``bad_request``."""
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PeerError(ErrorType.BAD_REQUEST, f"'{name}' must be an integer >= {minimum}")
    return value


ID_MIN, ID_MAX = -2**63, 2**64 - 1  # what msgpack carries as an integer: int64 and uint64
ID_MAX_BYTES = 256
ID_RULE = f"an int in [-2**63, 2**64 - 1] (not a bool) or a str of at most {ID_MAX_BYTES} bytes"


def is_id(value: Any) -> bool:
    """An id of a request or a host call: decoded msgpack gives exact ``int`` and ``str`` only
    (never a subclass; ``bool`` is another type), so exact type checks are both fast and strict."""
    kind = type(value)
    if kind is int:
        return ID_MIN <= value <= ID_MAX
    return kind is str and (len(value) <= ID_MAX_BYTES // 4 or len(value.encode()) <= ID_MAX_BYTES)


def _bad_id(frame: str, field: str, value: Any) -> Rejected:
    return Rejected(error(None, ErrorType.BAD_FRAME, f"{frame} '{field}' must be {ID_RULE}",
                         {"field": field, "value": _shown(value)}))


def _shown(value: Any) -> Any:
    """A bad value as the error's details show it: short scalars as they are, anything else as a short repr."""
    if type(value) in (int, str, bool, float) or value is None:
        return value if not isinstance(value, str) or len(value) <= 64 else value[:64] + "…"
    text = repr(value)
    return text if len(text) <= 64 else text[:64] + "…"


def _bad_int(value: Any, minimum: int) -> bool:
    return value is not None and (type(value) is not int or value < minimum)


def _parse_request(body: dict) -> Request | Rejected:
    """Check a request's fields; on the hot path, so the common case is a few dict lookups."""
    rid = body.get("id")
    if not (type(rid) is int and ID_MIN <= rid <= ID_MAX or is_id(rid)):  # the common int id without a call
        return Rejected(error(None, ErrorType.BAD_REQUEST, f"request 'id' must be {ID_RULE}",
                              {"field": "id", "value": _shown(rid)}))
    command = body.get("command")
    if type(command) is not str:
        return Rejected(error(rid, ErrorType.BAD_REQUEST, "request 'command' must be a str"))
    args = body.get("args")
    if args is None:
        args = {}
    elif type(args) is not dict:
        return Rejected(error(rid, ErrorType.BAD_REQUEST, "request 'args' must be a map"))
    session_id = body.get("session_id")
    if session_id is not None and not (type(session_id) is str and session_id and is_id(session_id)):
        return Rejected(error(rid, ErrorType.BAD_REQUEST,
                              f"request 'session_id' must be a non-empty str of at most {ID_MAX_BYTES} bytes",
                              {"field": "session_id", "value": _shown(session_id)}))
    timeout_ms, window = body.get("timeout_ms"), body.get("window")
    if timeout_ms is not None and _bad_int(timeout_ms, 0):
        return Rejected(error(rid, ErrorType.BAD_REQUEST, "'timeout_ms' must be an integer >= 0"))
    if window is not None and _bad_int(window, 1):
        return Rejected(error(rid, ErrorType.BAD_REQUEST, "'window' must be an integer >= 1"))
    # ``tuple.__new__`` directly: a NamedTuple's own ``__new__`` is one more Python call per request
    return _new_tuple(Request, (rid, command, args, session_id, timeout_ms, window, body.get("telemetry") is True))


_new_tuple = tuple.__new__


def parse(body: dict) -> Event:
    """Turn one decoded frame map into a typed event, or a ``Rejected`` for bad input."""
    kind = body.get("type")
    if kind == "request":
        return _parse_request(body)
    if kind == "cancel":
        rid = body.get("id")
        return Cancel(rid) if is_id(rid) else _bad_id("cancel", "id", rid)
    if kind == "rpc_response":
        return _parse_rpc_response(body)
    if kind == "credit":
        rid, n = body.get("id"), body.get("n")
        if not is_id(rid):
            return _bad_id("credit", "id", rid)
        if type(n) is not int or n < 1:
            return Rejected(error(None, ErrorType.BAD_FRAME, "credit 'n' must be an integer >= 1"))
        return Credit(rid, n)
    if kind == "shutdown":
        return Shutdown()
    if kind is None:
        return Rejected(error(None, ErrorType.BAD_FRAME, "frame has no 'type'"))
    return Rejected(error(None, ErrorType.BAD_FRAME, f"unknown frame type {quote(kind)}",
                          {"type": kind if isinstance(kind, str) else quote(kind)}))


def _parse_rpc_response(body: dict) -> RpcResponse | Rejected:
    ok = body.get("ok")
    if not isinstance(ok, bool) or "rpc_id" not in body:
        return Rejected(error(None, ErrorType.BAD_FRAME, "rpc_response needs 'rpc_id' and a boolean 'ok'"))
    rpc_id = body["rpc_id"]
    if not (type(rpc_id) is int and ID_MIN <= rpc_id <= ID_MAX or is_id(rpc_id)):  # our int ids without a call
        return _bad_id("rpc_response", "rpc_id", rpc_id)
    err = body.get("error")
    if not ok and not isinstance(err, dict):
        err = {"type": "tool_error", "message": repr(err)}
    return _new_tuple(RpcResponse, (rpc_id, ok, body.get("result"), err))  # a host call's hot path


# ---- worker -> host frames -------------------------------------------------------

def ready(version: str, pid: int, commands: list[str], capabilities: list[str]) -> dict:
    return {"type": "ready", "protocol": PROTOCOL_VERSION, "version": version, "pid": pid,
            "commands": commands, "capabilities": capabilities}


def chunk(rid: RequestId, seq: int, data: Any) -> dict:
    return {"type": "chunk", "id": rid, "seq": seq, "data": data}


def result(rid: RequestId, data: Any, meta: dict | None = None) -> dict:
    frame = {"type": "result", "id": rid, "data": data}
    if meta is not None:
        frame["meta"] = meta
    return frame


def error(rid: RequestId | None, type: str, message: str, details: dict | None = None,
          traceback: str | None = None, meta: dict | None = None) -> dict:
    """An error frame, bounded whatever it quotes: the message to ``MESSAGE_BYTES``, each string
    or binary in ``details`` to ``QUOTE_BYTES`` (``details.length``: the first one's original size)."""
    err: dict[str, Any] = {"type": type, "message": cut(message, MESSAGE_BYTES)}
    if details is not None:
        err["details"] = _bounded(details)
    if traceback is not None:
        err["traceback"] = cut(traceback, 8 * MESSAGE_BYTES)
    frame = {"type": "error", "id": rid, "error": err}
    if meta is not None:
        frame["meta"] = meta
    return frame


def byte_size(value: str | bytes) -> int:
    return len(value) if isinstance(value, bytes) else len(value.encode("utf-8", "surrogatepass"))


def cut(value: Any, limit: int = QUOTE_BYTES) -> Any:
    """A string or binary of at most ``limit`` bytes (UTF-8), then ``…``; anything else as is."""
    if isinstance(value, bytes):
        return value if len(value) <= limit else value[:limit] + "…".encode()
    if not isinstance(value, str) or len(value) * 4 <= limit or byte_size(value) <= limit:
        return value
    return value[:limit].encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore") + "…"


class _Quoter(reprlib.Repr):
    """``reprlib`` with binaries sliced before their repr is built (it would repr them whole)."""

    def repr_bytes(self, value: bytes, level: int) -> str:
        return repr(value[:self.maxstring]) + ("…" if len(value) > self.maxstring else "")

    def repr_ExtType(self, value: Any, level: int) -> str:  # msgpack's extension type
        return f"ExtType({value.code}, {self.repr_bytes(value.data, level)})"


_REPR = _Quoter()
_REPR.maxstring = _REPR.maxother = QUOTE_BYTES
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 8, 8


def quote(value: Any) -> str:
    """A host value for an error message: its repr, built bounded and cut to ``QUOTE_BYTES``."""
    return cut(_REPR.repr(value))


def _bounded(details: dict) -> dict:
    out, length = {}, None
    for key, value in details.items():
        if isinstance(value, (str, bytes)) and (short := cut(value)) is not value:
            length = byte_size(value) if length is None else length
            value = short
        out[key] = value
    if length is not None:
        out.setdefault("length", length)
    return out


def rpc_request(rpc_id: int, rid: RequestId, tool: str, args: list, kwargs: dict,
                timeout_ms: int | None) -> dict:
    return {"type": "rpc_request", "rpc_id": rpc_id, "id": rid, "tool": tool, "args": args,
            "kwargs": kwargs, "timeout_ms": timeout_ms}


def telemetry(rid: RequestId, event: str, measurements: dict, metadata: dict) -> dict:
    return {"type": "telemetry", "id": rid, "event": event, "measurements": measurements, "metadata": metadata}


def rpc_cancel(rpc_id: int) -> dict:
    return {"type": "rpc_cancel", "rpc_id": rpc_id}
