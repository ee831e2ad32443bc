"""JSON views of frames for people and transcripts: bytes become ``{"$bytes": "<base64>"}``.

msgpack carries bytes natively; JSON does not, so this tag is the one place the
two worlds meet (``bridge encode``/``decode``, transcripts, ``--show``).
"""

from __future__ import annotations

import base64
import json
from typing import Any

TAG = "$bytes"


def to_json(obj: Any) -> Any:
    """A JSON-safe copy of a msgpack value."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {TAG: base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


def from_json(obj: Any) -> Any:
    """Undo ``to_json``: tagged maps become bytes again."""
    if isinstance(obj, dict):
        if len(obj) == 1 and TAG in obj and isinstance(obj[TAG], str):
            return base64.b64decode(obj[TAG])
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """One compact, human-readable JSON line (non-ASCII kept as is)."""
    return json.dumps(to_json(obj), ensure_ascii=False, separators=(",", ":"))


def loads(line: str) -> Any:
    return from_json(json.loads(line))
