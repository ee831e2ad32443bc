"""Every ``error.type`` the worker sends, with its meaning, and every exception class that
crosses a module boundary.  ``docs/protocol.md`` lists the same types (a test checks it).

Peer-caused types come first: the host can fix them by sending something else.
"""

from __future__ import annotations

from typing import Any


class ErrorType:
    """The ``error.type`` strings; ``MEANINGS`` holds one line about each."""

    # caused by the host's frames
    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    UNKNOWN_COMMAND = "unknown_command"
    DUPLICATE_ID = "duplicate_id"
    FRAME_TOO_LARGE = "frame_too_large"
    SHUTTING_DOWN = "shutting_down"
    OVERLOADED = "overloaded"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    # caused by a handler or by the worker
    HANDLER_ERROR = "handler_error"
    TOOL_ERROR = "tool_error"
    # raised by the built-in commands
    LM_NOT_CONFIGURED = "lm_not_configured"
    LM_ERROR = "lm_error"
    ADAPTER_PARSE_ERROR = "adapter_parse_error"
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_REF = "unknown_ref"
    OBJECT_LIMIT = "object_limit"
    UNKNOWN_PIPELINE = "unknown_pipeline"
    FORBIDDEN = "forbidden"


MEANINGS: dict[str, str] = {
    ErrorType.BAD_FRAME: "a frame that is not valid msgpack, not a map, or of an unknown or malformed type",
    ErrorType.BAD_REQUEST: "a request with a wrong or missing field, or arguments its command rejects",
    ErrorType.UNKNOWN_COMMAND: "no handler is registered for the command",
    ErrorType.DUPLICATE_ID: "a request id that is already in flight",
    ErrorType.FRAME_TOO_LARGE: "a frame over --max-frame-bytes; it was skipped unread",
    ErrorType.SHUTTING_DOWN: "the worker is draining and takes no new requests, or ran out of drain time",
    ErrorType.OVERLOADED: "--max-inflight requests run, --max-sessions sessions exist, or --max-thread-queue calls "
                          "wait for a thread",
    ErrorType.CANCELLED: "the host cancelled the request",
    ErrorType.TIMEOUT: "the request's timeout_ms passed",
    ErrorType.HANDLER_ERROR: "the handler raised, or returned a result msgpack cannot carry",
    ErrorType.TOOL_ERROR: "a host tool's error answer propagated out of the handler",
    ErrorType.LM_NOT_CONFIGURED: "a DSPy command in a session with no LM",
    ErrorType.LM_ERROR: "the LM failed: a provider error, or a scripted LM whose script ran out",
    ErrorType.ADAPTER_PARSE_ERROR: "DSPy's adapter could not parse the LM's reply",
    ErrorType.UNKNOWN_SESSION: "a session that does not exist, or (once) one that expired or was closed",
    ErrorType.UNKNOWN_REF: "a ref the request's session does not hold",
    ErrorType.OBJECT_LIMIT: "--max-objects objects are already held by refs",
    ErrorType.UNKNOWN_PIPELINE: "a pipeline name the session does not hold",
    ErrorType.FORBIDDEN: "a call target or path outside what the operator allowed at start-up",
}


class PeerError(Exception):
    """Raised by a handler (or by us on the peer's behalf) for input the peer got wrong.

    It becomes an error frame of ``type`` with no traceback: the peer needs the
    message, not our stack.
    """

    def __init__(self, type: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.details = details


class ToolError(Exception):
    """The host answered a tool call with ``ok: false`` (or can no longer answer: ``host_closed``)."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class RequestClosed(Exception):
    """The request already has its terminal frame (cancelled, timed out, or finished)."""


class TranscriptError(Exception):
    """A file that is not a transcript this version can read."""


class ExpressionError(ValueError):
    """A bad expression, or one that cannot be evaluated over the fields; ``position`` is the offset."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at character {position})")
        self.reason = message
        self.position = position


class PipelineError(ValueError):
    """A malformed pipeline; ``path`` names the step, ``position`` the offset in a bad condition."""

    def __init__(self, message: str, path: str, position: int | None = None) -> None:
        super().__init__(f"step {path}: {message}" if path else message)
        self.path = path
        self.position = position

    def details(self) -> dict[str, Any]:
        return {"path": self.path} if self.position is None else {"path": self.path, "position": self.position}
