"""dspy.evaluate and dspy.optimize through a real worker: DSPy's own optimizers over the scripted engine."""

from __future__ import annotations

import importlib.util
import tempfile
import threading
import time

import pytest

from tests.conftest import error_of, new_session_id, spawn, streamed

QA = [("What is 1+1?", "2"), ("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Color of the sky?", "blue")]
WRONG = 3  # the LM gets this one wrong
SCRIPT = [{"when": {"question": q}, "reply": {"reasoning": f"I know {q}", "answer": "green" if i == WRONG else a}}
          for i, (q, a) in enumerate(QA)]
ITEMS = [{"inputs": {"question": q}, "outputs": {"answer": a}} for q, a in QA]
COT = {"module": "ChainOfThought", "signature": "question -> answer"}
judged: list[dict] = []
judged_lock = threading.Lock()


def judge(example: dict, prediction: dict) -> float:
    with judged_lock:
        judged.append({"example": example, "prediction": prediction})
    return 1.0 if example["outputs"]["answer"].lower() == prediction["answer"].lower() else 0.25


def rude_judge(example: dict, prediction: dict) -> str:
    return "great"


MODEL = "scripted/opt"
HOST_TOOLS = {"judge": judge, "rude": rude_judge}
pytestmark = pytest.mark.usefixtures("clean_stream")


# ---- evaluate ----------------------------------------------------------------------------

def test_evaluate_with_a_builtin_metric(w, session):
    chunks, result = streamed(w, session, "dspy.evaluate",
                              {"program": COT, "devset": ITEMS, "metric": "exact_match", "concurrency": 2})
    assert result == {"score": 0.75, "n": 4}
    assert sorted(c["index"] for c in chunks) == [0, 1, 2, 3]
    by_index = {c["index"]: c for c in chunks}
    assert by_index[0] == {"event": "example", "index": 0, "score": 1.0,
                           "outputs": {"reasoning": "I know What is 1+1?", "answer": "2"}}
    assert by_index[WRONG]["score"] == 0.0 and by_index[WRONG]["outputs"]["answer"] == "green"


def test_evaluate_with_a_host_tool_metric(w, session):
    judged.clear()
    program = w.call("program.create", COT, session_id=session)["ref"]
    chunks, result = streamed(w, session, "dspy.evaluate",
                              {"program": program, "devset": ITEMS, "metric": {"tool": "judge"}})
    assert result == {"score": (3 + 0.25) / 4, "n": 4}
    assert {c["index"]: c["score"] for c in chunks} == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.25}
    assert len(judged) == 4
    call = next(j for j in judged if j["example"]["inputs"]["question"] == QA[2][0])
    assert call == {"example": ITEMS[2], "prediction": {"reasoning": "I know Capital of France?", "answer": "Paris"}}


@pytest.mark.parametrize("metric, expected, score", [
    ("exact_match", "the  Paris!", 1.0),       # DSPy's normalization: case, articles, punctuation, spaces
    ("contains", "paris", 1.0),
    ("contains", "Lyon", 0.0),
    ("f1", "Paris France", 2 / 3),
])
def test_builtin_metrics(w, session, metric, expected, score):
    devset = [{"inputs": {"question": QA[2][0]}, "outputs": {"answer": expected}}]
    result = w.call("dspy.evaluate", {"program": COT, "devset": devset, "metric": metric}, session_id=session)
    assert result["score"] == pytest.approx(score)


def test_a_failing_example_scores_zero_and_says_why(w):
    session = new_session_id()
    w.call("lm.configure", {"model": "scripted/opt", "script": [
        {"when": {"question": QA[0][0]}, "reply": {"answer": "2"}},
        {"when": {"question": QA[1][0]}, "reply": {"raw": "garbled"}}]}, session_id=session)
    chunks, result = streamed(w, session, "dspy.evaluate",
                              {"program": {"signature": "question -> answer"}, "devset": ITEMS[:2],
                               "metric": "exact_match"})
    assert result == {"score": 0.5, "n": 2}
    failed = next(c for c in chunks if c["index"] == 1)
    assert failed["score"] == 0.0 and failed["error"]["type"] == "adapter_parse_error"


def test_a_host_metric_that_answers_no_number_fails_the_request(w, session):
    err = error_of(w, session, "dspy.evaluate", {"program": COT, "devset": ITEMS[:1], "metric": {"tool": "rude"}})
    assert err.type == "bad_request" and "not a number" in err.message


@pytest.mark.parametrize("args", [
    {"program": COT, "devset": ITEMS, "metric": "bleu"},
    {"program": COT, "devset": ITEMS, "metric": {"tool": ""}},
    {"program": COT, "devset": [], "metric": "exact_match"},
    {"program": COT, "devset": [{"inputs": {"q": "x"}, "outputs": {"answer": "y"}}], "metric": "exact_match"},
    {"program": COT, "devset": [{"inputs": {"question": "x"}, "outputs": {"nope": "y"}}], "metric": "exact_match"},
    {"program": COT, "devset": [{"inputs": {"question": "x"}}], "metric": "f1"},
    {"program": 42, "devset": ITEMS, "metric": "f1"},
    {"program": COT, "devset": ITEMS, "metric": "f1", "concurrency": 0},
])
def test_bad_evaluations_are_refused(w, session, args):
    assert error_of(w, session, "dspy.evaluate", args).type == "bad_request"


# ---- optimize ------------------------------------------------------------------------------

def progress(chunks: list[dict]) -> list[dict]:
    assert all(c["event"] == "progress" for c in chunks)
    return chunks


def test_bootstrap_few_shot_compiles_a_program_that_is_called_and_saved(w, session):
    chunks, result = streamed(w, session, "dspy.optimize", {
        "optimizer": "BootstrapFewShot", "program": COT, "trainset": ITEMS, "metric": "exact_match",
        "params": {"max_bootstrapped_demos": 4, "max_labeled_demos": 0}})
    assert progress(chunks) == [
        {"event": "progress", "phase": "start", "optimizer": "BootstrapFewShot", "trainset": 4, "valset": None},
        {"event": "progress", "phase": "bootstrap"},
        {"event": "progress", "phase": "bootstrap", "example": 0, "score": 1.0, "kept": True},
        {"event": "progress", "phase": "bootstrap", "example": 1, "score": 1.0, "kept": True},
        {"event": "progress", "phase": "bootstrap", "example": 2, "score": 1.0, "kept": True},
        {"event": "progress", "phase": "bootstrap", "example": 3, "score": 0.0, "kept": False},
        {"event": "progress", "phase": "validate"},
        {"event": "progress", "phase": "validate", "n": 4, "score": 0.75},
    ]
    assert result["score"] == 0.75
    demos = result["state"]["predict"]["demos"]
    assert [d["question"] for d in demos] == [q for q, _ in QA[:3]]
    assert all(d["augmented"] and d["reasoning"].startswith("I know") for d in demos)

    ref = result["ref"]
    called = w.call("program.call", {"ref": ref, "inputs": {"question": QA[1][0]}}, session_id=session)
    assert called["outputs"]["answer"] == "4"
    assert w.call("program.save", {"ref": ref}, session_id=session)["state"] == result["state"]


def test_random_search_reports_each_candidate_and_the_best(w, session):
    valset = ITEMS[:3]
    chunks, result = streamed(w, session, "dspy.optimize", {
        "optimizer": "BootstrapFewShotWithRandomSearch", "program": COT, "trainset": ITEMS, "valset": valset,
        "metric": {"tool": "judge"}, "params": {"num_candidate_programs": 1, "max_bootstrapped_demos": 1,
                                                "num_threads": 2}})
    evaluations = [c for c in progress(chunks) if c["phase"] == "evaluate" and "score" in c]
    assert [c["candidate"] for c in evaluations] == [1, 2, 3, 4]  # zero-shot, labels only, unshuffled, seed 0
    assert all(c["n"] == 3 and c["score"] == 1.0 and c["best"] == 1.0 for c in evaluations)
    phases = [c["phase"] for c in chunks if set(c) == {"event", "phase"}]
    assert phases == ["evaluate", "bootstrap", "evaluate", "bootstrap", "evaluate", "validate"]
    assert result["score"] == 1.0


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="MIPROv2 needs optuna (dspy[optuna])")
def test_mipro_v2_proposes_and_evaluates_offline(w):
    session = new_session_id()
    # MIPROv2's proposer asks the LM for instructions with its own signatures: one catch-all reply answers
    # them (fields a prompt does not ask for are dropped); the task's replies are matched first.
    proposer = {"when": {}, "reply": {"proposed_instruction": "Answer in one word.", "answer": "?"}}
    w.call("lm.configure", {"model": "scripted/opt", "script": [*SCRIPT, proposer]}, session_id=session)
    chunks, result = streamed(w, session, "dspy.optimize", {
        "optimizer": "MIPROv2", "program": COT, "trainset": ITEMS, "valset": ITEMS, "metric": "exact_match",
        "params": {"auto": None, "num_candidates": 2, "num_trials": 2, "minibatch": False, "num_threads": 1,
                   "max_bootstrapped_demos": 1, "max_labeled_demos": 1, "program_aware_proposer": False,
                   "data_aware_proposer": False}})
    phases = [c["phase"] for c in progress(chunks) if set(c) == {"event", "phase"}]
    assert phases == ["propose", "evaluate", "validate"]
    scores = [c for c in chunks if c["phase"] == "evaluate" and "score" in c]
    assert len(scores) >= 2 and all(c["score"] == 0.75 and c["best"] == 0.75 for c in scores)
    assert result["score"] == 0.75 and result["state"]["predict"]["signature"]["instructions"]


@pytest.mark.parametrize("args, words", [
    ({"optimizer": "COPRO"}, "unknown optimizer"),
    ({"optimizer": "BootstrapFewShot", "params": {"max_demos": 1}}, "takes no params ['max_demos']"),
    ({"optimizer": "BootstrapFewShot", "params": {"metric": "x"}}, "takes no params ['metric']"),
    ({"optimizer": "BootstrapFewShot", "program": {"module": "ReAct", "signature": "q -> a",
                                                   "tools": [{"name": "t"}]}}, "ReAct"),
    ({"optimizer": "BootstrapFewShot", "program": {"signature": "question -> answer", "modul": "Predict"}},
     "'program' takes no key 'modul'"),
])
def test_bad_optimizations_are_refused(w, session, args, words):
    err = error_of(w, session, "dspy.optimize",
                   {"program": COT, "trainset": ITEMS, "metric": "exact_match", **args})
    assert err.type == "bad_request" and words in err.message


def test_an_optimizers_threads_are_bounded_by_max_threads():
    """``num_threads`` beyond ``--max-threads`` is refused; left out, it is the smaller of DSPy's
    default and ``--max-threads``, so an optimizer's own pool is bounded either way."""
    with tempfile.TemporaryFile("w+") as log, spawn("--max-threads", "2", stderr=log) as worker:
        session = new_session_id()
        worker.call("lm.configure", {"model": MODEL, "script": SCRIPT}, session_id=session)
        for threads in (3, 10_000, 0, "8"):
            err = error_of(worker, session, "dspy.optimize", {
                "optimizer": "BootstrapFewShotWithRandomSearch", "program": COT, "trainset": ITEMS,
                "metric": "exact_match", "params": {"num_threads": threads}})
            assert err.type == "bad_request" and "--max-threads=2" in err.message, threads
    from bridge.programs.optimize import Plan

    assert Plan.of("BootstrapFewShotWithRandomSearch", {}, 2).init["num_threads"] == 2
    assert Plan.of("BootstrapFewShotWithRandomSearch", {"num_threads": 1}, 2).init["num_threads"] == 1
    assert Plan.of("BootstrapFewShotWithRandomSearch", {}, 32).init["num_threads"] == 8  # DSPy's default
    assert "num_threads" not in Plan.of("BootstrapFewShot", {}, 2).init  # it has no pool of its own


def test_cancel_stops_the_optimizer_thread_promptly():
    """The terminal frame is immediate, and the thread stops at its next progress point: it makes no more LM calls."""
    questions = [f"question {i}" for i in range(20)]
    script = [{"answer": f"a{i}"} for i in range(25)]  # used in order: each LM call takes the next one
    trainset = [{"inputs": {"question": q}, "outputs": {"answer": "never"}} for q in questions]
    with tempfile.TemporaryFile("w+") as log, spawn(stderr=log) as worker:
        worker.call("lm.configure", {"model": "scripted/slow", "script": script, "token_delay_ms": 100})
        call = worker.request("dspy.optimize", {"optimizer": "BootstrapFewShot", "trainset": trainset,
                                                "program": {"signature": "question -> answer"},
                                                "metric": "exact_match", "params": {"max_labeled_demos": 0}})
        chunks = call.chunks()
        while next(chunks) != {"event": "progress", "phase": "bootstrap"}:
            pass
        assert next(chunks) == {"event": "progress", "phase": "bootstrap", "example": 0, "score": 0.0, "kept": False}
        pinged = time.perf_counter()
        assert worker.call("ping", timeout=2)["pong"] is True  # the loop answers while the optimizer runs
        assert time.perf_counter() - pinged < 0.5
        sent = time.perf_counter()
        call.cancel()
        for _ in chunks:
            pass
        assert call.terminal["error"]["type"] == "cancelled"
        assert call.arrivals[-1] - sent < 0.5
        assert worker.call("ping", timeout=2)["pong"] is True
        time.sleep(1.2)  # three LM calls' time (0.4 s each), had the thread gone on
        # The next reply in the script shows how many LM calls ran after example 0's: the one in flight at
        # the cancel (a2), none (a1) when the cancel beat it, one more (a3) on a very slow machine; not a4+.
        answer = worker.call("dspy.predict", {"signature": "question -> answer", "inputs": {"question": "q"}})
        assert answer["outputs"]["answer"] in ("a1", "a2", "a3")
        assert worker.unrouted.empty(), worker.unrouted.get()  # no frame for the cancelled id came after
