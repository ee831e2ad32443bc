"""The branch condition language, in-process (sans-I/O): parsing, precedence, evaluation, error offsets."""

from __future__ import annotations

import pytest

from bridge.programs.expressions import parse
from bridge.wire.errors import ExpressionError

FIELDS = {"label": "spam", "score": 0.25, "n": 3, "tags": ["urgent", "sales"], "ok": True, "empty": "",
          "review": {"verdict": "keep", "notes": {"count": 2}}, "none": None}


@pytest.mark.parametrize("source, expected", [
    ("label == 'spam'", True),
    ('label == "spam"', True),
    ("label != 'spam'", False),
    ("score < 0.5", True),
    ("score <= 0.25 and n >= 3", True),
    ("n > 3", False),
    ("n == 3.0", True),
    ("score > -1", True),
    ("1e1 == 10", True),
    ("ok", True),
    ("empty", False),
    ("none == null", True),
    ("ok == true and not (ok == false)", True),
    # not binds tighter than and, and tighter than or
    ("not ok and ok", False),           # (not ok) and ok
    ("not ok or ok", True),             # (not ok) or ok
    ("ok or ok and not ok", True),      # ok or (ok and (not ok))
    ("(ok or ok) and not ok", False),
    ("not not ok", True),
    ("not n == 3", False),              # not (n == 3), as in Python
    # in, not in
    ("'urgent' in tags", True),
    ("'spa' in label", True),           # substring
    ("label in ['ham', 'spam']", True),
    ("label not in ['ham', 'spam']", False),
    ("'x' not in tags", True),
    ("n in [1, 2, 3]", True),
    ("[] == []", True),
    # quotes and escapes
    (r"'it\'s' == " + '"it\'s"', True),
    (r"'a\\b' in 'xa\\by'", True),
    ("'and' == 'and'", True),           # keywords inside strings are text
    # dotted names read namespaced (parallel "as") outputs
    ("review.verdict == 'keep' and review.notes.count > 1", True),
    # parentheses group, whitespace is free
    ("((label=='spam'))and(n<4)", True),
])
def test_evaluates(source, expected):
    assert parse(source)(FIELDS) is expected


@pytest.mark.parametrize("source, position, words", [
    ("", 0, "empty"),
    ("label ==", 8, "end of the expression"),
    ("label = 'spam'", 6, "unexpected character '='"),
    ("label == 'spam", 9, "unterminated string"),
    ("(label == 'spam'", 16, "expected ')'"),
    ("label == 'spam')", 15, "expected 'and', 'or' or the end"),
    ("n < 1 < 2", 6, "do not chain"),
    ("label not 'spam'", 6, "expected 'and', 'or'"),
    ("ok and", 6, "expected a field name"),
    ("ok && ok", 3, "unexpected character '&'"),
    ("review.'x'", 7, "after '.'"),
    ("[1, 2", 5, "expected ','"),
    ("label == spam'", 13, "unterminated string"),
    ("or ok", 0, "expected a field name"),
])
def test_parse_errors_point_at_the_offending_character(source, position, words):
    with pytest.raises(ExpressionError) as info:
        parse(source)
    assert info.value.position == position
    assert words in str(info.value)


@pytest.mark.parametrize("source, position, words", [
    ("missing == 1", 0, "no field 'missing'"),
    ("ok and review.nope == 1", 7, "no field 'review.nope'"),
    ("label.x", 0, "no field 'label.x'"),
    ("n < 'three'", 2, "cannot apply '<' to int and str"),
    ("ok and 1 in n", 9, "cannot apply 'in'"),
])
def test_evaluation_errors_point_at_the_field_or_operator(source, position, words):
    expression = parse(source)
    with pytest.raises(ExpressionError) as info:
        expression(FIELDS)
    assert info.value.position == position
    assert words in str(info.value)


def test_short_circuit_skips_the_other_side():
    assert parse("ok or missing == 1")(FIELDS) is True
    assert parse("not ok and missing == 1")(FIELDS) is False


def test_only_strings_parse():
    with pytest.raises(ExpressionError):
        parse(42)


def test_nothing_reaches_python_eval():
    for source in ("__import__('os')", "label.__class__", "ok()", "1 + 1", "lambda: 0"):
        with pytest.raises(ExpressionError):
            parse(source)(FIELDS)


@pytest.mark.parametrize("source, position, words", [
    ("(" * 1000 + "ok" + ")" * 1000, 64, "nested more than 64 levels"),
    ("not " * 1000 + "ok", 64 * 4, "nested more than 64 levels"),
    ("n in " + "[" * 100 + "]" * 100, 5 + 64, "nested more than 64 levels"),
    ("n == " + "9" * 5000, 5, "number of 5000 characters is too long"),
    ("score < 1e400", 8, "too large for a float"),
])
def test_over_deep_expressions_and_huge_numbers_are_errors_with_a_position(source, position, words):
    with pytest.raises(ExpressionError) as info:
        parse(source)
    assert info.value.position == position and words in str(info.value)


def test_long_chains_parse_and_evaluate_without_recursion():
    assert parse(" and ".join(["ok"] * 20_000))(FIELDS) is True
    assert parse(" or ".join(["empty"] * 20_000 + ["ok"]))(FIELDS) is True
    assert parse("(" * 64 + "ok" + ")" * 64)(FIELDS) is True  # the deepest allowed
