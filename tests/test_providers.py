"""Real LM providers: the worker process against a local OpenAI-compatible server (tests/lmserver.py),
through both DSPy engines, the default (lm15) and ``engine: "litellm"``.

Nothing leaves 127.0.0.1.  DSPy's real HTTP clients, adapters, streaming and
ReAct run; only the server at the other end is ours.
"""

from __future__ import annotations

import itertools
import tempfile
import time

import pytest

from bridge import RemoteError, Worker
from tests.conftest import ROOT, spawn
from tests.lmserver import LMServer

QA = "question -> answer"
ENGINES = ["lm15", "litellm"]
TOOLS = [{"name": "lookup", "description": "Look a city up.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
_names = itertools.count(1)
assert time.get_clock_info("perf_counter").implementation == time.get_clock_info("monotonic").implementation


@pytest.fixture(scope="module")
def server():
    with LMServer() as s:
        yield s
        assert not s.events("server_error"), s.events("server_error")


@pytest.fixture(scope="module")
def w():
    with tempfile.TemporaryFile("w+") as log, spawn(stderr=log, tools={"lookup": lambda city: f"{city}: 2.1M people"}) as worker:
        yield worker
        assert worker.unrouted.empty(), worker.unrouted.get()


def lm_args(server: LMServer, engine: str, model: str, key: str = "sk-test", **extra) -> dict:
    args = {"model": f"openai/{model}", "api_base": server.url, "api_key": key, "num_retries": 0, "cache": False,
            **extra}
    return {**args, "engine": "litellm"} if engine == "litellm" else args


def setup(w, server, engine, script, *, key: str = "sk-test", lm: dict | None = None, **pacing) -> tuple[str, str]:
    """A fresh server model and a fresh session whose LM it is: ``(session_id, model)``."""
    name = f"m{next(_names)}"
    server.add(name, script, key=key, **pacing)
    session = f"{engine}-{name}"
    w.call("lm.configure", lm_args(server, engine, name, key, **(lm or {})), session_id=session, timeout=60)
    return session, name


def always(reply: dict) -> list:
    return [{"when": {}, "reply": reply}]


# ---- the four program shapes --------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_predict_and_usage_equal_to_the_servers(w, server, engine):
    session, model = setup(w, server, engine, always({"answer": "Paris"}))
    call = w.request("dspy.predict", {"signature": QA, "inputs": {"question": "Capital of France?"}},
                     session_id=session)
    assert call.result() == {"outputs": {"answer": "Paris"}}
    [reply] = server.events("reply", model)
    lm = call.terminal["meta"]["lm"]
    assert (lm["calls"], lm["input_tokens"], lm["output_tokens"]) == (
        1, reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"])


@pytest.mark.parametrize("engine", ENGINES)
def test_stream_tokens_arrive_while_the_server_is_still_sending(w, server, engine):
    answer = "one two three four five six seven eight"
    session, model = setup(w, server, engine, always({"answer": answer}), token_delay_ms=60)
    call = w.request("dspy.stream", {"signature": QA, "inputs": {"question": "count"}}, session_id=session)
    chunks = list(call)
    assert "".join(c["text"] for c in chunks if c.get("event") == "token") == answer
    [request] = server.events("request", model)
    [reply] = server.events("reply", model)
    assert request["stream"] and request["include_usage"]
    firsts = [t for t, f in zip(call.arrivals, call.frames) if f["type"] == "chunk" and f["data"]["event"] == "token"]
    assert firsts[0] < reply["t"] - 0.2, "the first token came only after the server had finished"
    assert firsts[-1] - firsts[0] > 0.2
    lm = call.terminal["meta"]["lm"]
    assert (lm["input_tokens"], lm["output_tokens"]) == (reply["usage"]["prompt_tokens"],
                                                        reply["usage"]["completion_tokens"])


@pytest.mark.parametrize("engine", ENGINES)
def test_react_with_a_host_tool(w, server, engine):
    script = [{"next_thought": "Look it up.", "next_tool_name": "lookup", "next_tool_args": {"city": "Paris"}},
              {"next_thought": "Done.", "next_tool_name": "finish", "next_tool_args": {}},
              {"reasoning": "The tool said so.", "answer": "2.1M"}]
    session, model = setup(w, server, engine, script)
    call = w.request("dspy.react", {"signature": QA, "inputs": {"question": "Population of Paris?"},
                                    "tools": TOOLS}, session_id=session)
    chunks = list(call)
    assert call.result()["outputs"]["answer"] == "2.1M"
    assert [c for c in chunks if c["event"] == "observation"][0]["result"] == "Paris: 2.1M people"
    assert len(server.events("reply", model)) == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_with_a_failing_item(w, server, engine):
    script = [{"when": {"question": "a"}, "reply": {"answer": "A"}}, {"when": {"question": "c"}, "reply": {"answer": "C"}}]
    session, model = setup(w, server, engine, script)
    call = w.request("dspy.batch", {"signature": QA, "items": [{"question": q} for q in "abc"], "concurrency": 3},
                     session_id=session)
    chunks = list(call)
    assert call.result() == {"total": 3, "succeeded": 2, "failed": 1}
    by_index = {c["index"]: c for c in chunks}
    assert by_index[0]["outputs"] == {"answer": "A"} and by_index[2]["outputs"] == {"answer": "C"}
    assert by_index[1]["event"] == "item_error" and by_index[1]["error"]["type"] == "lm_error"
    assert call.terminal["meta"]["lm"]["calls"] == 3 and call.terminal["meta"]["lm"]["failed"] == 1


# ---- cost ----------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_cost_from_the_price_option(w, server, engine):
    price = {"input_per_mtok": 2.0, "output_per_mtok": 10.0}
    session, model = setup(w, server, engine, always({"answer": "x"}), lm={"price": price})
    call = w.request("dspy.predict", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    call.result()
    [reply] = server.events("reply", model)
    usage = reply["usage"]
    expected = (usage["prompt_tokens"] * 2.0 + usage["completion_tokens"] * 10.0) / 1e6
    assert call.terminal["meta"]["lm"]["cost_usd"] == pytest.approx(expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_cost_from_dspys_price_table(w, server, engine):
    server.add("gpt-4o-mini", always({"answer": "x"}))
    session = f"{engine}-priced"
    w.call("lm.configure", lm_args(server, engine, "gpt-4o-mini"), session_id=session, timeout=60)
    call = w.request("dspy.predict", {"signature": QA, "inputs": {"question": f"priced {engine}"}},
                     session_id=session)
    call.result()
    lm = call.terminal["meta"]["lm"]
    assert lm["cost_usd"] is not None and lm["cost_usd"] > 0


# ---- cancel and timeout close the provider's connection --------------------------------------

def _slow_request(w, session, command: str) -> dict:
    """Arguments of ``command`` that make one LM call (two for the batch) with the question "slow"."""
    program = {"signature": QA}
    inputs = {"question": "slow"}
    if command == "program.call":
        return {"ref": w.call("program.create", {**program, "module": "Predict"}, session_id=session)["ref"],
                "inputs": inputs}
    return {
        "dspy.predict": {**program, "inputs": inputs},
        "dspy.stream": {**program, "inputs": inputs},
        "dspy.batch": {**program, "items": [inputs, inputs], "concurrency": 2},
        "dspy.react": {**program, "inputs": inputs, "tools": TOOLS},
        "pipeline.run": {"steps": [{"name": "ask", "signature": QA}], "inputs": inputs},
        "dspy.evaluate": {"program": program, "devset": [{"inputs": inputs, "outputs": {"answer": "x"}}],
                          "metric": "exact_match"},
    }[command]


COMMANDS = ["dspy.predict", "dspy.stream", "dspy.batch", "dspy.react", "program.call", "pipeline.run",
            "dspy.evaluate"]


@pytest.mark.parametrize("engine,command", [("lm15", c) for c in COMMANDS] + [("litellm", "dspy.predict"),
                                                                                ("litellm", "dspy.stream")])
def test_cancel_closes_the_providers_connection(w, server, engine, command):
    session, model = setup(w, server, engine, always({"answer": "late"}), first_byte_ms=30_000)
    call = w.request(command, _slow_request(w, session, command), session_id=session)
    server.wait_for(lambda log: any(e["event"] == "request" and e["model"] == model for e in log))
    sent = time.monotonic()
    call.cancel()
    with pytest.raises(RemoteError) as info:
        call.result()
    assert info.value.type == "cancelled"
    gone = server.wait_for(lambda log: [e for e in log if e["event"] == "disconnect" and e["model"] == model])
    assert gone[0]["t"] - sent < 0.05, f"the connection closed {gone[0]['t'] - sent:.3f} s after the cancel"
    assert w.call("ping")["pong"] is True


@pytest.mark.parametrize("engine", ENGINES)
def test_timeout_closes_the_providers_connection(w, server, engine):
    session, model = setup(w, server, engine, always({"answer": "late"}), first_byte_ms=30_000)
    sent = time.monotonic()
    call = w.request("dspy.predict", {"signature": QA, "inputs": {"question": "slow"}}, session_id=session,
                     timeout_ms=500)
    with pytest.raises(RemoteError) as info:
        call.result()
    assert info.value.type == "timeout"
    [gone] = server.wait_for(lambda log: [e for e in log if e["event"] == "disconnect" and e["model"] == model])
    assert 0.5 <= gone["t"] - sent < 0.55 + 0.05
    lm = call.terminal["meta"]["lm"]
    assert (lm["calls"], lm["cancelled"], lm["input_tokens"]) == (1, 1, 0)


# ---- faults ----------------------------------------------------------------------------------

# DSPy's error code for each fault, per engine (docs/providers.md has the table): LiteLLM calls
# most failures "server"; lm15 tells a malformed reply ("provider") from a cut connection.
FAULTS = {
    "lm15": {("500", False): "server", ("429", False): "rate_limit", ("bad_json", False): "provider",
             ("drop", False): "transport", ("bad_sse", True): "unexpected", ("drop", True): "transport"},
    "litellm": {("500", False): "server", ("429", False): "rate_limit", ("bad_json", False): "server",
                ("drop", False): "server", ("bad_sse", True): "server", ("drop", True): "server"},
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault,stream", list(FAULTS["lm15"]))
def test_every_fault_is_an_lm_error_and_the_worker_lives(w, server, engine, fault, stream):
    session, model = setup(w, server, engine, always({"answer": "fine"}))
    server.fault(model, fault)
    command = "dspy.stream" if stream else "dspy.predict"
    call = w.request(command, {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    with pytest.raises(RemoteError) as info:
        call.result()
    assert info.value.type == "lm_error", info.value.frame
    assert info.value.details["code"] == FAULTS[engine][fault, stream], info.value.frame
    assert call.terminal["meta"]["lm"]["failed"] == 1
    assert w.call("dspy.predict", {"signature": QA, "inputs": {"question": "q"}},
                  session_id=session) == {"outputs": {"answer": "fine"}}


# ---- sessions ------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_two_sessions_keep_their_model_and_key(w, server, engine):
    first, model_a = setup(w, server, engine, always({"answer": "from a"}), key="key-a")
    second, model_b = setup(w, server, engine, always({"answer": "from b"}), key="key-b")
    calls = [w.request("dspy.predict", {"signature": QA, "inputs": {"question": f"q{i}"}}, session_id=s)
             for i in range(4) for s in (first, second)]
    answers = [c.result()["outputs"]["answer"] for c in calls]
    assert answers == ["from a", "from b"] * 4
    assert {e["auth"] for e in server.events("request", model_a)} == {"Bearer key-a"}
    assert {e["auth"] for e in server.events("request", model_b)} == {"Bearer key-b"}
    assert len(server.events("reply", model_a)) == len(server.events("reply", model_b)) == 4


# ---- lm.configure's options ----------------------------------------------------------------

def test_unknown_options_come_back_as_warnings(w, server):
    name = f"m{next(_names)}"
    server.add(name, always({"answer": "x"}))
    reply = w.call("lm.configure", lm_args(server, "lm15", name, temprature=0.2, temperature=0.1, drop_params=True),
                   session_id=f"warn-{name}")
    assert reply["warnings"] == [
        {"option": "drop_params", "message": "'drop_params' is an option neither DSPy nor its native client "
                                             "knows; it was passed to the provider as is"},
        {"option": "temprature", "did_you_mean": "temperature",
         "message": "'temprature' is an option neither DSPy nor its native client knows; it was passed to the "
                    "provider as is"}]
    reply = w.call("lm.configure", lm_args(server, "litellm", name, drop_params=True, max_connections=5,
                                           stream_usage=False, price={"input_per_mtok": 1, "output_per_mtok": 1}),
                   session_id=f"warn-{name}", timeout=60)
    assert "warnings" not in reply


@pytest.mark.parametrize("option,value", [("max_connections", 0), ("max_connections", True),
                                          ("stream_usage", "no")])
def test_bad_connection_options_are_bad_requests(w, server, option, value):
    with pytest.raises(RemoteError) as info:
        w.call("lm.configure", lm_args(server, "lm15", "m", **{option: value}), session_id="bad-options")
    assert info.value.type == "bad_request" and option in info.value.message


def _most_at_once(server: LMServer, model: str) -> int:
    edges = sorted([(e["t"], 1) for e in server.events("request", model)] +
                   [(e["t"], -1) for e in server.events("reply", model)])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_max_connections_bounds_the_native_clients_connections(w, server):
    session, model = setup(w, server, "lm15", always({"answer": "x"}), first_byte_ms=200,
                           lm={"max_connections": 2})
    calls = [w.request("dspy.predict", {"signature": QA, "inputs": {"question": f"q{i}"}}, session_id=session)
             for i in range(6)]
    assert all(c.result()["outputs"] == {"answer": "x"} for c in calls)
    assert _most_at_once(server, model) == 2
    session, model = setup(w, server, "lm15", always({"answer": "x"}), first_byte_ms=200)
    calls = [w.request("dspy.predict", {"signature": QA, "inputs": {"question": f"q{i}"}}, session_id=session)
             for i in range(6)]
    assert all(c.result()["outputs"] == {"answer": "x"} for c in calls)
    assert _most_at_once(server, model) == 6


def test_stream_usage_off_stops_the_native_client_asking_for_it(w, server):
    session, model = setup(w, server, "lm15", always({"answer": "x y"}), lm={"stream_usage": False})
    call = w.request("dspy.stream", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    assert "".join(c["text"] for c in call if c.get("event") == "token") == "x y"
    assert call.terminal["type"] == "result", call.terminal
    assert call.terminal["meta"]["lm"]["calls"] == 1  # tokens unknown: the server sent no usage unasked
    [request] = server.events("request", model)
    assert request["stream"] and not request["stream_options"]
    session, model = setup(w, server, "lm15", always({"answer": "x y"}))  # the default still asks
    list(w.request("dspy.stream", {"signature": QA, "inputs": {"question": "q"}}, session_id=session))
    [request] = server.events("request", model)
    assert request["stream"] and request["include_usage"]


def test_stream_usage_off_stops_asking_litellm_for_it(w, server):
    session, model = setup(w, server, "litellm", always({"answer": "x y"}), lm={"stream_usage": False})
    list(w.request("dspy.stream", {"signature": QA, "inputs": {"question": "q"}}, session_id=session))
    [request] = server.events("request", model)
    assert request["stream"] and not request["stream_options"]


def test_litellm_and_its_first_stream_imports_load_before_lm_configure_answers(server):
    modules = ["litellm", "litellm.litellm_core_utils.default_encoding", "tiktoken_ext.openai_public"]
    with tempfile.TemporaryFile("w+") as log, spawn(stderr=log) as fresh:
        fresh.call("lm.configure", {"model": "scripted/x", "script": []}, timeout=60)
        assert fresh.call("test.loaded", {"modules": modules}) == {m: False for m in modules}
        server.add("fresh", always({"answer": "x"}))
        fresh.call("lm.configure", lm_args(server, "litellm", "fresh"), timeout=60)
        assert fresh.call("test.loaded", {"modules": modules}) == {m: True for m in modules}


# ---- accounting ------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_a_cache_hit_costs_nothing(w, server, engine):
    price = {"input_per_mtok": 2.0, "output_per_mtok": 10.0}
    session, model = setup(w, server, engine, always({"answer": "cached"}), lm={"cache": True, "price": price})
    args = {"signature": QA, "inputs": {"question": f"cache me {time.time()} {engine}"}}
    first = w.request("dspy.predict", args, session_id=session)
    first.result()
    second = w.request("dspy.predict", args, session_id=session)
    second.result()
    assert len(server.events("request", model)) == 1
    paid, hit = first.terminal["meta"]["lm"], second.terminal["meta"]["lm"]
    assert paid["cost_usd"] > 0 and paid["cache_hits"] == 0
    assert hit == {"calls": 1, "cache_hits": 1, "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0,
                   "cancelled": 0, "failed": 0}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_cancelled_stream_counts_as_a_call(w, server, engine):
    session, model = setup(w, server, engine, always({"answer": "a b c d e f g h i j"}), token_delay_ms=100)
    call = w.request("dspy.stream", {"signature": QA, "inputs": {"question": "q"}}, session_id=session,
                     telemetry=True)
    next(c for c in call if c["event"] == "token")
    call.cancel()
    with pytest.raises(RemoteError):
        call.result()
    lm = call.terminal["meta"]["lm"]
    assert (lm["calls"], lm["cancelled"], lm["failed"], lm["input_tokens"], lm["output_tokens"]) == (1, 1, 0, 0, 0)
    [end] = [f for f in call.frames if f["type"] == "telemetry" and f["event"] == "lm_end"]
    assert end["metadata"]["error"] == "CancelledError"
    assert end["measurements"]["input_tokens"] is None and end["measurements"]["output_tokens"] is None
    server.wait_for(lambda log: [e for e in log if e["event"] == "disconnect" and e["model"] == model])
    stats = w.call("stats")["lm_by_session"][session]
    assert stats["cancelled"] == 1 and stats["calls"] == 1


# ---- transcripts -------------------------------------------------------------------------

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_recording_replays_with_no_network_and_the_same_error_frame(server, engine, tmp_path):
    """Recorded against the server (a predict, a stream, a 500); replayed with api_base on a closed port."""
    import json

    from tests.test_transcripts import replayed

    path = tmp_path / "provider.jsonl"
    name = f"m{next(_names)}"
    server.add(name, always({"answer": "recorded"}))
    with tempfile.TemporaryFile("w+") as log, spawn("--record", str(path), stderr=log) as rec:
        rec.call("lm.configure", lm_args(server, engine, name), timeout=60)
        rec.call("dspy.predict", {"signature": QA, "inputs": {"question": "one"}})
        list(rec.request("dspy.stream", {"signature": QA, "inputs": {"question": "two"}}))
        server.fault(name, "500")
        with pytest.raises(RemoteError) as recorded_error:
            rec.call("dspy.predict", {"signature": QA, "inputs": {"question": "three"}})
        assert rec.shutdown() == 0
    assert recorded_error.value.details["code"] == "server"
    closed = f"http://127.0.0.1:{_closed_port()}/v1"
    text = path.read_text(encoding="utf-8").replace(server.url, closed)
    assert server.url not in text
    path.write_text(text, encoding="utf-8")
    before = len(server.events("request", name))
    # a transcript is data: the test handlers and diagnostics come from the replay's command line
    code, out = replayed(str(path), timeout=60, trust={"handlers": ["tests.handlers_for_tests"], "diagnostics": True})
    assert code == 0, out
    assert len(server.events("request", name)) == before
    errors = [json.loads(line)["frame"] for line in text.splitlines() if '"type": "error"' in line
              or '"type":"error"' in line]
    assert [e["error"] for e in errors if e.get("type") == "error"] == [recorded_error.value.frame["error"]]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_missing_key_error_says_what_to_send(server, engine):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryFile("w+") as log, Worker.spawn(env=env, stderr=log) as fresh:
        args = {k: v for k, v in lm_args(server, engine, "keyless").items() if k not in ("api_key", "api_base")}
        fresh.call("lm.configure", args, timeout=60)
        with pytest.raises(RemoteError) as info:
            fresh.call("dspy.predict", {"signature": QA, "inputs": {"question": "q"}})
    assert info.value.type == "lm_error" and "api_key" in info.value.message
    assert "From the host: send \"api_key\" in lm.configure" in info.value.message


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", ["500", "429"])
def test_dspy_retries_a_fault_within_one_counted_call(w, server, engine, fault):
    """``num_retries`` is DSPy's: the retry waits (1 s here: 2**0, or Retry-After: 1) inside one call."""
    session, model = setup(w, server, engine, always({"answer": "after a retry"}), lm={"num_retries": 1})
    server.fault(model, fault)
    call = w.request("dspy.predict", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    assert call.result() == {"outputs": {"answer": "after a retry"}}
    first, second = server.events("request", model)
    assert 0.9 < second["t"] - first["t"] < 2.0
    lm = call.terminal["meta"]["lm"]
    assert (lm["calls"], lm["failed"]) == (1, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_lm_clients_timeout_is_an_lm_error(w, server, engine):
    session, model = setup(w, server, engine, always({"answer": "late"}), first_byte_ms=5000, lm={"timeout": 0.3})
    with pytest.raises(RemoteError) as info:
        w.call("dspy.predict", {"signature": QA, "inputs": {"question": "q"}}, session_id=session)
    code = {"lm15": "transport", "litellm": "timeout"}[engine]  # lm15: "read timed out waiting for…"
    assert info.value.type == "lm_error" and info.value.details["code"] == code, info.value.frame
    server.wait_for(lambda log: [e for e in log if e["event"] == "disconnect" and e["model"] == model])


def test_a_cancelled_call_stops_its_thread_at_the_next_lm_call(server):
    """``call`` runs in a thread by design: the LM call in flight finishes, and no other starts.
    ``Example.with_inputs`` and ``Predict.batch`` are reached with ``--allow-module dspy``."""
    with tempfile.TemporaryFile("w+") as log, spawn("--allow-module", "dspy", stderr=log) as w:
        session, model = setup(w, server, "lm15", always({"answer": "x"}), first_byte_ms=500)
        predict = w.call("call", {"target": "dspy.Predict", "args": ["question -> answer"]}, session_id=session)
        examples = []
        for q in ("one", "two", "three"):
            example = w.call("call", {"target": "dspy.Example", "kwargs": {"question": q}, "store_as": f"raw_{q}"},
                             session_id=session)
            examples.append(w.call("call", {"target": {"ref": example["__ref__"], "method": "with_inputs"},
                                            "args": ["question"], "store_as": f"ex_{q}"}, session_id=session))
        call = w.request("call", {"target": {"ref": predict["__ref__"], "method": "batch"},
                                  "kwargs": {"examples": examples, "num_threads": 1, "disable_progress_bar": True}},
                         session_id=session)
        server.wait_for(lambda log: any(e["event"] == "request" and e["model"] == model for e in log))
        call.cancel()
        with pytest.raises(RemoteError):
            call.result()
        server.wait_for(lambda log: any(e["event"] == "reply" and e["model"] == model for e in log))
        with pytest.raises(AssertionError, match="timed out"):  # the next item would start within ms
            server.wait_for(lambda log: len([e for e in log if e["event"] == "request" and e["model"] == model]) > 1,
                            timeout=1.5)
