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
_clean: set[str] = set()  # key names known not to be secret ones (a C-speed subset test per map)
_secrets: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first
_lock = threading.Lock()
_text: re.Pattern[str] | None = None
_binary: re.Pattern[bytes] | None = None


def secret_name(name: Any) -> bool:
    """Is ``name`` a key whose value is a secret?  Cached: the same keys come in every frame."""
    hit = _names.get(name)
    if hit is None:
        hit = isinstance(name, str) and _NAME.search(name) is not None
        if len(_names) < _NAMES_CACHED:
            _names[name] = hit
            if not hit and isinstance(name, str):
                _clean.add(name)
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
        _binary = re.compile(b"|".join(re.escape(s.encode("utf-8", "surrogatepass")) for s in ordered))


def learn(value: Any) -> None:
    """Remember every string under a secret-named key of ``value`` (maps and lists, any depth)."""
    if type(value) is dict:
        if _flat_and_harmless(value):
            return
        for key, item in value.items():
            if isinstance(item, str) and secret_name(key):
                remember(item)
            elif isinstance(item, (dict, list)):
                learn(item)
    elif isinstance(value, list):
        for item in value:
            learn(item)


def learn_environment(environ: Mapping[str, str]) -> None:
    """The operator's credentials (``OPENAI_API_KEY``…) are secrets too: a provider may quote them."""
    for name, value in environ.items():
        if secret_name(name):
            remember(value)


def redact(value: Any, encoded: bytes | None = None) -> Any:
    """``value`` with every secret replaced by ``[REDACTED]``; the same object when none was found.

    ``encoded``: ``value`` already packed as msgpack (a frame on its way out).  Strings lie
    in it verbatim, so when no known secret occurs in it only key names are checked.
    """
    values = _text is not None and (encoded is None or _binary.search(encoded) is not None)  # type: ignore[union-attr]
    return _redact_map(value, values) if type(value) is dict else _walk(value, values)


def _walk(value: Any, values: bool) -> Any:
    kind = type(value)
    if kind is dict:
        return _redact_map(value, values)
    if kind is list or kind is tuple:
        return _redact_items(value, values)
    if not values:
        return value
    if kind is str:
        return _text.sub(MARK, value) if _text.search(value) else value  # type: ignore[union-attr]
    if kind is bytes or kind is bytearray:
        return _binary.sub(MARK.encode(), value) if _binary.search(value) else value  # type: ignore[union-attr]
    return value


_SECRET_VALUES = (str, bytes, dict, list)
_CONTAINERS = (dict, list, tuple)
_CONTAINER_TYPES = frozenset(_CONTAINERS)


def _flat_and_harmless(value: dict) -> bool:
    """No key that names a secret, and no nested map or list: checked at C speed (the common frame)."""
    return value.keys() <= _clean and _CONTAINER_TYPES.isdisjoint(map(type, value.values()))


def _redact_map(value: dict, values: bool) -> dict:
    if not values and value.keys() <= _clean:  # every key known harmless: only nested maps can hide one
        if _CONTAINER_TYPES.isdisjoint(map(type, value.values())):
            return value
        for item in value.values():
            kind = type(item)
            if (kind is dict and _redact_map(item, False) is not item) or (
                    kind in _CONTAINERS and kind is not dict and _redact_items(item, False) is not item):
                break  # a nested secret: the full pass below replaces it
        else:
            return value
    out = None
    for key, item in value.items():
        if secret_name(key) and type(item) in _SECRET_VALUES and item != MARK:
            if type(item) is str:
                remember(item)
            new = MARK
        elif values or type(item) in _CONTAINERS:
            new = _walk(item, values)
        else:
            continue
        new_key = _walk(key, values) if values and type(key) is str else key
        if new is not item or new_key is not key:
            if out is None:
                out = dict(value)
            if new_key is not key:
                del out[key]
            out[new_key] = new
    return value if out is None else out


def _redact_items(value: Iterable[Any], values: bool) -> Any:
    if not values and _CONTAINER_TYPES.isdisjoint(map(type, value)):  # scalars: no key to check
        return value
    items = list(value)
    changed = False
    for i, item in enumerate(items):
        new = _walk(item, values)
        if new is not item:
            items[i], changed = new, True
    if not changed:
        return value
    return tuple(items) if isinstance(value, tuple) else items
