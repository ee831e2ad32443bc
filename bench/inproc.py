"""The in-process baseline of "overhead per DSPy call": the program's ``acall`` in a loop.

It speaks the port driver's line protocol (a ``ready`` line, then ``predict N``
answered with ``{"value": µs per call}``), so the bench alternates it with the
worker behind the port like any other peer.  Same LM as the driver's
``predict`` scenario: the scripted engine, one ``when`` reply, no latency.  DSPy runs
unchanged, as a user's own process runs it; with ``--call-path`` its per-call path is
changed as in the worker (``bridge.lm.call_path``), so the ratio is the worker's own
overhead per call.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

ANSWER = " ".join(f"word{i}" for i in range(1, 21))  # the driver's answer_text()


async def predict_us(n: int) -> float:
    import dspy

    from bridge.lm import call_path
    from bridge.lm.engines import build_lm

    if "--call-path" in sys.argv:
        call_path.install()

    lm = build_lm("scripted/bench", {"script": [{"when": {}, "reply": {"answer": ANSWER}}]})
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        for _ in range(20):  # as the driver: the first calls build DSPy's caches
            await program.acall(question="q")
        started = time.perf_counter()
        for _ in range(n):
            await program.acall(question="q")
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    print(json.dumps({"event": "ready", "ms": 0, "os_pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        name, *ints = line.split()
        if name == "predict":
            print(json.dumps({"value": asyncio.run(predict_us(int(ints[0])))}), flush=True)
        else:
            print(json.dumps({"error": f"inproc serves only 'predict N', not {name!r}"}), flush=True)


if __name__ == "__main__":
    main()
