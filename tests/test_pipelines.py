"""Pipelines through a real worker with the scripted engine: steps, branches, parallel lanes, errors."""

from __future__ import annotations

import pytest

from tests.conftest import error_of, new_session_id, spawn, streamed

# Each reply answers by the call's inputs (first match wins), so concurrent lanes stay deterministic.
SCRIPT = [
    {"when": {"text": "hello there", "label": "ham"}, "reply": {"summary": "A greeting."}},
    {"when": {"text": "buy now"}, "reply": {"label": "spam"}},
    {"when": {"text": "hello there"}, "reply": {"label": "ham"}},
    {"when": {"label": "spam"}, "reply": {"reasoning": "It sells.", "reply": "Blocked."}},
    {"when": {"label": "ham"}, "reply": {"tone": "warm"}},
]
STEPS = [
    {"name": "classify", "module": "Predict", "signature": "text -> label"},
    {"branch": {
        "if": "label == 'spam'",
        "then": [{"name": "refuse", "module": "ChainOfThought", "signature": "label -> reply"}],
        "else": [{"parallel": [
            [{"name": "summarize", "signature": "text, label -> summary"}],
            {"as": "style", "steps": [{"name": "tone", "signature": "label -> tone"}]},
        ]}],
    }},
]
LANES = "1/branch/else/0/parallel"


MODEL = "scripted/pipe"
pytestmark = pytest.mark.usefixtures("clean_stream")


def run(w, session, args) -> tuple[list[dict], dict]:
    return streamed(w, session, "pipeline.run", args)


def test_the_then_branch(w, session):
    chunks, fields = run(w, session, {"steps": STEPS, "inputs": {"text": "buy now"}})
    assert chunks == [
        {"event": "step_start", "path": "0", "name": "classify"},
        {"event": "step_complete", "path": "0", "name": "classify", "outputs": {"label": "spam"}},
        {"event": "branch", "path": "1", "condition": "label == 'spam'", "taken": "then"},
        {"event": "step_start", "path": "1/branch/then/0", "name": "refuse"},
        {"event": "step_complete", "path": "1/branch/then/0", "name": "refuse",
         "outputs": {"reasoning": "It sells.", "reply": "Blocked."}},
    ]
    assert fields == {"text": "buy now", "label": "spam", "reasoning": "It sells.", "reply": "Blocked."}


def test_the_else_branch_runs_parallel_lanes(w, session):
    chunks, fields = run(w, session, {"steps": STEPS, "inputs": {"text": "hello there"}})
    assert chunks[:3] == [
        {"event": "step_start", "path": "0", "name": "classify"},
        {"event": "step_complete", "path": "0", "name": "classify", "outputs": {"label": "ham"}},
        {"event": "branch", "path": "1", "condition": "label == 'spam'", "taken": "else"},
    ]
    lanes = chunks[3:]
    summarize = [c for c in lanes if c["path"] == f"{LANES}/0/0"]
    tone = [c for c in lanes if c["path"] == f"{LANES}/1/0"]
    assert len(lanes) == 4 and len(summarize) == len(tone) == 2  # lanes interleave; each is in order
    assert summarize == [
        {"event": "step_start", "path": f"{LANES}/0/0", "name": "summarize"},
        {"event": "step_complete", "path": f"{LANES}/0/0", "name": "summarize", "outputs": {"summary": "A greeting."}},
    ]
    assert tone == [
        {"event": "step_start", "path": f"{LANES}/1/0", "name": "tone"},
        {"event": "step_complete", "path": f"{LANES}/1/0", "name": "tone", "outputs": {"tone": "warm"}},
    ]
    assert fields == {"text": "hello there", "label": "ham", "summary": "A greeting.", "style": {"tone": "warm"}}


def test_streamed_tokens_carry_the_step_path(w, session):
    chunks, fields = run(w, session, {"steps": STEPS, "inputs": {"text": "hello there"}, "stream": True})
    tokens = [c for c in chunks if c["event"] == "token"]
    assert {(c["path"], c["field"]) for c in tokens} == {("0", "label"), (f"{LANES}/0/0", "summary"),
                                                         (f"{LANES}/1/0", "tone")}
    assert "".join(c["text"] for c in tokens if c["field"] == "summary") == fields["summary"]
    assert all(c["predictor"] == "self" for c in tokens)
    for path in ("0", f"{LANES}/0/0", f"{LANES}/1/0"):  # each step's tokens sit between its start and complete
        own = [c["event"] for c in chunks if c.get("path") == path and c["event"] != "status"]
        assert own[0] == "step_start" and own[-1] == "step_complete" and "token" in own


def test_namespaced_lanes_are_read_with_dots(w, session):
    steps = [*STEPS, {"branch": {"if": "style.tone == 'warm' and not ('x' in summary)",
                                 "then": [{"name": "sign", "signature": "label -> tone"}]}}]
    chunks, fields = run(w, session, {"steps": steps, "inputs": {"text": "hello there"}})
    assert chunks[-3]["event"] == "branch" and chunks[-3]["taken"] == "then"
    assert fields["tone"] == "warm" and fields["style"] == {"tone": "warm"}


def test_a_stored_pipeline_runs_by_name(w, session):
    assert w.call("pipeline.create", {"name": "triage", "steps": STEPS}, session_id=session) == {"name": "triage"}
    _, fields = run(w, session, {"name": "triage", "inputs": {"text": "buy now"}})
    assert fields["reply"] == "Blocked."
    assert error_of(w, "elsewhere", "pipeline.run", {"name": "triage", "inputs": {}}).type == "unknown_pipeline"


def test_a_bad_expression_is_refused_at_create_with_its_position(w, session):
    steps = [{"branch": {"if": "label == 'spam' and", "then": []}}]
    err = error_of(w, session, "pipeline.create", {"name": "bad", "steps": steps})
    assert err.type == "bad_request"
    assert err.details == {"path": "0", "position": len("label == 'spam' and")}
    nested = [{"parallel": [[{"branch": {"if": "ok", "then": [{"branch": {"if": "a = 1", "then": []}}]}}]]}]
    err = error_of(w, session, "pipeline.run", {"steps": nested, "inputs": {}})
    assert err.details == {"path": "0/parallel/0/0/branch/then/0", "position": 2}


@pytest.mark.parametrize("steps, path, words", [
    ([], "", "non-empty list"),
    ([{"signature": "a -> b", "modul": "Predict"}], "0", "unknown keys ['modul']"),
    ([{"signature": "a ->"}], "0", "at least one output field"),
    ([{"module": "Nope", "signature": "a -> b"}], "0", "unknown module"),
    ([{"branch": {"if": "ok"}}], "0", "a branch is"),
    ([{"branch": {"if": "ok", "then": []}, "name": "x"}], "0", "only the key 'branch'"),
    ([{"parallel": [[{"signature": "a -> b"}], [{"signature": "c -> b"}]]}], "0", "can both write the field 'b'"),
    ([{"parallel": [[{"signature": "q -> answer", "module": "ChainOfThought"}],
                    [{"signature": "q -> other", "module": "ChainOfThought"}]]}], "0", "'reasoning'"),
    ([{"parallel": [{"as": "x", "steps": []}, {"as": "x", "steps": []}]}], "0", "field 'x'"),
    ([{"parallel": [{"as": "a.b", "steps": []}]}], "0/parallel/0", "'as' must be a field name"),
])
def test_malformed_pipelines_name_the_step(w, session, steps, path, words):
    err = error_of(w, session, "pipeline.create", {"name": "bad", "steps": steps})
    assert err.type == "bad_request" and err.details["path"] == path
    assert words in err.message


def test_a_failing_step_keeps_its_error_type_and_names_its_path(w):
    session = new_session_id()
    w.call("lm.configure", {"model": "scripted/pipe", "script": [
        {"when": {"text": "hello there", "label": "ham"}, "reply": {"summary": "A greeting."}},
        {"when": {"text": "hello there"}, "reply": {"label": "ham"}},
        {"when": {"text": "buy now"}, "reply": {"label": "spam"}},
        {"when": {"label": "ham"}, "reply": {"raw": "not the format"}},
    ]}, session_id=session)
    err = error_of(w, session, "pipeline.run", {"steps": STEPS, "inputs": {"text": "hello there"}})
    assert (err.type, err.details["path"]) == ("adapter_parse_error", f"{LANES}/1/0")
    assert err.details["lm_response"] == "not the format"
    err = error_of(w, session, "pipeline.run", {"steps": STEPS, "inputs": {"text": "buy now"}})
    assert (err.type, err.details["path"], err.details["model"]) == ("lm_error", "1/branch/then/0", "scripted/pipe")


def test_run_time_problems_name_the_step(w, session):
    err = error_of(w, session, "pipeline.run", {"steps": STEPS, "inputs": {"txt": "buy now"}})
    assert (err.type, err.details) == ("bad_request", {"path": "0"})
    assert "needs the field(s) ['text']" in err.message
    steps = [{"branch": {"if": "labl == 'spam'", "then": []}}]
    err = error_of(w, session, "pipeline.run", {"steps": steps, "inputs": {"label": "spam"}})
    assert (err.type, err.details) == ("bad_request", {"path": "0", "position": 0})
    assert error_of(w, session, "pipeline.run", {"steps": STEPS, "inputs": "x"}).type == "bad_request"
    assert error_of(w, session, "pipeline.run", {"steps": STEPS, "name": "x", "inputs": {}}).type == "bad_request"


def test_a_react_step_calls_host_tools_and_its_chunks_carry_the_path():
    tools = [{"name": "lookup", "description": "Look a word up.",
              "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}]
    script = [
        {"next_thought": "Look it up.", "next_tool_name": "lookup", "next_tool_args": {"word": "hi"}},
        {"next_thought": "Done.", "next_tool_name": "finish", "next_tool_args": {}},
        {"reasoning": "It is a greeting.", "meaning": "greeting"},
    ]
    steps = [{"name": "agent", "module": "ReAct", "signature": "word -> meaning", "tools": tools}]
    with spawn(tools={"lookup": lambda word: f"{word}: a greeting"}) as worker:
        worker.call("lm.configure", {"model": "scripted/agent", "script": script})
        call = worker.request("pipeline.run", {"steps": steps, "inputs": {"word": "hi"}})
        chunks = list(call)
        fields = call.result()
        assert worker.unrouted.empty()
    assert [(c["event"], c.get("tool")) for c in chunks] == [
        ("step_start", None), ("thought", None), ("tool_call", "lookup"), ("observation", "lookup"),
        ("thought", None), ("step_complete", None)]
    assert all(c["path"] == "0" for c in chunks)
    assert chunks[-1]["trajectory"][0]["observation"] == "hi: a greeting"
    assert fields == {"word": "hi", "reasoning": "It is a greeting.", "meaning": "greeting"}
