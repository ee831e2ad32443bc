"""Signatures from the host are built once per distinct spec, from a bounded cache."""

from __future__ import annotations

import pytest

from bridge.programs import signatures
from bridge.programs.signatures import parse_signature


def test_the_same_spec_gives_the_same_class_and_other_specs_do_not():
    pytest.importorskip("dspy")
    first = parse_signature("question -> answer")
    assert parse_signature("question -> answer") is first
    assert parse_signature("question -> answer", "Be brief.") is not first
    assert parse_signature("question -> answer", "Be brief.").instructions == "Be brief."
    spec = {"inputs": {"q": {"type": "str"}}, "outputs": {"a": {"type": "int", "desc": "n"}}}
    assert parse_signature(spec) is parse_signature(dict(reversed(list(spec.items()))))


def test_errors_are_not_cached_and_the_cache_is_bounded():
    pytest.importorskip("dspy")
    for _ in range(2):
        with pytest.raises(ValueError):
            parse_signature("question ->")
    for i in range(signatures.CACHED + 10):
        parse_signature(f"q{i} -> a")
    assert signatures._built.cache_info().currsize == signatures.CACHED
