"""``dspy.evaluate`` and ``dspy.optimize``: scores and compiled programs, with progress chunks.

The work is in ``bridge.optimize``, which imports DSPy: it is imported inside
the handlers, after the warm-up, so ``ready`` never waits for it.
"""

from __future__ import annotations

from typing import Any

from bridge.programs.program import PROGRAM_ARGS, Program, build_program
from bridge.programs.runner import bad_request, concurrency, new_ref, session_lm, stored
from bridge.wire.errors import ErrorType, PeerError
from bridge.worker.context import Context
from bridge.worker.registry import handler, unknown_argument_details


def program_arg(ctx: Context, spec: Any) -> Program:
    """``program``: a ref, or ``{module, signature, instructions?, config?, tools?}`` built for this request."""
    if isinstance(spec, dict):
        unknown = next((key for key in spec if key not in PROGRAM_ARGS), None)
        if unknown is not None:
            details = unknown_argument_details(unknown, PROGRAM_ARGS)
            raise PeerError(ErrorType.BAD_REQUEST, f"'program' takes no key {unknown!r}", {"in": "program", **details})
        return build_program(spec)
    if isinstance(spec, str):
        return stored(ctx, spec)
    raise ValueError("'program' must be a ref or {module, signature}")


@handler("dspy.evaluate", needs_dspy=True, args=("program", "metric", "devset", "concurrency"))
async def evaluate(args: dict, ctx: Context) -> dict[str, Any]:
    """Score ``program`` on ``devset``: one ``example`` chunk per item as it finishes; the mean score."""
    from bridge.programs.optimize import Metric, check_items, evaluate

    with bad_request():
        program = program_arg(ctx, args.get("program"))
        metric = Metric(args.get("metric"), ctx)
        devset = check_items(program, args.get("devset"), "devset", metric)
    lanes = concurrency(args)
    session_lm(ctx)
    return {"score": await evaluate(program, devset, metric, ctx, lanes, report=True), "n": len(devset)}


@handler("dspy.optimize", needs_dspy=True,
         args=("program", "metric", "optimizer", "params", "trainset", "valset", "concurrency"))
async def optimize(args: dict, ctx: Context) -> dict[str, Any]:
    """Compile ``program`` with a DSPy optimizer; progress chunks; the compiled program is stored."""
    from bridge.programs.optimize import Metric, Plan, check_items, evaluate, optimize

    with bad_request():
        program = program_arg(ctx, args.get("program"))
        if program.kind == "ReAct":
            raise ValueError("optimizers call programs synchronously, and a ReAct program's host tools are async: "
                             "optimize a Predict or ChainOfThought program")
        metric = Metric(args.get("metric"), ctx)
        plan = Plan.of(args.get("optimizer"), args.get("params"), ctx.shared.config.max_threads)
        trainset = check_items(program, args.get("trainset"), "trainset", metric)
        valset = check_items(program, args["valset"], "valset", metric) if args.get("valset") is not None else None
    lanes = concurrency(args)
    compiled = await optimize(plan, program, trainset, valset, metric, ctx, session_lm(ctx))
    await ctx.emit({"event": "progress", "phase": "validate"})
    checked = valset or trainset
    score = await evaluate(compiled, checked, metric, ctx, lanes, report=False)
    await ctx.emit({"event": "progress", "phase": "validate", "n": len(checked), "score": score})
    return {**new_ref(ctx, compiled), "score": score, "state": compiled.state()}
