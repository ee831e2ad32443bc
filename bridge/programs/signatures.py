"""Signatures from the host: DSPy's string form, or a map of typed, described fields.

Strings are DSPy's form (``"question -> answer: int"``), parsed by
``programs.typenames`` so that a type name never imports anything.  Maps are
``{"inputs": {name: {"desc", "type"}}, "outputs": {...}, "instructions"}`` with
the same type names.  Every problem is a ``ValueError`` the handlers report as
``bad_request``.  DSPy is imported lazily: this module is loaded before ``ready``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from bridge.programs.typenames import SignatureError, resolve_text, string_fields
from bridge.wire.protocol import quote

if TYPE_CHECKING:
    import dspy

_MAP_KEYS = {"inputs", "outputs", "instructions"}
_FIELD_KEYS = {"desc", "type"}
CACHED = 256  # signatures kept built: building one (a pydantic model) costs milliseconds


def parse_signature(spec: Any, instructions: Any = None) -> "type[dspy.Signature]":
    """The signature ``spec`` describes; ``instructions`` (if given) replaces its instructions.

    The same spec gives the same class, from a bounded cache: requests repeat their
    signatures, and DSPy treats a signature class as immutable (``with_instructions``
    and the optimizers make new ones)."""
    if instructions is not None and not isinstance(instructions, str):
        raise ValueError("'instructions' must be a string")
    if isinstance(spec, dict):
        import json  # here and below, not at import: json is off the start-up (DSPy loads it after ready)

        try:
            key = json.dumps(spec, sort_keys=True)
        except (TypeError, ValueError):  # not JSON (a non-string key): built each time
            return _build(spec, instructions)
        return _built_map(key, instructions)
    if isinstance(spec, str):
        return _built(spec, instructions)
    return _build(spec, instructions)


@functools.lru_cache(maxsize=CACHED)
def _built(spec: str, instructions: str | None) -> "type[dspy.Signature]":
    return _build(spec, instructions)


@functools.lru_cache(maxsize=CACHED)
def _built_map(key: str, instructions: str | None) -> "type[dspy.Signature]":
    import json

    return _build(json.loads(key), instructions)


def _build(spec: Any, instructions: str | None) -> "type[dspy.Signature]":
    import dspy

    if isinstance(spec, str):
        try:
            signature = dspy.Signature(string_fields(spec))
        except SignatureError:
            raise
        except (ValueError, TypeError, SyntaxError) as exc:
            raise ValueError(f"bad signature {quote(spec)}: {exc}") from None
    elif isinstance(spec, dict):
        signature = _from_map(spec)
    else:
        raise ValueError("'signature' must be a string like 'question -> answer' or a map with 'inputs' and 'outputs'")
    if not signature.output_fields:
        raise ValueError("a signature needs at least one output field")
    return signature.with_instructions(instructions) if instructions is not None else signature


def _from_map(spec: dict[str, Any]) -> "type[dspy.Signature]":
    import dspy

    unknown = set(spec) - _MAP_KEYS
    if unknown:
        raise ValueError(f"unknown signature keys {sorted(unknown)}; expected {sorted(_MAP_KEYS)}")
    instructions = spec.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ValueError("signature 'instructions' must be a string")
    fields = {**_fields(spec.get("inputs"), "inputs", dspy.InputField),
              **_fields(spec.get("outputs"), "outputs", dspy.OutputField)}
    if len(fields) < len(spec.get("inputs") or {}) + len(spec.get("outputs") or {}):
        raise ValueError("input and output fields must have distinct names")
    try:
        return dspy.Signature(fields, instructions)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad signature: {exc}") from None


def _fields(specs: Any, where: str, make_field: Any) -> dict[str, tuple[Any, Any]]:
    if specs is None:
        return {}
    if not isinstance(specs, dict):
        raise ValueError(f"signature '{where}' must be a map of field name -> {{'desc', 'type'}}")
    return {_name(name, where): _field(name, spec or {}, where, make_field) for name, spec in specs.items()}


def _name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ValueError(f"signature {where}: field name {quote(name)} must be an identifier not starting with '_'")
    return name


def _field(name: str, spec: Any, where: str, make_field: Any) -> tuple[Any, Any]:
    if not isinstance(spec, dict) or set(spec) - _FIELD_KEYS:
        raise ValueError(f"signature {where}.{name} must be a map with optional 'desc' and 'type'")
    type_name = spec.get("type", "str")
    if not isinstance(type_name, str):
        raise SignatureError(f"signature {where}.{name}: 'type' must be a string like 'int' or 'list[str]'")
    annotation = resolve_text(type_name, f"{where}.{name}")
    desc = spec.get("desc")
    if desc is not None and not isinstance(desc, str):
        raise ValueError(f"signature {where}.{name}: 'desc' must be a string")
    return annotation, make_field(desc=desc) if desc else make_field()
