"""The protocol boundary in-process: properties of ``wire.protocol.parse`` over generated frames."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge.wire import protocol

valid_ids = st.one_of(st.integers(min_value=-2**63, max_value=2**64 - 1),
                      st.text(max_size=64),
                      st.binary(max_size=256).map(lambda b: b.decode("latin-1")).filter(
                          lambda s: len(s.encode()) <= 256))
bad_ids = st.one_of(st.booleans(), st.none(), st.floats(), st.binary(),
                    st.integers(min_value=2**64), st.integers(max_value=-2**63 - 1),
                    st.text(min_size=257).filter(lambda s: len(s.encode()) > 256),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# what msgpack can decode, for frames the peer may send
values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                                st.floats(), st.text(max_size=20), st.binary(max_size=20)),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
frame_types = st.sampled_from(["request", "cancel", "credit", "rpc_response", "shutdown", "launch", None, 7])


def _frame(kind, rid, extra: dict) -> dict:
    body = {**extra, "type": kind}
    if kind == "rpc_response":
        body.update(rpc_id=rid, ok=True)
    else:
        body.update(id=rid, command="ping", n=1)
    return body


@given(frame_types, values, st.dictionaries(st.text(max_size=10), values, max_size=6))
def test_parse_never_raises_and_every_rejection_is_an_error_frame(kind, rid, extra):
    event = protocol.parse({**extra, "type": kind, "id": rid})
    if isinstance(event, protocol.Rejected):
        assert event.frame["type"] == "error" and event.frame["error"]["type"] in ("bad_frame", "bad_request")


@given(st.sampled_from(["request", "cancel", "credit", "rpc_response"]), valid_ids)
def test_a_valid_id_comes_through_unchanged(kind, rid):
    event = protocol.parse(_frame(kind, rid, {}))
    assert not isinstance(event, protocol.Rejected)
    assert (event.rpc_id if kind == "rpc_response" else event.id) == rid


@given(st.sampled_from(["cancel", "credit", "rpc_response"]), bad_ids)
def test_a_bad_id_outside_requests_is_a_bad_frame_with_no_id(kind, rid):
    event = protocol.parse(_frame(kind, rid, {}))
    assert isinstance(event, protocol.Rejected)
    error = event.frame
    assert error["id"] is None and error["error"]["type"] == "bad_frame"
    assert error["error"]["details"]["field"] == ("rpc_id" if kind == "rpc_response" else "id")


@given(bad_ids)
def test_a_request_with_a_bad_id_is_a_bad_request_with_no_id(rid):
    event = protocol.parse({"type": "request", "id": rid, "command": "ping"})
    assert isinstance(event, protocol.Rejected)
    assert event.frame["id"] is None and event.frame["error"]["type"] == "bad_request"
