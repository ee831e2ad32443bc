"""``bridge demo``: a ReAct agent answering with two host tools, on the scripted LM.

The demo plays the Elixir side: it starts the worker as a subprocess exactly as
a port does (packet-4 frames on stdin/stdout), serves the tools the agent calls
through ``rpc_request`` frames, and prints the conversation as it streams.
No key, no network: the LM is the scripted engine, slowed down so the tokens
are visible.
"""

from __future__ import annotations

import ast
import operator
import sys
from typing import Any, TextIO

from bridge.host.client import Worker

DOCS = {
    "eiffel tower": "The Eiffel Tower in Paris is 330 metres tall (with antennas).",
    "statue of liberty": "The Statue of Liberty, from ground to torch, is 93 metres tall.",
    "big ben": "The Elizabeth Tower (Big Ben) in London is 96 metres tall.",
}

QUESTION = "How many metres taller is the Eiffel Tower than the Statue of Liberty?"

SCRIPT = [
    {"next_thought": "I need the height of the Eiffel Tower first.",
     "next_tool_name": "search", "next_tool_args": {"query": "Eiffel Tower height"}},
    {"next_thought": "330 metres. Now the Statue of Liberty.",
     "next_tool_name": "search", "next_tool_args": {"query": "Statue of Liberty height"}},
    {"next_thought": "93 metres. The difference is a subtraction.",
     "next_tool_name": "calculator", "next_tool_args": {"expression": "330 - 93"}},
    {"next_thought": "The calculator says 237, so I can answer.",
     "next_tool_name": "finish", "next_tool_args": {}},
    {"reasoning": "The Eiffel Tower is 330 m and the Statue of Liberty 93 m; 330 - 93 = 237.",
     "answer": "The Eiffel Tower is 237 metres taller than the Statue of Liberty."},
]

TOOLS = [
    {"name": "search", "description": "Search a small encyclopedia; returns the matching passages.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    {"name": "calculator", "description": "Evaluate an arithmetic expression such as '2 * (3 + 4)'.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                    "required": ["expression"]}},
]


def search(query: str) -> list[str]:
    """The host's search tool: passages whose topic shares a word with the query."""
    words = set(query.lower().split())
    return [text for topic, text in DOCS.items() if words & set(topic.split())]


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> float | int:
    """The host's calculator: arithmetic only, parsed, never ``eval``-ed."""
    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    return value(ast.parse(expression, mode="eval").body)


class Printer:
    """Prints ReAct chunks as a conversation: streamed thoughts, tool calls, observations, the answer."""

    STREAMED = {"next_thought": "  thinking    ", "answer": "  answer      "}

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.field: str | None = None

    def chunk(self, data: dict[str, Any]) -> None:
        event = data.get("event")
        if event == "token" and data["field"] in self.STREAMED:
            if self.field != data["field"]:
                self._end_line()
                self.out.write(self.STREAMED[data["field"]])
                self.field = data["field"]
            self.out.write(data["text"])
        elif event == "tool_call":
            self._line(f"  tool call   {data['tool']}({_args(data['args'])})  [rpc_id {data['rpc_id']}]")
        elif event == "observation":
            shown = data["result"] if "result" in data else f"error {data['error']['type']}: {data['error']['message']}"
            self._line(f"  observed    {shown}")
        self.out.flush()

    def _line(self, text: str) -> None:
        self._end_line()
        self.out.write(text + "\n")

    def _end_line(self) -> None:
        if self.field is not None:
            self.out.write("\n")
            self.field = None


def _args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def run(out: TextIO = sys.stdout, token_delay_ms: int = 25) -> int:
    """Start a worker, ask the question, print the run; returns a process exit code."""
    with Worker.spawn(tools={"search": search, "calculator": calculator}) as worker:
        out.write(f"worker {worker.ready['pid']} ready: protocol {worker.ready['protocol']}, "
                  f"{len(worker.ready['commands'])} commands\n\n  question    {QUESTION}\n")
        worker.call("lm.configure", {"model": "scripted/demo", "script": SCRIPT, "token_delay_ms": token_delay_ms})
        call = worker.request("dspy.react", {"signature": "question -> answer", "inputs": {"question": QUESTION},
                                             "tools": TOOLS, "stream": True, "fields": ["next_thought", "answer"]})
        printer = Printer(out)
        for data in call:
            printer.chunk(data)
        result = call.result()
        printer._end_line()
        steps = len(result["trajectory"])
        out.write(f"\ndone: {steps} steps, {sum(1 for s in result['trajectory'] if s['tool'] != 'finish')} "
                  f"host tool calls, answer: {result['outputs']['answer']}\n")
    return 0
