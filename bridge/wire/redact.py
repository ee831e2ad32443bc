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
MAX_DEPTH = 100  # maps and lists in maps and lists: deeper frames are refused (ValueError), never sent unchecked
_NAME = re.compile(r"(key|token|secret|password|authorization)$", re.IGNORECASE)
_NAMES_CACHED = 4096

_names: dict[Any, bool] = {}
_clean: set[str] = set()  # key names known not to be secret ones (a C-speed subset test per map)
_secrets: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first
_learned = 0  # counts the secrets learned: a walk that learned one walks its result again
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
    global _text, _binary, _learned
    new = [v for v in {value, value.strip()} if len(v) >= MIN_SECRET and v not in _secrets]
    if not new:
        return
    with _lock:
        _learned += 1
        for v in new:
            _secrets[v] = None
        while len(_secrets) > MAX_SECRETS:
            del _secrets[next(iter(_secrets))]
        ordered = sorted(_secrets, key=len, reverse=True)  # a longer secret wins over its own prefix
        _text = re.compile("|".join(map(re.escape, ordered)))
        _binary = re.compile(b"|".join(re.escape(s.encode("utf-8", "surrogatepass")) for s in ordered))


def learn(value: Any) -> None:
    """Remember every string under a secret-named key of ``value`` (maps and lists, any depth:
    iterative, so no input is too deep for it)."""
    if type(value) is dict and _clean.issuperset(value) and _CONTAINER_TYPES.isdisjoint(map(type, value.values())):
        return  # ``_flat_and_harmless`` inlined: the common request's args end here, without a call
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            if _flat_and_harmless(item):
                continue
            for key, inner in item.items():
                if type(inner) is str and secret_name(key):
                    remember(inner)
                elif type(inner) in _CONTAINER_TYPES:
                    stack.append(inner)
        elif type(item) in _CONTAINER_TYPES:
            stack.extend(inner for inner in item if type(inner) in _CONTAINER_TYPES)


def learn_environment(environ: Mapping[str, str]) -> None:
    """The operator's credentials (``OPENAI_API_KEY``…) are secrets too: a provider may quote them."""
    for name, value in environ.items():
        if secret_name(name):
            remember(value)


def redact(value: Any, encoded: bytes | None = None, depth: int = 0) -> Any:
    """``value`` with every secret replaced by ``[REDACTED]``; the same object when none was found.

    ``encoded``: ``value`` already packed as msgpack (a frame on its way out).  Strings lie
    in it verbatim, so when no known secret occurs in it only key names are checked.
    ``depth``: how deep ``value`` lies in its frame (a chunk's data: 1), so that the
    ``MAX_DEPTH`` limit counts from the frame, as when the whole frame is walked.
    """
    values = _text is not None and (encoded is None or _binary.search(encoded) is not None)  # type: ignore[union-attr]
    if (not values and type(value) is dict and depth < MAX_DEPTH and _clean.issuperset(value)
            and KEYLESS.issuperset(map(type, value.values()))):
        return value  # the common reply: ``_redact_map``'s first test, without its two calls
    return _redacted(value, values, depth)


def by_name(value: Any, depth: int = 0) -> Any:
    """``redact`` for a value whose bytes were scanned already and hold no known secret
    (``holds_secret``), or will be: only the values of secret-named keys are hidden."""
    return _redacted(value, False, depth)


def _redacted(value: Any, values: bool, depth: int) -> Any:
    learned = _learned
    out = _redact_map(value, values, depth) if type(value) is dict else _walk(value, values, depth)
    if _learned != learned:  # a secret-named value was new: it may also lie in what was walked before it
        out = _walk(out, True, depth)
    return out


def arguments(args: list, kwargs: dict) -> tuple[list, dict]:
    """A host call's ``args`` and ``kwargs`` with the values of secret-named keys hidden, for a frame
    whose other fields name no secret: sent with ``send(named=True)``, which scans its bytes for
    known secrets by value.  The common call, a list of scalars and no keywords, has no key to check."""
    if type(args) is list:
        for value in args:
            if type(value) not in KEYLESS:
                break
        else:
            return args, by_name(kwargs, 1) if kwargs else kwargs
    return by_name(args, 1), by_name(kwargs, 1)


def holds_secret(encoded: bytes) -> bool:
    """Does a known secret occur in ``encoded`` (a packed frame)?  One C-speed scan."""
    return _binary is not None and _binary.search(encoded) is not None


def _walk(value: Any, values: bool, depth: int) -> Any:
    kind = type(value)
    if kind is dict:
        return _redact_map(value, values, depth)
    if kind is list or kind is tuple:
        return _redact_items(value, values, depth)
    if kind is str:
        return _text.sub(MARK, value) if values and _text.search(value) else value  # type: ignore[union-attr]
    if kind is bytes or kind is bytearray:
        return _binary.sub(MARK.encode(), value) if values and _binary.search(value) else value  # type: ignore[union-attr]
    if kind in KEYLESS:
        return value
    return _walk_lookalike(value, values, depth)


def _walk_lookalike(value: Any, values: bool, depth: int) -> Any:
    """A value msgpack packs as a map, an array, a str or a bin without being exactly one (a dict or
    str subclass, a memoryview, ``ExtType``): walked as what it is packed as."""
    if isinstance(value, dict):
        return _redact_map(value, values, depth)
    if isinstance(value, (list, tuple)):
        return _redact_items(value, values, depth)
    if isinstance(value, str):
        plain: Any = str(value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        plain = bytes(value)
    else:
        return value
    hidden = _walk(plain, values, depth)
    return value if hidden is plain else hidden


_SECRET_VALUES = (str, bytes, bytearray, memoryview, dict, list, tuple)  # redacted whole under a secret name
_CONTAINER_TYPES = frozenset((dict, list, tuple))
KEYLESS = frozenset({str, bytes, bytearray, int, float, bool, type(None)})  # exact types that hold no key


def _too_deep() -> ValueError:
    """What msgpack raises for a value nested too deep, so callers handle both alike."""
    return ValueError(f"nested deeper than {MAX_DEPTH} levels: too deep to check for secrets")


def _flat_and_harmless(value: dict) -> bool:
    """No key that names a secret, and no nested map or list: checked at C speed (the common frame)."""
    return _clean.issuperset(value) and _CONTAINER_TYPES.isdisjoint(map(type, value.values()))


def _redact_map(value: dict, values: bool, depth: int) -> dict:
    if depth >= MAX_DEPTH:
        raise _too_deep()
    harmless_keys = not values and _clean.issuperset(value)  # C speed: the common frame ends here
    if harmless_keys and KEYLESS.issuperset(map(type, value.values())):
        return value
    out = None
    for key, item in value.items():
        if not harmless_keys and secret_name(key) and isinstance(item, _SECRET_VALUES) and item != MARK:
            if isinstance(item, str):
                remember(str(item))
            new = MARK
        elif values or type(item) not in KEYLESS:
            new = _walk(item, values, depth + 1)
        else:
            continue
        new_key = _walk(key, values, depth) if values and type(key) is str else key
        if new is not item or new_key is not key:
            if out is None:
                out = dict(value)
            if new_key is not key:
                del out[key]
            out[new_key] = new
    return value if out is None else out


def _redact_items(value: Iterable[Any], values: bool, depth: int) -> Any:
    if not values and KEYLESS.issuperset(map(type, value)):  # scalars: no key to check
        return value
    if depth >= MAX_DEPTH:
        raise _too_deep()
    items = list(value)
    changed = False
    for i, item in enumerate(items):
        new = _walk(item, values, depth + 1)
        if new is not item:
            items[i], changed = new, True
    if not changed:
        return value
    return tuple(items) if isinstance(value, tuple) else items
