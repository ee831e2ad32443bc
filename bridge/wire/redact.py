"""Secret redaction: the one function every outgoing frame, transcript record and log line goes through.

Two rules, both applied by ``redact``:

- by name: the value of a map key whose name ends in ``key``, ``token``, ``secret``,
  ``password`` or ``authorization`` (any case, any separator: ``api_key``, ``X-Api-Key``,
  ``Authorization``) becomes ``[REDACTED]``;
- by value: every secret the worker has seen (a value redacted by name, an
  ``lm.configure`` credential, a secret-named environment variable), raw and
  stripped, is replaced by ``[REDACTED]`` wherever it appears in a string or binary.

Values shorter than ``MIN_SECRET`` characters are redacted by name only: replacing
them everywhere would garble frames.  At most ``MAX_SECRETS`` values are kept (the
oldest go first; those are still redacted by name).  This module imports nothing
else from ``bridge``: it belongs to the wire layer.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Iterable, Mapping

MARK = "[REDACTED]"
MIN_SECRET = 6
MAX_SECRETS = 256
_NAME = re.compile(r"(key|token|secret|password|authorization)$", re.IGNORECASE)
_NAMES_CACHED = 4096


_names: dict[Any, bool] = {}
_secrets: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first
_lock = threading.Lock()
_text: re.Pattern[str] | None = None
_binary: re.Pattern[bytes] | None = None
_clean: dict[str, None] = {}  # short strings known to hold no secret (protocol words, keys): no search
_CLEAN_CACHED, _CLEAN_LEN = 4096, 64
_PLAIN = frozenset({int, float, bool, type(None)})
_needles: list[bytes] = []  # the secrets as UTF-8, for binaries


def secret_name(name: Any) -> bool:
    """Is ``name`` a key whose value is a secret?  Cached: the same keys come in every frame."""
    hit = _names.get(name)
    if hit is None:
        hit = isinstance(name, str) and _NAME.search(name) is not None
        if len(_names) < _NAMES_CACHED:
            _names[name] = hit
    return hit


def remember(value: str) -> None:
    """Redact ``value`` (and ``value.strip()``) by value from now on."""
    global _text, _binary
    new = [v for v in {value, value.strip()} if len(v) >= MIN_SECRET and v not in _secrets]
    if not new:
        return
    with _lock:
        for v in new:
            _secrets[v] = None
        while len(_secrets) > MAX_SECRETS:
            del _secrets[next(iter(_secrets))]
        ordered = sorted(_secrets, key=len, reverse=True)  # a longer secret wins over its own prefix
        _text = re.compile("|".join(map(re.escape, ordered)))
        _clean.clear()
        _needles[:] = [s.encode("utf-8", "surrogatepass") for s in ordered]
        _binary = re.compile(b"|".join(map(re.escape, _needles)))


def learn(value: Any) -> None:
    """Remember every string under a secret-named key of ``value`` (maps and lists, any depth).
    Runs for every request's arguments, so exact types are tested first."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            kind = type(item)
            if kind is str:
                if secret_name(key):
                    remember(item)
            elif kind is dict or kind is list or isinstance(item, (dict, list)):
                learn(item)
    elif kind is list or isinstance(value, list):
        for item in value:
            if type(item) is not str:
                learn(item)
    elif isinstance(value, dict):
        learn(dict(value))


def learn_environment(environ: Mapping[str, str]) -> None:
    """The operator's credentials (``OPENAI_API_KEY``…) are secrets too: a provider may quote them."""
    for name, value in environ.items():
        if secret_name(name):
            remember(value)


def redact(value: Any) -> Any:
    """``value`` with every secret replaced by ``[REDACTED]``; the same object when none was found.
    Every frame the worker writes goes through it, so dispatch is one lookup by exact type."""
    walk = _BY_TYPE.get(type(value))
    if walk is not None:
        return walk(value)
    if type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, dict):
        return _redact_map(value)
    if isinstance(value, (list, tuple)):
        return _redact_items(value)
    if isinstance(value, (bytes, bytearray)):
        return _redact_binary(value)
    return value


def redact_frame(frame: dict) -> dict:
    """``redact`` for a frame built by ``wire.protocol``: its keys and its ``type`` are protocol
    words, never secrets, so only the other values are walked (a chunk of an int costs a
    few type checks)."""
    out = None
    for key, item in frame.items():
        walk = _BY_TYPE.get(type(item))
        if walk is None:
            if key == "type" or type(item) in _PLAIN:
                continue
            walk = redact
        new = walk(item)
        if new is not item:
            if out is None:
                out = dict(frame)
            out[key] = new
    return frame if out is None else out


def _redact_binary(value: bytes | bytearray) -> bytes | bytearray:
    """A few secrets are looked for one by one (a substring search is far faster than the
    alternation over a large payload); many, with the compiled alternation."""
    if _binary is None:
        return value
    if len(_needles) <= 8 and not any(needle in value for needle in _needles):
        return value
    return _binary.sub(MARK.encode(), value) if _binary.search(value) else value


def _redact_text(value: str) -> str:
    if _text is None or value in _clean:
        return value
    if _text.search(value):
        return _text.sub(MARK, value)
    if len(value) <= _CLEAN_LEN and len(_clean) < _CLEAN_CACHED:
        _clean[value] = None
    return value


def _redact_map(value: dict) -> dict:
    if not value:
        return value
    out = None
    names, clean = _names, _clean
    for key, item in value.items():
        hit = names.get(key)
        if hit is None:
            hit = secret_name(key)
        if hit and isinstance(item, (str, bytes, dict, list)) and item != MARK:
            if isinstance(item, str):
                remember(item)
            new = MARK
        else:
            new = item if type(item) in _PLAIN else redact(item)
        new_key = key if _text is None or key in clean or type(key) is not str else _redact_text(key)
        if new is not item or new_key is not key:
            if out is None:
                out = dict(value)
            if new_key is not key:
                del out[key]
            out[new_key] = new
    return value if out is None else out


def _redact_items(value: list | tuple) -> Any:
    if not value:
        return value
    out = None
    for i, item in enumerate(value):
        if type(item) in _PLAIN:
            continue
        new = redact(item)
        if new is not item:
            if out is None:
                out = list(value)
            out[i] = new
    if out is None:
        return value
    return tuple(out) if isinstance(value, tuple) else out


_BY_TYPE: dict[type, Any] = {str: _redact_text, dict: _redact_map, list: _redact_items, tuple: _redact_items,
                             bytes: _redact_binary, bytearray: _redact_binary}
