"""The small, safe condition language of pipeline branches, sans-I/O.

A host writes conditions such as ``label == 'spam' and not (score < 0.5)``.
They are parsed here into a tree and evaluated over the pipeline's fields;
nothing ever reaches ``eval``.  Every error carries the character offset the
host needs to point at the mistake.

Grammar (``not`` binds tighter than ``and``, ``and`` tighter than ``or``)::

    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := operand (OP operand)?        OP: == != < <= > >= in, not in
    operand := STRING | NUMBER | true | false | null | NAME("." NAME)* | "[" list "]" | "(" or ")"

Parentheses, ``not`` and lists nest at most ``MAX_DEPTH`` levels, and a chain of
``and``/``or`` is one node, so neither parsing nor evaluation can exhaust the
stack; an int of more than 4300 digits (Python's limit) is refused, with its position.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

from bridge.wire.errors import ExpressionError

MAX_DEPTH = 64  # nested parentheses, ``not`` and lists: deeper would overflow Python's stack
KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}
LITERALS = {"true": True, "false": False, "null": None}
COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
}
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_]\w*)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],.])
  | (?P<quote>['"])
""", re.X)
_ESCAPES = {"n": "\n", "t": "\t"}


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # number, string, name, keyword, op, punct, end
    value: Any
    position: int


def tokenize(text: str) -> Iterator[Token]:
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ExpressionError(f"unexpected character {text[position]!r}", position)
        kind = match.lastgroup
        if kind == "quote":
            value, end = _string(text, position)
            yield Token("string", value, position)
            position = end
            continue
        word = match.group()
        if kind == "number":
            yield Token(kind, _number(word, position), position)
        elif kind == "name":
            yield Token("keyword" if word in KEYWORDS else "name", word, position)
        elif kind != "space":
            yield Token(kind, word, position)
        position = match.end()
    yield Token("end", None, len(text))


def _number(word: str, position: int) -> int | float:
    """An int, or a float when written with a point or an exponent; Python refuses ints of more
    than ``sys.get_int_max_str_digits()`` digits (4300), and a float that overflows is no number."""
    try:
        value = float(word) if any(c in word for c in ".eE") else int(word)
    except ValueError:
        raise ExpressionError(f"number of {len(word)} characters is too long", position) from None
    if value in (float("inf"), float("-inf")):
        raise ExpressionError("number is too large for a float", position)
    return value


def _string(text: str, start: int) -> tuple[str, int]:
    """The quoted string at ``start``; a backslash escapes the next character."""
    quote, chars, i = text[start], [], start + 1
    while i < len(text):
        char = text[i]
        if char == quote:
            return "".join(chars), i + 1
        if char == "\\" and i + 1 < len(text):
            i += 1
            char = _ESCAPES.get(text[i], text[i])
        chars.append(char)
        i += 1
    raise ExpressionError("unterminated string", start)


# ---- the tree -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Literal:
    value: Any
    position: int

    def evaluate(self, fields: dict[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, slots=True)
class Field:
    path: tuple[str, ...]  # a.b reads fields["a"]["b"]: namespaced parallel outputs
    position: int

    def evaluate(self, fields: dict[str, Any]) -> Any:
        value: Any = fields
        for depth, name in enumerate(self.path):
            if not isinstance(value, dict) or name not in value:
                where = ".".join(self.path[:depth + 1])
                known = sorted(value) if isinstance(value, dict) else []
                raise ExpressionError(f"no field {where!r}; fields here are {known}", self.position)
            value = value[name]
        return value


@dataclass(frozen=True, slots=True)
class ListOf:
    items: tuple["Node", ...]
    position: int

    def evaluate(self, fields: dict[str, Any]) -> Any:
        return [item.evaluate(fields) for item in self.items]


@dataclass(frozen=True, slots=True)
class Not:
    operand: "Node"
    position: int

    def evaluate(self, fields: dict[str, Any]) -> Any:
        return not self.operand.evaluate(fields)


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # "and" | "or"; short-circuits like Python, but always yields a bool
    operands: tuple["Node", ...]  # a whole chain, ``a and b and c``: evaluated in a loop, not recursion
    position: int  # of the first operator

    def evaluate(self, fields: dict[str, Any]) -> Any:
        stop = self.op == "or"  # the value that decides the chain
        for operand in self.operands:
            if bool(operand.evaluate(fields)) == stop:
                return stop
        return not stop


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: "Node"
    right: "Node"
    position: int  # of the operator

    def evaluate(self, fields: dict[str, Any]) -> Any:
        left, right = self.left.evaluate(fields), self.right.evaluate(fields)
        try:
            return COMPARISONS[self.op](left, right)
        except TypeError:
            raise ExpressionError(f"cannot apply {self.op!r} to {type(left).__name__} and "
                                  f"{type(right).__name__}", self.position) from None


Node = Union[Literal, Field, ListOf, Not, Logic, Compare]


# ---- the parser ---------------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = list(tokenize(text))
        self.i = 0
        self.depth = 0  # open parentheses, ``not``s and lists around the current token

    @property
    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def at(self, kind: str, value: Any = None) -> bool:
        token = self.peek
        return token.kind == kind and (value is None or token.value == value)

    def expect(self, kind: str, value: str) -> Token:
        if not self.at(kind, value):
            raise self.unexpected(f"expected {value!r}")
        return self.take()

    def unexpected(self, hint: str) -> ExpressionError:
        token = self.peek
        seen = "the end of the expression" if token.kind == "end" else repr(str(token.value))
        return ExpressionError(f"{hint}, found {seen}", token.position)

    def parse(self) -> Node:
        if self.at("end"):
            raise ExpressionError("empty expression", 0)
        node = self.or_()
        if not self.at("end"):
            raise self.unexpected("expected 'and', 'or' or the end")
        return node

    def nested(self) -> None:
        """One level deeper (at ``(``, ``not``, ``[``); ``leave`` when done."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"expression nested more than {MAX_DEPTH} levels deep", self.peek.position)

    def leave(self) -> None:
        self.depth -= 1

    def or_(self) -> Node:
        return self.chain("or", self.and_)

    def and_(self) -> Node:
        return self.chain("and", self.not_)

    def chain(self, op: str, operand: Callable[[], Node]) -> Node:
        """``operand (op operand)*``: one node for the whole chain."""
        operands, position = [operand()], 0
        while self.at("keyword", op):
            token = self.take()
            position = position or token.position
            operands.append(operand())
        return operands[0] if len(operands) == 1 else Logic(op, tuple(operands), position)

    def not_(self) -> Node:
        if self.at("keyword", "not"):
            self.nested()
            position = self.take().position
            node = Not(self.not_(), position)
            self.leave()
            return node
        return self.compare()

    def compare(self) -> Node:
        left = self.operand()
        op = self.operator()
        if op is None:
            return left
        node = Compare(op[0], left, self.operand(), op[1])
        if self.operator(consume=False):
            raise self.unexpected("comparisons do not chain; combine them with 'and'")
        return node

    def operator(self, consume: bool = True) -> tuple[str, int] | None:
        token = self.peek
        if token.kind == "op" or (token.kind == "keyword" and token.value == "in"):
            op = token.value
        elif token.kind == "keyword" and token.value == "not" and self.tokens[self.i + 1].value == "in" \
                and self.tokens[self.i + 1].kind == "keyword":
            op = "not in"
        else:
            return None
        if consume:
            self.i += 2 if op == "not in" else 1
        return op, token.position

    def operand(self) -> Node:
        token = self.peek
        if token.kind in ("string", "number"):
            return Literal(self.take().value, token.position)
        if token.kind == "keyword" and token.value in LITERALS:
            return Literal(LITERALS[self.take().value], token.position)
        if token.kind == "name":
            return self.field()
        if self.at("punct", "("):
            self.nested()
            self.take()
            node = self.or_()
            self.expect("punct", ")")
            self.leave()
            return node
        if self.at("punct", "["):
            return self.list_()
        raise self.unexpected("expected a field name, a string, a number or '('")

    def field(self) -> Field:
        first = self.take()
        path = [first.value]
        while self.at("punct", "."):
            self.take()
            if not self.at("name"):
                raise self.unexpected("expected a field name after '.'")
            path.append(self.take().value)
        return Field(tuple(path), first.position)

    def list_(self) -> ListOf:
        self.nested()
        position = self.take().position
        items: list[Node] = []
        while not self.at("punct", "]"):
            items.append(self.operand())
            if not self.at("punct", "]"):
                self.expect("punct", ",")
        self.take()
        self.leave()
        return ListOf(tuple(items), position)


@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed condition: ``source`` as the host wrote it, true or false over a map of fields."""

    source: str
    tree: Node

    def __call__(self, fields: dict[str, Any]) -> bool:
        return bool(self.tree.evaluate(fields))


def parse(source: Any) -> Expression:
    """Parse ``source``; ``ExpressionError`` (with ``position``) if it is not a valid expression."""
    if not isinstance(source, str):
        raise ExpressionError("an expression must be a string", 0)
    return Expression(source, _Parser(source).parse())
