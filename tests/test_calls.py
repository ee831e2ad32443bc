"""Generic calls by reference, release, the allow-list, and dspy.stream's OpenAI chunk format."""

from __future__ import annotations

import tempfile

import pytest

from bridge import RemoteError
from tests.conftest import error_of, new_session_id, spawn

SCRIPT = [{"when": {"question": "Capital of France?"}, "reply": {"reasoning": "It is Paris.", "answer": "Paris"}}]
PREDICT = "dspy.predict.predict.Predict"


MODEL = "scripted/calls"
pytestmark = pytest.mark.usefixtures("clean_stream")


def call(w, session, target, *args, **kwargs):
    return w.call("call", {"target": target, "args": list(args), "kwargs": kwargs}, session_id=session)


def test_build_a_predict_by_ref_and_call_it(w, session):
    predict = call(w, session, "dspy.Predict", "question -> answer")
    assert predict == {"__ref__": predict["__ref__"], "type": PREDICT}
    ref = {"ref": predict["__ref__"]}
    assert call(w, session, ref, question="Capital of France?") == {"answer": "Paris"}  # a Prediction, as a map
    assert call(w, session, {**ref, "method": "acall"}, question="Capital of France?") == {"answer": "Paris"}
    state = call(w, session, {**ref, "method": "dump_state"})
    assert state["demos"] == [] and state["signature"]["instructions"]


def test_refs_in_arguments_at_any_depth_and_named_results(w, session):
    example = w.call("call", {"target": "dspy.Example", "kwargs": {"question": "Capital of France?", "answer": "Paris"},
                              "store_as": "paris"}, session_id=session)
    assert example == {"__ref__": "paris", "type": "dspy.primitives.example.Example"}
    student = call(w, session, "dspy.ChainOfThought", "question -> answer")
    fewshot = call(w, session, "dspy.LabeledFewShot", k=1)
    compiled = call(w, session, {"ref": fewshot["__ref__"], "method": "compile"}, student,
                    trainset=[{"__ref__": "paris", "type": "ignored"}])
    assert compiled["type"] == "dspy.predict.chain_of_thought.ChainOfThought"
    state = call(w, session, {"ref": compiled["__ref__"], "method": "dump_state"})
    assert state["predict"]["demos"] == [{"question": "Capital of France?", "answer": "Paris"}]
    predictors = call(w, session, {"ref": compiled["__ref__"], "method": "named_predictors"})
    assert predictors == [["predict", {"__ref__": predictors[0][1]["__ref__"], "type": PREDICT}]]
    assert call(w, session, "dspy.Example", question="q", answer="a") == {"question": "q", "answer": "a"}
    assert call(w, session, "dspy.evaluate.metrics.EM", "the Paris", ["paris"]) is True


def test_program_refs_are_called_as_their_module(w, session):
    ref = w.call("program.create", {"module": "ChainOfThought", "signature": "question -> answer"},
                 session_id=session)["ref"]
    assert call(w, session, {"ref": ref}, question="Capital of France?") == {"reasoning": "It is Paris.",
                                                                              "answer": "Paris"}


@pytest.mark.parametrize("target", [
    "os.system",
    "builtins.eval",
    "dspy.__builtins__",
    "dspy.Predict.__class__",
    "dspy._private",
    "dspy.utils.os.getcwd",                       # a module DSPy imported is not DSPy
    "dspy.evaluate.evaluate.tqdm.tqdm",
    "dspyx.anything",
    "dspy.utils.magicattr.get",                   # walks dotted attributes, dunders included
    "dspy.LocalInterpreter",                      # runs Python code
    "dspy.PythonInterpreter",
    "dspy.ProgramOfThought",
    "dspy.CodeAct",
    "dspy.load",                                  # reads pickles with allow_pickle=True
    "dspy.Evaluate",                              # writes files (save_as_csv)
    "dspy",
    "dspy.NoSuchThing",                           # not in the table: whether it exists is not looked up
    "dspy.Predict.nope",
    {"ref": "PLACEHOLDER", "method": "__class__"},
    {"ref": "PLACEHOLDER", "method": "forward.__globals__"},
    {"ref": "PLACEHOLDER", "method": "batch"},    # a real method, but not one of the allowed ones
    {"ref": "PLACEHOLDER", "method": "signature"},
])
def test_forbidden_targets(w, session, target):
    if isinstance(target, dict):
        target = {**target, "ref": call(w, session, "dspy.Predict", "q -> a")["__ref__"]}
    err = error_of(w, session, "call", {"target": target, "args": ["echo hacked"]})
    assert err.type == "forbidden"
    assert err.details["reason"] and err.details["target"]


@pytest.mark.parametrize("args", [
    {"target": 42},
    {"target": "dspy.Predict", "args": "question -> answer"},
    {"target": "dspy.Predict", "kwargs": []},
    {"target": "dspy.Predict", "args": ["q -> a"], "store_as": "r12"},
])
def test_bad_calls(w, session, args):
    assert error_of(w, session, "call", args).type == "bad_request"


def test_release_frees_a_ref(w, session):
    ref = call(w, session, "dspy.Predict", "question -> answer")["__ref__"]
    assert w.call("release", {"ref": ref}, session_id=session) == {"released": True}
    assert error_of(w, session, "call", {"target": {"ref": ref}, "kwargs": {"question": "q"}}).type == "unknown_ref"
    assert error_of(w, session, "release", {"ref": ref}).type == "unknown_ref"


def test_a_ref_from_another_session_is_unknown(w, session):
    ref = call(w, session, "dspy.Predict", "question -> answer")["__ref__"]
    other = new_session_id()
    assert error_of(w, other, "call", {"target": {"ref": ref}, "kwargs": {"question": "q"}}).type == "unknown_ref"
    err = error_of(w, other, "call", {"target": "dspy.Example", "kwargs": {"nested": [{"x": {"__ref__": ref}}]}})
    assert err.type == "unknown_ref"
    assert error_of(w, other, "release", {"ref": ref}).type == "unknown_ref"
    assert call(w, session, {"ref": ref}, question="Capital of France?") == {"answer": "Paris"}  # still there


def test_lm_errors_keep_their_type(w, session):
    predict = call(w, session, "dspy.Predict", "question -> answer")
    err = error_of(w, session, "call", {"target": {"ref": predict["__ref__"]}, "kwargs": {"question": "unscripted"}})
    assert err.type == "lm_error"


def test_allow_module_and_allow_widen_the_table_and_stats_shows_them():
    with tempfile.TemporaryFile("w+") as log, spawn("--allow-module", "json", "--allow-module", "dspy.teleprompt",
                                                    "--allow", "dspy.Evaluate", stderr=log) as worker:
        assert worker.call("call", {"target": "json.dumps", "args": [[1, 2]]}) == "[1, 2]"
        fewshot = worker.call("call", {"target": "dspy.teleprompt.LabeledFewShot", "kwargs": {"k": 2}})
        assert fewshot["type"] == "dspy.teleprompt.vanilla.LabeledFewShot"
        assert worker.call("call", {"target": "dspy.Predict", "args": ["q -> a"]})["type"] == PREDICT  # the table
        evaluate = worker.call("call", {"target": "dspy.Evaluate", "kwargs": {"devset": []}})
        assert evaluate["type"] == "dspy.evaluate.evaluate.Evaluate"
        with pytest.raises(RemoteError) as info:
            worker.call("call", {"target": "dspy.utils.magicattr.get", "args": [1, "real"]})
        assert info.value.type == "forbidden"
        allow = worker.call("stats")["allow"]
        assert allow["modules"] == ["json", "dspy.teleprompt"] and allow["paths"] == []
        assert {"dspy.Predict", "dspy.Evaluate", "dspy.Example"} <= set(allow["names"])
        assert worker.unrouted.empty()


# ---- dspy.stream format "openai" ---------------------------------------------------------------

def test_stream_in_openai_chunk_format(w, session):
    request = w.request("dspy.stream", {"signature": "question -> answer", "module": "ChainOfThought",
                                        "inputs": {"question": "Capital of France?"}, "fields": ["answer"],
                                        "format": "openai"}, session_id=session)
    chunks = list(request)
    result = request.result()
    openai = [c for c in chunks if c.get("object") == "chat.completion.chunk"]
    assert [c for c in chunks if c not in openai] == [c for c in chunks if c.get("event") == "status"]
    assert {c["id"] for c in openai} == {f"chatcmpl-{request.id}"}
    assert all(c["model"] == "scripted/calls" and isinstance(c["created"], int) for c in openai)
    deltas = [c["choices"][0]["delta"] for c in openai]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == result["outputs"]["answer"] == "Paris"
    assert all(c["field"] == "answer" and c["choices"][0]["finish_reason"] is None for c in openai[:-1])
    assert openai[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert openai[-1] == chunks[-1]


def test_an_unknown_stream_format_is_refused(w, session):
    err = error_of(w, session, "dspy.stream", {"signature": "question -> answer",
                                               "inputs": {"question": "q"}, "format": "sse"})
    assert err.type == "bad_request"
