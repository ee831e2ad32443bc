"""The trust boundary's pieces in-process: redaction, bounded quoting, type names, confined paths, the policy."""

from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.commands.dspy import _url_under
from bridge.programs.allowlist import Policy
from bridge.programs.typenames import SignatureError, resolve_text, string_fields
from bridge.wire import framing, protocol, redact
from bridge.wire.errors import PeerError
from bridge.worker import paths
from bridge.worker.transport import FrameWriter


def test_redaction_by_name_keeps_clean_values_as_the_same_object():
    frame = {"type": "chunk", "id": 1, "data": {"event": "token", "text": "Paris", "max_tokens": 5}}
    assert redact.redact(frame, framing.encode(frame)) is frame
    hidden = redact.redact({"args": {"API_KEY": "k1234567", "x-auth-token": ["a"], "Authorization": "Bearer zz",
                                     "password": None, "monkey": 3}})
    assert hidden == {"args": {"API_KEY": "[REDACTED]", "x-auth-token": "[REDACTED]", "Authorization": "[REDACTED]",
                               "password": None, "monkey": 3}}


def test_redaction_by_value_covers_raw_and_stripped_secrets_everywhere():
    redact.learn({"lm": {"api_key": "sk-core-test-4711\n"}})
    text = "Incorrect API key provided: sk-core-test-4711"
    assert redact.redact(text) == "Incorrect API key provided: [REDACTED]"
    assert redact.redact([b"x sk-core-test-4711\n"]) == [b"x [REDACTED]"]
    assert redact.redact({"sk-core-test-4711": 1}) == {"[REDACTED]": 1}
    frame = {"type": "error", "error": {"message": text}}
    assert redact.redact(frame, framing.encode(frame))["error"]["message"].endswith("[REDACTED]")
    redact.learn({"token": "abc"})  # shorter than MIN_SECRET: by name only, or every "abc" would go
    assert redact.redact("abcdef") == "abcdef"


def test_redaction_is_linear_in_depth_and_refuses_beyond_its_limit():
    value: object = {"api_key": "sk-nested-0000"}
    for level in range(redact.MAX_DEPTH - 2):
        value = [value] if level % 2 else {"k": value}
    assert "sk-nested" not in repr(redact.redact(value))  # 2**49 walks if a level were walked twice
    with pytest.raises(ValueError, match="too deep"):
        redact.redact([[[value]]])
    redact.learn([[[value]]])  # learning is iterative: no depth limit


SECRET = "sk-fastpath-secret-0042"
keys = st.sampled_from(["q", "text", "api_key", "X-Auth-Token", "ſecret", "\u212aey", "monkey", SECRET])
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=False)
           | st.sampled_from([SECRET, f"Bearer {SECRET}", "plain", SECRET.encode()]) | st.text(max_size=8))
class Text(str):
    """A str subclass (``numpy.str_`` is one): msgpack packs it as a str."""


lookalikes = (st.sampled_from([SECRET, "plain", f"x {SECRET}"]).map(Text)
              | st.sampled_from([SECRET.encode(), b"plain"]).map(memoryview))
values = st.recursive(scalars | lookalikes,
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4)
                      | st.dictionaries(keys, inner, max_size=4).map(OrderedDict) | st.lists(inner, max_size=3).map(tuple),
                      max_leaves=12)
ids = st.integers(min_value=0, max_value=2**64 - 1) | st.sampled_from(["r1", SECRET, f"id-{SECRET}"])


@contextmanager
def knowing_only(secret: str) -> Iterator[None]:
    """Redaction that knows ``secret`` alone (then the suite's state again): what one example learns
    must not depend on the examples before it, nor evict ``secret`` (``MAX_SECRETS``)."""
    saved = dict(redact._secrets), redact._text, redact._binary
    redact._secrets.clear()
    redact._text = redact._binary = None
    redact.remember(secret)
    try:
        yield
    finally:
        redact._secrets.clear()
        redact._secrets.update(saved[0])
        redact._text, redact._binary = saved[1], saved[2]


def written(send) -> bytes:
    """The bytes a ``FrameWriter`` queues for what ``send(writer)`` sends (held back: corked, never written)."""
    writer = FrameWriter(-1)
    writer.cork()
    queued: list[bytes] = []
    writer._append = lambda data, frames: queued.append(data) or len(data)  # type: ignore[method-assign]
    send(writer)
    return b"".join(queued)


@settings(max_examples=300)
@given(rid=ids, seq=st.integers(min_value=0, max_value=2**32), data=values)
def test_the_chunk_fast_path_writes_exactly_what_the_general_path_writes(rid, seq, data):
    """``send_chunk`` (a per-request prefix, only the data walked) against ``send`` of the whole frame:
    the same bytes for any data, with secret names at any depth and known secrets in data or id."""
    with knowing_only(SECRET):
        general = lambda w: w.send(protocol.chunk(rid, seq, data))  # noqa: E731
        written(general)  # learns what the data's secret-named keys hold, so both paths below know it
        fast = written(lambda w: w.send_chunk(framing.chunk_prefix(rid), rid, seq, data))
        assert fast == written(general)
    assert SECRET.encode() not in fast


@settings(max_examples=300)
@given(rid=ids, args=st.lists(values, max_size=3), kwargs=st.dictionaries(keys, values, max_size=3))
def test_a_host_call_redacted_by_its_parts_writes_what_the_whole_frame_would(rid, args, kwargs):
    """What ``ToolBridge.call`` sends (its args and kwargs redacted, then ``send(named=True)``) against the
    unredacted frame through ``send``: the same bytes, and no known secret in them."""
    with knowing_only(SECRET):
        whole = lambda w: w.send(protocol.rpc_request(7, rid, "t", args, kwargs, None))  # noqa: E731
        written(whole)  # learns what secret-named keys hold, so both paths below know it
        parts = written(lambda w: w.send(protocol.rpc_request(7, rid, "t", *redact.arguments(args, kwargs), None),
                                         named=True))
        assert parts == written(whole)
    assert SECRET.encode() not in parts


@pytest.mark.parametrize("args", [{"api_key": "sk-in-a-map-1"}, ({"api_key": "sk-in-a-map-1"},), [1, {"token": "sk-in-a-map-1"}]],
                         ids=["a map", "a tuple", "a list with a map"])
def test_host_call_arguments_that_are_not_a_list_of_scalars_are_walked_by_name(args):
    """Only a list of scalars skips the by-name walk: a handler passing a map or a tuple as ``args``
    (``shared.tools.call`` takes what it is given) gets it walked."""
    hidden, _ = redact.arguments(args, {})
    assert hidden == redact.redact(args, depth=1) and "sk-in-a-map-1" not in repr(hidden)


@pytest.mark.parametrize("data, hidden", [
    (Text(f"x {SECRET}"), SECRET.encode()),
    (memoryview(f"x {SECRET}".encode()), SECRET.encode()),
    (OrderedDict(q=SECRET), SECRET.encode()),
    (OrderedDict(api_key="short"), b"short"),
    ({"api_key": "sk-fresh-in-frame-1", "note": "sk-fresh-in-frame-1"}, b"sk-fresh-in-frame-1"),
    ({"note": "sk-fresh-in-frame-2", "api_key": "sk-fresh-in-frame-2"}, b"sk-fresh-in-frame-2"),
], ids=["str subclass", "memoryview", "dict subclass by value", "dict subclass by name",
        "learned before its copy", "learned after its copy"])
def test_values_that_only_pack_like_str_bin_or_map_are_redacted_too(data, hidden):
    """What msgpack packs as a str, a bin or a map is walked as one (subclasses, memoryview), and a
    secret learned by name during a walk is hidden wherever else the frame holds it."""
    with knowing_only(SECRET):
        general = written(lambda w: w.send(protocol.chunk(1, 0, data)))
        fast = written(lambda w: w.send_chunk(framing.chunk_prefix(1), 1, 0, data))
    assert hidden not in general and hidden not in fast and b"[REDACTED]" in general


def _outcome(send) -> bytes | str:
    try:
        return written(send)
    except ValueError as exc:
        return str(exc)


@pytest.mark.parametrize("depth", [97, 98, 99, 100])
def test_the_fast_paths_refuse_exactly_the_frames_too_deep_for_the_general_path(depth):
    """``MAX_DEPTH`` counts from the frame: a chunk's data and a host call's arguments lie one
    level down, in the fast paths as in the general one."""
    data: object = {"q": 1}
    for level in range(depth):
        data = [data] if level % 2 else {"k": data}
    fast = _outcome(lambda w: w.send_chunk(framing.chunk_prefix(1), 1, 0, data))
    assert fast == _outcome(lambda w: w.send(protocol.chunk(1, 0, data)))
    args = [data]
    parts = _outcome(lambda w: w.send(protocol.rpc_request(7, 1, "t", *redact.arguments(args, {}), None),
                                      named=True))
    assert parts == _outcome(lambda w: w.send(protocol.rpc_request(7, 1, "t", args, {}, None)))
    assert isinstance(fast, bytes) == (depth < 99)


def test_a_host_call_whose_tool_name_is_no_str_is_refused_before_anything_is_sent():
    """The frame's own fields are not walked in the host-call fast path, so a tool name that could
    hide a secret-named key (a map) is refused."""
    import anyio

    from bridge.worker.tools import ToolBridge

    class Caller:
        id, closed, parked, telemetry, tool_calls, tool_s = 1, False, set(), None, 0, 0.0

    sent: list[dict] = []

    class Writer:
        dead = False

        def send(self, frame: dict, extra: bytes = b"", named: bool = False) -> int:
            sent.append(frame)
            return 1

    async def main() -> None:
        with pytest.raises(TypeError, match="a tool's name is a str"):
            await ToolBridge(Writer(), 1000).call(Caller(), {"api_key": "abc"}, [], {})  # type: ignore[arg-type]

    anyio.run(main)
    assert sent == []


def test_the_operators_environment_keys_are_secrets():
    redact.learn_environment({"MY_SERVICE_TOKEN": "env-secret-98765", "HOME": "/root"})
    assert redact.redact("quoting env-secret-98765") == "quoting [REDACTED]"
    assert redact.redact("/root") == "/root"


def test_error_frames_quote_host_values_bounded():
    huge = "é" * 10_000
    frame = protocol.error(1, "bad_request", "m" * 10_000, {"value": huge, "n": 1}, "t" * 100_000)
    err = frame["error"]
    assert len(err["message"].encode()) <= protocol.MESSAGE_BYTES + 3
    assert len(err["traceback"].encode()) <= 8 * protocol.MESSAGE_BYTES + 3
    assert err["details"]["value"].endswith("…") and len(err["details"]["value"].encode()) <= 203
    assert err["details"]["length"] == len(huge.encode()) and err["details"]["n"] == 1
    assert len(protocol.quote(b"\x00" * 10**7)) < 1000 and len(protocol.quote([huge] * 100)) < 300


@pytest.mark.parametrize("signature, kind, position", [
    ("q: os -> a", "os", 3),
    ("q -> a: list[sys.modules]", "sys.modules", 13),
    ("é: int, x: Field(default=1) -> a", "Field(default=1)", 11),
    ("q: __import__('os') -> a", "__import__('os')", 3),
    ("q: typing.Any -> a", "typing.Any", 3),
])
def test_unknown_type_names_are_located(signature, kind, position):
    with pytest.raises(SignatureError) as info:
        string_fields(signature)
    assert info.value.details == {"type": kind, "position": position}


def test_the_type_table_builds_the_types_dspy_would():
    import typing

    import dspy

    fields = string_fields("a, b: list[str], c: Optional[int] -> d: dict[str, Any], e: Literal['x', 2], "
                           "f: int | None, g: tuple[int, ...], h: dspy.Image")
    types = {name: annotation for name, (annotation, _) in fields.items()}
    assert types == {"a": str, "b": list[str], "c": typing.Optional[int], "d": dict[str, typing.Any],
                     "e": typing.Literal["x", 2], "f": typing.Optional[int], "g": tuple[int, ...], "h": dspy.Image}
    assert resolve_text("dspy.Code['python']", "outputs.x").__name__ == "Code_python"
    with pytest.raises(SignatureError):
        resolve_text("Optional", "inputs.q")


def test_paths_are_confined_to_allowed_directories(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.json").write_text("{}")
    (allowed / "link.json").symlink_to(outside / "secret.json")
    (allowed / "ok.json").write_text('{"a": 1}')
    before = paths.policy()
    try:
        paths.configure([str(allowed)], max_bytes=5)
        assert paths.confine(str(allowed / "sub" / ".." / "ok.json")) == str((allowed / "ok.json").resolve())
        for bad in (str(allowed / "link.json"), str(allowed / ".." / "outside" / "secret.json"), "/etc/passwd"):
            with pytest.raises(PeerError) as info:
                paths.confine(bad)
            assert info.value.type == "forbidden" and info.value.details["path"] == bad
        with pytest.raises(PeerError) as info:
            paths.read_file(str(allowed / "ok.json"))
        assert info.value.type == "bad_request" and info.value.details["limit"] == 5
        paths.configure([str(allowed)])
        assert paths.read_file(str(allowed / "ok.json")) == b'{"a": 1}'
        with pytest.raises(PeerError) as info:
            paths.confine_new(str(allowed))  # a directory is not a file to write
        assert info.value.details["reason"] == "not a regular file"
    finally:
        paths.configure(before.dirs, before.max_bytes)


def test_api_base_prefixes_compare_scheme_host_port_and_path():
    prefix = urlsplit("http://127.0.0.1:8000/v1")
    assert _url_under(urlsplit("http://127.0.0.1:8000/v1/chat"), prefix)
    assert _url_under(urlsplit("http://127.0.0.1:8000/v1"), prefix)
    for url in ("http://127.0.0.1:8000/v10", "http://127.0.0.1.evil.example:8000/v1", "https://127.0.0.1:8000/v1",
                "http://127.0.0.1:9000/v1", "http://127.0.0.1:bad/v1"):
        assert not _url_under(urlsplit(url), prefix), url


def test_the_policy_allows_table_names_and_instances_of_their_exact_classes():
    import dspy

    policy = Policy()
    assert policy.target("dspy.Predict") is dspy.Predict
    predict = dspy.Predict("q -> a")
    assert policy.method(predict, "dump_state", "t").__func__ is type(predict).dump_state
    predict.dump_state = print  # an attribute on the instance is not the class's method
    with pytest.raises(PeerError):
        policy.method(predict, "dump_state", "t")
    assert not policy.may_keep(exec) and not policy.may_keep(os) and policy.may_keep(predict)
    assert not policy.allowed_instance(dspy.ProgramOfThought("q -> a"))
    with pytest.raises(PeerError) as info:
        policy.arguments("t", "load", ["/tmp/x.json"], {"allow_unsafe_lm_state": True})
    assert info.value.type == "forbidden"
