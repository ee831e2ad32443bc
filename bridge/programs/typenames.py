"""Type names in signatures resolve against a fixed table: DSPy's own parser imports any module named as a type.

``"q: some_module -> a"`` makes DSPy 3.4 call ``importlib.import_module("some_module")``
(and walk attributes of whatever ``typing`` imported), so its top-level code runs
before the signature is refused.  Here a type annotation is checked node by node
against ``TYPES`` and ``DSPY_TYPES`` and built from them; nothing is imported or
looked up by name.  ``guard_dspy_parser`` puts the same parser in place of DSPy's
string parser, so a signature string reaching DSPy by any route (``call
dspy.Predict``, a module DSPy builds itself) is held to the table too.

An unknown type is a ``SignatureError`` (a ``ValueError``, so ``bad_request``) with
``details: {type, position}``: a character offset in a string signature, or
``inputs.NAME``/``outputs.NAME`` in a map.  DSPy is imported lazily.
"""

from __future__ import annotations

import ast
import functools
import typing
from typing import Any, Callable

from bridge.wire.protocol import cut, quote

TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "bytes": bytes, "list": list,
                         "dict": dict, "tuple": tuple, "Optional": typing.Optional, "Union": typing.Union,
                         "Literal": typing.Literal, "Any": typing.Any}
DSPY_TYPES = ("Image", "Audio", "History", "Tool", "ToolCalls", "Code")  # as dspy.<name>, where DSPy has it
_GENERIC = {list, dict, tuple}


class SignatureError(ValueError):
    """A bad signature; ``details`` locates the problem for the host."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details


@functools.cache
def table() -> dict[str, Any]:
    """Every type name a signature may use, as written: ``int``, ``dspy.Image``…"""
    import dspy

    return {**TYPES, **{f"dspy.{name}": getattr(dspy, name) for name in DSPY_TYPES if hasattr(dspy, name)}}


def resolve_text(text: str, position: Any) -> Any:
    """A type written alone (a map signature's ``type``), resolved against the table."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise unknown(text, position) from None
    return _Resolver(lambda node: position, text).type(node)


def unknown(text: str, position: Any) -> SignatureError:
    return SignatureError(f"unknown type {quote(text)} at {position}; signatures may use "
                          f"{', '.join(table())} and their generic forms",
                          {"type": cut(text), "position": position})


def string_fields(signature: str) -> dict[str, tuple[Any, Any]]:
    """DSPy's ``"a, b: int -> c: list[str]"`` as ``{name: (type, InputField/OutputField)}``."""
    import dspy

    if not isinstance(signature, str) or signature.count("->") != 1:
        raise SignatureError(f"invalid signature {quote(signature)}: it must contain exactly one '->'")
    inputs, outputs = signature.split("->")
    fields: dict[str, tuple[Any, Any]] = {}
    for part, offset, output in ((inputs, 0, False), (outputs, len(inputs) + 2, True)):
        for name, annotation in _arguments(part, offset):
            if name in fields:
                raise SignatureError(f"field {quote(name)} appears twice in {quote(signature)}")
            info = dspy.OutputField() if output else dspy.InputField(IS_TYPE_UNDEFINED=annotation is None)
            fields[name] = (str if annotation is None else annotation, info)
    return fields


def _arguments(part: str, offset: int) -> list[tuple[str, Any]]:
    """The ``name[: type]`` list of one side, parsed as a function's parameters (as DSPy does)."""
    source = f"def f({part}): pass"
    try:
        parameters = ast.parse(source).body[0].args  # type: ignore[attr-defined]
    except (SyntaxError, IndexError, AttributeError):
        raise SignatureError(f"bad signature fields {quote(part.strip())}: a list of name or name: type") from None
    if parameters.posonlyargs or parameters.vararg or parameters.kwonlyargs or parameters.kwarg or parameters.defaults:
        raise SignatureError(f"bad signature fields {quote(part.strip())}: only name or name: type")
    lines = source.splitlines(True)
    resolver = _Resolver(lambda node: offset + _char_offset(lines, node) - len("def f("), source)
    return [(arg.arg, None if arg.annotation is None else resolver.type(arg.annotation)) for arg in parameters.args]


def _char_offset(lines: list[str], node: ast.AST) -> int:
    """``node``'s character offset in the source of ``lines`` (ast counts columns in UTF-8 bytes)."""
    before = sum(len(line) for line in lines[:node.lineno - 1])  # type: ignore[attr-defined]
    line = lines[node.lineno - 1]  # type: ignore[attr-defined]
    return before + len(line.encode()[:node.col_offset].decode(errors="ignore"))  # type: ignore[attr-defined]


class _Resolver:
    """Builds a type from an annotation's nodes; anything outside the table is ``unknown``."""

    def __init__(self, position: Callable[[ast.AST], Any], source: str) -> None:
        self.position = position
        self.lines = source.splitlines(True)

    def fail(self, node: ast.AST) -> SignatureError:
        return unknown(self.text(node), self.position(node))

    def text(self, node: Any) -> str:
        """``node``'s source (``ast.get_source_segment`` splits lines in Python: slow on megabytes)."""
        first, last = node.lineno - 1, node.end_lineno - 1
        data = "".join(self.lines[first:last + 1]).encode()
        end = len(data) - len(self.lines[last].encode()) + node.end_col_offset
        return data[node.col_offset:end].decode(errors="ignore")

    def type(self, node: ast.AST) -> Any:
        if isinstance(node, (ast.Name, ast.Attribute)):
            found = table().get(_dotted(node) or "")
            if found is None or found in (typing.Optional, typing.Union, typing.Literal):
                raise self.fail(node)  # a bare Optional/Union/Literal is not a type
            return found
        if isinstance(node, ast.Subscript):
            return self.generic(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return typing.Union[self.member(node.left), self.member(node.right)]
        raise self.fail(node)

    def member(self, node: ast.AST) -> Any:
        """A member of a union: a type, or ``None``."""
        if isinstance(node, ast.Constant) and node.value is None:
            return type(None)
        return self.type(node)

    def generic(self, node: ast.Subscript) -> Any:
        base = table().get(_dotted(node.value) or "")
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base is typing.Literal:
            if not all(isinstance(i, ast.Constant) and isinstance(i.value, (str, int, float, bool)) for i in items):
                raise self.fail(node)
            return typing.Literal[tuple(i.value for i in items)]  # type: ignore[misc]
        if base is typing.Optional and len(items) == 1:
            return typing.Optional[self.type(items[0])]
        if base is typing.Union:
            return typing.Union[tuple(self.member(i) for i in items)]  # type: ignore[misc]
        if base in _GENERIC:
            return base[tuple(Ellipsis if isinstance(i, ast.Constant) and i.value is Ellipsis and base is tuple
                              else self.type(i) for i in items)]
        code = table().get("dspy.Code")
        if base is code and len(items) == 1 and isinstance(items[0], ast.Constant) and isinstance(items[0].value, str):
            return code[items[0].value]
        raise self.fail(node)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def guard_dspy_parser() -> None:
    """Make DSPy's string-signature parser this one (idempotent); its ``names`` are ignored."""
    from dspy.signatures import signature as module

    def parse(signature: str, names: Any = None) -> dict[str, tuple[Any, Any]]:
        return string_fields(signature)

    parse.guarded = True  # type: ignore[attr-defined]
    if not getattr(module._parse_signature, "guarded", False):
        module._parse_signature = parse
