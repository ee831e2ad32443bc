"""ReAct with host tools, through the worker process and the scripted engine."""

from __future__ import annotations

import time

import pytest

from bridge import RemoteError
from tests.conftest import spawn

TOOLS = [
    {"name": "search", "description": "Search the docs.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what to find"}},
                    "required": ["query"]}},
    {"name": "calc", "description": "Evaluate arithmetic.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}},
]
SCRIPT = [
    {"next_thought": "Look it up.", "next_tool_name": "search", "next_tool_args": {"query": "tower height"}},
    {"next_thought": "Convert to feet.", "next_tool_name": "calc", "next_tool_args": {"expression": "330 * x"}},
    {"next_thought": "Fix the expression.", "next_tool_name": "calc", "next_tool_args": {"expression": "330 * 3.28"}},
    {"next_thought": "I have it.", "next_tool_name": "finish", "next_tool_args": {}},
    {"reasoning": "330 m is 1082.4 ft.", "answer": "1082.4"},
]


def host_tools(log: list | None = None) -> dict:
    def search(query):
        return {"hits": ["The tower is 330 m tall."]}

    def calc(expression):
        if "x" in expression:
            raise NameError("name 'x' is not defined")
        return round(eval(expression, {"__builtins__": {}}), 1)

    def slow(**kwargs):
        time.sleep(1.0)
        return "too late"

    return {"search": search, "calc": calc, "slow": slow}


def configure(w, script=SCRIPT, **fields) -> None:
    w.call("lm.configure", {"model": "scripted/agent", "script": script}, **fields)


def react_args(**extra) -> dict:
    return {"signature": "question -> answer", "inputs": {"question": "How tall is the tower in feet?"},
            "tools": TOOLS, **extra}


def step_events(chunks: list) -> list[tuple]:
    return [(c["event"], c["step"], c.get("tool")) for c in chunks if c["event"] in ("thought", "tool_call", "observation")]


@pytest.fixture
def agent():
    with spawn(tools=host_tools()) as w:
        configure(w)
        yield w


def test_three_tool_calls_one_failing(agent):
    call = agent.request("dspy.react", react_args())
    chunks = list(call)
    result = call.result()
    assert step_events(chunks) == [
        ("thought", 1, None), ("tool_call", 1, "search"), ("observation", 1, "search"),
        ("thought", 2, None), ("tool_call", 2, "calc"), ("observation", 2, "calc"),
        ("thought", 3, None), ("tool_call", 3, "calc"), ("observation", 3, "calc"),
        ("thought", 4, None),
    ]
    thoughts = [c["text"] for c in chunks if c["event"] == "thought"]
    assert thoughts == [s["next_thought"] for s in SCRIPT[:4]]
    observations = [c for c in chunks if c["event"] == "observation"]
    assert observations[0]["result"] == {"hits": ["The tower is 330 m tall."]}
    assert observations[1]["error"] == {"type": "NameError", "message": "name 'x' is not defined"}
    assert observations[2]["result"] == 1082.4
    calls = [c for c in chunks if c["event"] == "tool_call"]
    assert calls[1]["args"] == {"expression": "330 * x"} and len({c["rpc_id"] for c in calls}) == 3
    assert result["outputs"] == {"reasoning": "330 m is 1082.4 ft.", "answer": "1082.4"}
    trajectory = result["trajectory"]
    assert [t["tool"] for t in trajectory] == ["search", "calc", "calc", "finish"]
    assert trajectory[1]["observation"] == "Execution error in calc: NameError: name 'x' is not defined"
    assert trajectory[2]["observation"] == 1082.4 and trajectory[3]["observation"] == "Completed."


def test_streamed_tokens_come_before_their_step(agent):
    call = agent.request("dspy.react", react_args(stream=True))
    chunks = list(call)
    call.result()
    events = [c["event"] for c in chunks]
    assert "token" in events and "status" in events
    # the tokens of each step's thought arrive before the step's thought event
    for step, expected in enumerate(s["next_thought"] for s in SCRIPT[:4]):
        thought_at = [i for i, c in enumerate(chunks) if c["event"] == "thought"][step]
        previous = [i for i, c in enumerate(chunks) if c["event"] == "thought"][step - 1] if step else -1
        tokens = "".join(c["text"] for c in chunks[previous + 1:thought_at]
                         if c["event"] == "token" and c["field"] == "next_thought")
        assert tokens == expected
    answer = "".join(c["text"] for c in chunks if c["event"] == "token" and c["field"] == "answer")
    assert answer == "1082.4"


def test_a_tool_that_times_out_is_an_observation_and_the_agent_goes_on():
    script = [{"next_thought": "Try the slow one.", "next_tool_name": "slow", "next_tool_args": {}},
              {"next_thought": "Give up.", "next_tool_name": "finish", "next_tool_args": {}},
              {"reasoning": "No data.", "answer": "unknown"}]
    with spawn("--tool-timeout-ms", "200", tools=host_tools()) as w:
        configure(w, script)
        call = w.request("dspy.react", {**react_args(), "tools": [{"name": "slow", "description": "Slow."}]})
        chunks = list(call)
        result = call.result()
        observation = next(c for c in chunks if c["event"] == "observation")
        assert observation["error"]["type"] == "timeout"
        assert result["outputs"]["answer"] == "unknown"
        assert result["trajectory"][0]["observation"].startswith("Execution error in slow: timeout:")


def test_cancel_while_a_tool_is_parked_sends_rpc_cancel():
    with spawn() as w:  # no host tools: rpc_requests wait to be answered by hand
        configure(w)
        call = w.request("dspy.react", react_args())
        request = w.rpc_requests.get(timeout=10)
        assert request["tool"] == "search" and request["kwargs"] == {"query": "tower height"}
        call.cancel()
        with pytest.raises(RemoteError, match="cancelled"):
            call.result()
        assert w.rpc_cancels.get(timeout=2)["rpc_id"] == request["rpc_id"]
        assert w.call("stats")["tool_calls_parked"] == 0


def test_react_programs_by_reference_with_tools_per_call(agent):
    ref = agent.call("program.create", {"module": "ReAct", "signature": "question -> answer", "tools": TOOLS,
                                        "config": {"max_iters": 5}})["ref"]
    result = agent.call("program.call", {"ref": ref, "inputs": {"question": "How tall?"}})
    assert result["outputs"]["answer"] == "1082.4"
    configure(agent, [{"next_thought": "Ask the other tool.", "next_tool_name": "lookup",
                       "next_tool_args": {"key": "k"}},
                      {"next_thought": "Done.", "next_tool_name": "finish", "next_tool_args": {}},
                      {"reasoning": "r", "answer": "a"}])
    other = [{"name": "lookup", "parameters": {"type": "object", "properties": {"key": {"type": "string"}}}}]
    call = agent.request("program.call", {"ref": ref, "inputs": {"question": "q"}, "tools": other})
    observation = next(c for c in call if c["event"] == "observation")
    assert observation["tool"] == "lookup"  # the per-call tool was offered and called
    assert observation["error"]["type"] == "LookupError"  # ... and this host has no such tool
    assert call.result()["outputs"]["answer"] == "a"
    state = agent.call("program.save", {"ref": ref})["state"]
    assert "react" in state and "extract.predict" in state


def test_bad_tool_specs_are_bad_requests(agent):
    for tools in ([], [{"description": "no name"}], [{"name": "finish"}], [{"name": "t", "parameters": [1]}]):
        with pytest.raises(RemoteError) as exc:
            agent.call("dspy.react", react_args(tools=tools))
        assert exc.value.type == "bad_request", tools


def test_the_lm_sees_each_tools_true_arguments():
    """In-process: the ReAct prompt carries the host's description and JSON-schema arguments."""
    import dspy

    from bridge.programs.react import build_react

    react = build_react(dspy.Signature("question -> answer"), TOOLS, {})
    instructions = react.react.signature.instructions
    assert "Search the docs." in instructions and "what to find" in instructions
    assert react.tools["search"].args == TOOLS[0]["parameters"]["properties"]
