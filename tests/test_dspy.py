"""The DSPy commands, through a real worker process with the offline scripted engine.

One worker serves the module; each test works in its own session, so scripts
never leak between tests.  Only the LM at the bottom is offline: DSPy's
adapters, streaming listeners and callbacks run for real.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
import time

import pytest

from bridge import RemoteError
from tests.conftest import ROOT, spawn

QA = "question -> answer"
_sessions = itertools.count(1)


@pytest.fixture(scope="module")
def log():
    with tempfile.TemporaryFile("w+") as f:
        yield f


@pytest.fixture(scope="module")
def w(log):
    with spawn(stderr=log) as worker:
        yield worker


@pytest.fixture(autouse=True)
def clean_stream(request):
    """After every test: every frame decoded and was routed to its call (nothing stray on stdout)."""
    yield
    if "w" in request.fixturenames:
        worker = request.getfixturevalue("w")
        assert worker.unrouted.empty(), worker.unrouted.get()


@pytest.fixture
def session():
    return f"s{next(_sessions)}"


def configure(w, session: str, script: list, **options) -> None:
    w.call("lm.configure", {"model": "scripted/demo", "script": script, **options}, session_id=session)


def error_of(w, command: str, args: dict, **fields) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        w.call(command, args, **fields)
    return info.value


def streamed(call) -> tuple[list[dict], dict]:
    chunks = list(call)
    return chunks, call.result()


def tokens(chunks: list[dict], field: str) -> str:
    return "".join(c["text"] for c in chunks if c["event"] == "token" and c["field"] == field)


# ---- predict ---------------------------------------------------------------------------

def test_predict_returns_the_scripted_fields(w, session):
    configure(w, session, [{"answer": "Paris"}])
    result = w.call("dspy.predict", {"signature": QA, "inputs": {"question": "Capital of France?"}},
                    session_id=session)
    assert result == {"outputs": {"answer": "Paris"}}


def test_chain_of_thought_includes_reasoning(w, session):
    configure(w, session, [{"reasoning": "Two plus two is four.", "answer": "4"}])
    result = w.call("dspy.predict", {"signature": QA, "module": "ChainOfThought", "inputs": {"question": "2+2?"}},
                    session_id=session)
    assert result["outputs"] == {"reasoning": "Two plus two is four.", "answer": "4"}


def test_typed_outputs_come_back_typed(w, session):
    configure(w, session, [{"count": 3, "tags": ["a", "b c"], "ok": True},
                           {"score": 0.5, "meta": {"k": [1, 2]}}])
    typed = w.call("dspy.predict", {"signature": "question: str -> count: int, tags: list[str], ok: bool",
                                    "inputs": {"question": "q"}}, session_id=session)
    assert typed["outputs"] == {"count": 3, "tags": ["a", "b c"], "ok": True}
    mapped = w.call("dspy.predict", {"signature": {
        "inputs": {"question": {"desc": "what to rate", "type": "str"}},
        "outputs": {"score": {"type": "float"}, "meta": {"type": "dict", "desc": "extra"}},
        "instructions": "Rate the question."}, "inputs": {"question": "q"}}, session_id=session)
    assert mapped["outputs"] == {"score": 0.5, "meta": {"k": [1, 2]}}


@pytest.mark.parametrize("args", [
    {"signature": "question ->"},
    {"signature": "question -> answer: NoSuchType"},
    {"signature": 42},
    {"signature": {"inputs": {"q": {"type": "complex"}}, "outputs": {"a": {}}}},
    {"signature": {"inputs": {"q": {}}, "outputs": {"q": {}}}},
    {"signature": {"inputs": {"q": {}}, "outputs": {"a": {}}, "extra": 1}},
    {"signature": QA, "module": "NoSuchModule"},
    {"signature": QA, "inputs": {"wrong": "field"}},
    {"signature": QA, "inputs": "not a map"},
])
def test_bad_requests_are_rejected(w, session, args):
    configure(w, session, [])
    err = error_of(w, "dspy.predict", {"inputs": {"question": "q"}, **args}, session_id=session)
    assert err.type == "bad_request"


def test_without_an_lm_the_error_says_how_to_configure_one(w, session):
    err = error_of(w, "dspy.predict", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    assert err.type == "lm_not_configured"
    assert "lm.configure" in err.message


def test_an_exhausted_script_is_an_lm_error(w, session):
    configure(w, session, [{"answer": "only one"}])
    w.call("dspy.predict", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    err = error_of(w, "dspy.predict", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    assert err.type == "lm_error"
    assert "no replies left" in err.message


def test_a_raw_reply_fails_its_call_and_uses_up_only_itself(w, session):
    """ChatAdapter fails on the raw text; DSPy's JSONAdapter retry gets the same raw text, not the next reply."""
    configure(w, session, [{"raw": "not the format"}, {"answer": "next"}])
    err = error_of(w, "dspy.predict", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    assert err.type == "adapter_parse_error"
    assert err.details["lm_response"] == "not the format"
    assert w.call("dspy.predict", {"signature": QA, "inputs": {"question": "q"}},
                  session_id=session)["outputs"] == {"answer": "next"}


def test_a_provider_lm_is_configured_without_network(w, session):
    result = w.call("lm.configure", {"model": "openai/gpt-4o-mini", "api_key": "sk-test", "temperature": 0.2},
                    session_id=session)
    assert result == {"model": "openai/gpt-4o-mini", "session_id": session}


@pytest.mark.parametrize("options", [
    {"model": "replay/some.jsonl"},
    {"model": "scripted/demo"},
    {"model": "scripted/demo", "script": [{"when": {"q": 1}}]},
    {"model": "scripted/demo", "script": [{"raw": 1}]},
    {"model": "scripted/demo", "script": [], "chunk_chars": 0},
    {"model": ""},
])
def test_bad_lm_options_are_rejected(w, session, options):
    err = error_of(w, "lm.configure", options, session_id=session)
    if options["model"].startswith("replay/"):  # this worker allows no directory (--allow-path)
        assert err.type == "forbidden" and err.details["path"] == "some.jsonl"
    else:
        assert err.type == "bad_request"


# ---- stream ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_chars", [None, 1, 3, 7])
def test_stream_tokens_concatenate_to_the_final_values(w, session, chunk_chars):
    reasoning = "First, recall the map.\n\nThen: Paris [the city] is the capital; it's big."
    answer = "Paris, France  (really)"
    options = {"chunk_chars": chunk_chars} if chunk_chars else {}
    configure(w, session, [{"reasoning": reasoning, "answer": answer}], **options)
    chunks, result = streamed(w.request("dspy.stream", {
        "signature": QA, "module": "ChainOfThought", "inputs": {"question": "Capital?"}}, session_id=session))
    assert result["outputs"] == {"reasoning": reasoning, "answer": answer}
    assert tokens(chunks, "reasoning") == reasoning
    assert tokens(chunks, "answer") == answer
    kinds = [(c["event"], c.get("field")) for c in chunks]
    assert kinds.index(("token", "answer")) > max(i for i, k in enumerate(kinds) if k == ("token", "reasoning"))
    assert {c["predictor"] for c in chunks if c["event"] == "token"} == {"predict"}


def test_stream_reports_module_and_lm_status(w, session):
    configure(w, session, [{"reasoning": "r", "answer": "a b c"}])
    chunks, _ = streamed(w.request("dspy.stream", {
        "signature": QA, "module": "ChainOfThought", "inputs": {"question": "q"}}, session_id=session))
    statuses = [c["message"] for c in chunks if c["event"] == "status"]
    assert statuses == ["ChainOfThought started", "Predict started", "LM scripted/demo started",
                        "LM scripted/demo finished", "Predict finished", "ChainOfThought finished"]
    first_token = next(i for i, c in enumerate(chunks) if c["event"] == "token")
    lm_end = next(i for i, c in enumerate(chunks) if c.get("message") == "LM scripted/demo finished")
    assert first_token < lm_end


def test_stream_only_the_requested_fields(w, session):
    configure(w, session, [{"reasoning": "hidden steps", "answer": "shown"}])
    chunks, result = streamed(w.request("dspy.stream", {
        "signature": QA, "module": "ChainOfThought", "inputs": {"question": "q"}, "fields": ["answer"]},
        session_id=session))
    assert {c["field"] for c in chunks if c["event"] == "token"} == {"answer"}
    assert result["outputs"]["reasoning"] == "hidden steps"
    err = error_of(w, "dspy.stream", {"signature": QA, "inputs": {"question": "q"}, "fields": ["nope"]},
                   session_id=session)
    assert err.type == "bad_request"


def test_stream_is_incremental(w, session):
    """With 40 ms per token, the first answer token reaches the host long before the LM finishes."""
    answer = " ".join(f"w{i}" for i in range(30))
    configure(w, session, [{"answer": answer}], token_delay_ms=40)
    started = time.monotonic()
    call = w.request("dspy.stream", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    arrivals = [(time.monotonic(), c) for c in call]
    done = time.monotonic()
    assert call.result()["outputs"]["answer"] == answer
    first = next(t for t, c in arrivals if c["event"] == "token")
    assert done - first >= 0.6, (first - started, done - started)
    assert tokens([c for _, c in arrivals], "answer") == answer


def test_cancelling_a_stream_stops_the_program_cleanly(w, log, session):
    configure(w, session, [{"answer": " ".join(["slow"] * 200)}, {"answer": "after"}], token_delay_ms=20)
    log.seek(0, 2)
    call = w.request("dspy.stream", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    for chunk in call:
        if chunk["event"] == "token":
            call.cancel()
            break
    with pytest.raises(RemoteError) as info:
        call.result(timeout=5)
    assert info.value.type == "cancelled"
    assert w.call("dspy.predict", {"signature": QA, "inputs": {"question": "q"}},
                  session_id=session)["outputs"] == {"answer": "after"}  # the program ended, cleanly
    log.seek(0)
    assert "Traceback" not in log.read()


# ---- batch -------------------------------------------------------------------------------

def test_batch_reports_each_item_as_it_finishes_and_survives_a_failure(w, session):
    questions = [f"q{i}" for i in range(6)]
    script = [{"when": {"question": q}, "reply": {"answer": f"a{i}"}} for i, q in enumerate(questions)]
    script[0]["reply"] = {"answer": " ".join(["long"] * 25)}     # finishes last, ~0.6 s after the others
    script[3]["reply"] = {"raw": "this is not what the adapter expects"}
    configure(w, session, script, token_delay_ms=25)
    call = w.request("dspy.batch", {"signature": QA, "items": [{"question": q} for q in questions],
                                    "concurrency": 3}, session_id=session)
    arrivals = [(time.monotonic(), c) for c in call]
    done = time.monotonic()
    assert call.result() == {"total": 6, "succeeded": 5, "failed": 1}
    chunks = [c for _, c in arrivals]
    assert [c["progress"] for c in chunks] == [{"done": i, "total": 6} for i in range(1, 7)]
    by_index = {c["index"]: c for c in chunks}
    assert sorted(by_index) == list(range(6))
    assert by_index[3]["event"] == "item_error"
    assert by_index[3]["error"]["type"] == "adapter_parse_error"
    assert set(by_index[3]["error"]) == {"type", "message"}
    for i in (1, 2, 4, 5):
        assert by_index[i] == {"event": "item", "index": i, "outputs": {"answer": f"a{i}"},
                               "progress": by_index[i]["progress"]}
    assert chunks[-1]["index"] == 0
    assert done - arrivals[0][0] >= 0.3


def test_a_large_batch_keeps_the_frame_stream_clean(w, session):
    """DSPy runs with its default settings; every frame decodes and belongs to its call."""
    configure(w, session, [{"when": {"question": f"q{i}"}, "reply": {"answer": str(i)}} for i in range(40)])
    call = w.request("dspy.batch", {"signature": QA, "items": [{"question": f"q{i}"} for i in range(40)]},
                     session_id=session)
    chunks, result = streamed(call)
    assert result == {"total": 40, "succeeded": 40, "failed": 0}
    assert sorted(c["outputs"]["answer"] for c in chunks) == sorted(str(i) for i in range(40))
    assert all(f["type"] in ("chunk", "result") for f in call.frames)


# ---- sessions and programs ---------------------------------------------------------------------

def test_sessions_keep_their_own_lms(w):
    configure(w, "iso-a", [{"answer": "a1"}, {"answer": "a2"}])
    configure(w, "iso-b", [{"answer": "b1"}, {"answer": "b2"}])
    answers = [w.call("dspy.predict", {"signature": QA, "inputs": {"question": "q"}}, session_id=s)
               ["outputs"]["answer"] for s in ("iso-a", "iso-b", "iso-b", "iso-a")]
    assert answers == ["a1", "b1", "b2", "a2"]


def test_programs_are_called_by_ref_within_their_session(w, session):
    ref = w.call("program.create", {"module": "ChainOfThought", "signature": QA}, session_id=session)["ref"]
    assert error_of(w, "program.call", {"ref": ref, "inputs": {"question": "q"}},
                    session_id="elsewhere").type == "unknown_ref"
    configure(w, session, [{"reasoning": "r1", "answer": "plain"}, {"reasoning": "r2", "answer": "streamed"}])
    assert w.call("program.call", {"ref": ref, "inputs": {"question": "q"}},
                  session_id=session)["outputs"] == {"reasoning": "r1", "answer": "plain"}
    chunks, result = streamed(w.request("program.call", {"ref": ref, "inputs": {"question": "q"}, "stream": True},
                                        session_id=session))
    assert result["outputs"]["answer"] == tokens(chunks, "answer") == "streamed"


def test_closing_a_session_releases_its_refs(w, session):
    ref = w.call("program.create", {"module": "Predict", "signature": QA}, session_id=session)["ref"]
    assert w.call("session.close", {}, session_id=session) == {"closed": True}
    closed = error_of(w, "program.save", {"ref": ref}, session_id=session)
    assert closed.type == "unknown_session" and closed.details == {"session_id": session, "reason": "closed"}
    assert error_of(w, "program.save", {"ref": ref}, session_id=session).type == "unknown_ref"  # a fresh session
    assert error_of(w, "session.close", {}, session_id="never-opened").type == "unknown_session"


def test_an_idle_session_expires_after_its_ttl(w, session):
    assert w.call("session.create", {"ttl_s": 0.5}, session_id=session) == {"session_id": session, "ttl_s": 0.5}
    ref = w.call("program.create", {"module": "Predict", "signature": QA}, session_id=session)["ref"]
    assert "state" in w.call("program.save", {"ref": ref}, session_id=session)
    time.sleep(2.0)  # the TTL passes; the sweep runs every second: expired within 1.5 s of the last use
    expired = error_of(w, "program.save", {"ref": ref}, session_id=session)
    assert expired.type == "unknown_session" and expired.details == {"session_id": session, "reason": "expired"}
    assert error_of(w, "program.save", {"ref": ref}, session_id=session).type == "unknown_ref"  # a fresh session


def test_a_saved_program_loads_in_a_fresh_worker(w, session):
    ref = w.call("program.create", {"module": "ChainOfThought", "signature": QA,
                                    "instructions": "Answer tersely."}, session_id=session)["ref"]
    state = w.call("program.save", {"ref": ref}, session_id=session)["state"]
    state["predict"]["demos"] = [{"question": "2+2?", "reasoning": "Add.", "answer": "4", "augmented": True}]
    spec = {"module": "ChainOfThought", "signature": QA}
    compiled = w.call("program.load", {**spec, "state": state}, session_id=session)["ref"]
    saved = w.call("program.save", {"ref": compiled}, session_id=session)["state"]
    assert saved["predict"]["demos"] == state["predict"]["demos"]
    assert saved["predict"]["signature"]["instructions"] == "Answer tersely."
    with spawn() as fresh:
        loaded = fresh.call("program.load", {**spec, "state": saved})["ref"]
        assert fresh.call("program.save", {"ref": loaded})["state"] == saved
        # Only the last user message counts for `when`: the demo's question is not this call's input.
        configure(fresh, "default", [{"when": {"question": "2+2?"}, "reply": {"reasoning": "demo", "answer": "no"}},
                                     {"when": {"question": "3+3?"}, "reply": {"reasoning": "r", "answer": "6"}}])
        assert fresh.call("program.call", {"ref": loaded, "inputs": {"question": "3+3?"}})["outputs"]["answer"] == "6"
    assert error_of(w, "program.load", {**spec, "state": {"nope": 1}}, session_id=session).type == "bad_request"


# ---- start-up ----------------------------------------------------------------------------------

def test_the_handler_module_does_not_import_dspy():
    code = "import sys, bridge.commands.dspy; sys.exit('dspy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_ping_is_answered_while_dspy_warms_up():
    with spawn() as fresh:
        sent = time.monotonic()
        configure_call = fresh.request("lm.configure", {"model": "scripted/demo", "script": []})
        fresh.call("ping")
        pinged = time.monotonic()
        configure_call.result()
        assert pinged - sent < 0.5
        assert time.monotonic() - pinged > 0.1  # the DSPy request really waited for the import
