"""Sans-I/O tests of framing and protocol: no process, no loop."""

import struct

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from bridge.wire import framing, protocol
from bridge.wire.errors import ErrorType
from bridge.wire.framing import BadFrame, Decoder, Frame, FrameTooLarge, Truncated

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=False) | st.text() | st.binary())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)
maps = st.dictionaries(st.text(max_size=8), values, max_size=6)


def feed_all(decoder: Decoder, data: bytes, cuts: list[int]) -> list:
    events, start = [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    return events


@given(st.lists(maps, max_size=8), st.lists(st.integers(min_value=0), max_size=12))
def test_stream_cut_anywhere_decodes_to_the_same_frames(frames, cuts):
    data = b"".join(framing.encode(f) for f in frames)
    events = feed_all(Decoder(), data, cuts)
    assert events == [Frame(f) for f in frames]


@given(values)
def test_any_msgpack_value_round_trips(value):
    frame = {"type": "chunk", "data": value}
    (event,) = Decoder().feed(framing.encode(frame))
    assert event == Frame(frame)
    if isinstance(value, bytes):
        assert isinstance(event.body["data"], bytes)


@given(st.binary(max_size=64), maps)
def test_garbage_body_is_a_bad_frame_and_the_stream_stays_in_sync(garbage, good):
    data = struct.pack(">I", len(garbage)) + garbage + framing.encode(good)
    events = Decoder().feed(data)
    assert events[-1] == Frame(good)
    assert len(events) == 2
    assert isinstance(events[0], (BadFrame, Frame))  # some garbage is valid msgpack


@given(st.lists(st.integers(min_value=0), max_size=6))
def test_oversize_frame_is_skipped_across_any_cut(cuts):
    big = framing.encode({"blob": b"x" * 500})
    data = framing.encode({"a": 1}) + big + framing.encode({"b": 2})
    events = feed_all(Decoder(max_frame_bytes=100), data, cuts)
    assert events[0] == Frame({"a": 1})
    assert isinstance(events[1], FrameTooLarge) and events[1].limit == 100
    assert events[2] == Frame({"b": 2})


def test_bad_bodies():
    assert "not a map" in Decoder().feed(framing.encode([1, 2]))[0].reason
    two = msgpack.packb({}) + msgpack.packb({})
    assert "more than one" in Decoder().feed(struct.pack(">I", len(two)) + two)[0].reason
    assert "invalid msgpack" in Decoder().feed(b"\x00\x00\x00\x01\xc1")[0].reason


def test_truncated_input_is_reported_at_close():
    d = Decoder()
    assert d.feed(framing.encode({"a": 1})[:-2]) == []
    assert d.close() == [Truncated(have=6, want=8)]
    assert d.close() == []
    assert Decoder().close() == []


def test_protocol_parses_every_host_frame():
    req = protocol.parse({"type": "request", "id": 7, "command": "ping", "session_id": "s",
                          "timeout_ms": 10, "window": 4, "telemetry": True})
    assert req == protocol.Request(7, "ping", {}, "s", 10, 4, True)
    assert protocol.parse({"type": "cancel", "id": "x"}) == protocol.Cancel("x")
    assert protocol.parse({"type": "credit", "id": 1, "n": 3}) == protocol.Credit(1, 3)
    assert protocol.parse({"type": "shutdown"}) == protocol.Shutdown()
    ok = protocol.parse({"type": "rpc_response", "rpc_id": 3, "ok": True, "result": [1]})
    assert ok == protocol.RpcResponse(3, True, [1], None)
    err = protocol.parse({"type": "rpc_response", "rpc_id": 3, "ok": False, "error": {"type": "t", "message": "m"}})
    assert err.error == {"type": "t", "message": "m"}


def rejected(body: dict) -> dict:
    event = protocol.parse(body)
    assert isinstance(event, protocol.Rejected), event
    return event.frame


def test_protocol_rejects_what_the_peer_got_wrong():
    assert rejected({})["error"]["type"] == ErrorType.BAD_FRAME
    assert rejected({"type": "nope"})["error"]["details"] == {"type": "nope"}
    assert rejected({"type": "request", "id": 1.5, "command": "x"})["id"] is None
    for bad in ({"command": 3}, {"command": "x", "args": [1]}, {"command": "x", "session_id": 1},
                {"command": "x", "timeout_ms": -1}, {"command": "x", "timeout_ms": True},
                {"command": "x", "window": 0}):
        frame = rejected({"type": "request", "id": 9, **bad})
        assert frame["id"] == 9 and frame["error"]["type"] == ErrorType.BAD_REQUEST, bad
    assert rejected({"type": "rpc_response", "ok": True})["error"]["type"] == ErrorType.BAD_FRAME
    assert rejected({"type": "credit", "id": 1, "n": 0})["error"]["type"] == ErrorType.BAD_FRAME


@given(maps)
def test_protocol_never_raises(body):
    event = protocol.parse(body)
    if isinstance(event, protocol.Rejected):
        framing.encode(event.frame)  # the error frame is always sendable
