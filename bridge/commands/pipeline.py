"""``pipeline.create`` and ``pipeline.run``: steps, branches and parallel lanes over one map of fields.

Stored pipelines live in the request's session (``Session.data``), so they go
with it when it closes or expires.  See ``docs/pipelines.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridge.wire.errors import ErrorType, PeerError
from bridge.wire.protocol import quote
from bridge.worker.context import Context
from bridge.worker.registry import handler

if TYPE_CHECKING:  # the pipeline modules load after ``ready``, with the DSPy warm-up
    from bridge.programs.pipelines import Step

STORE = "pipelines"  # the key of a session's stored pipelines in ``Session.data``


def checked(spec: Any) -> tuple["Step", ...]:
    from bridge.programs.pipelines import build_pipeline
    from bridge.wire.errors import PipelineError

    try:
        return build_pipeline(spec)
    except PipelineError as exc:
        raise PeerError(ErrorType.BAD_REQUEST, str(exc), exc.details()) from None


@handler("pipeline.create", needs_dspy=True, args=("name", "steps"))
async def pipeline_create(args: dict, ctx: Context) -> dict[str, Any]:
    """Check ``steps`` now (modules, conditions, lane conflicts) and store them under ``name``."""
    name = args.get("name")
    if not isinstance(name, str) or not name:
        raise PeerError(ErrorType.BAD_REQUEST, "'name' must be a non-empty string")
    ctx.session.data.setdefault(STORE, {})[name] = checked(args.get("steps"))
    return {"name": name}


@handler("pipeline.run", needs_dspy=True, args=("steps", "name", "inputs", "stream"))
async def pipeline_run(args: dict, ctx: Context) -> dict[str, Any]:
    """Run ``steps``, or the stored pipeline ``name``, from ``inputs``; the result is the final fields."""
    if ("steps" in args) == ("name" in args):
        raise PeerError(ErrorType.BAD_REQUEST, "give either 'steps' or the 'name' of a stored pipeline")
    if "name" in args:
        steps = ctx.session.data.get(STORE, {}).get(args["name"]) if isinstance(args["name"], str) else None
        if steps is None:
            raise PeerError("unknown_pipeline", f"session {quote(ctx.session.id)} has no pipeline {quote(args['name'])}")
    else:
        steps = checked(args["steps"])
    from bridge.programs.pipelines import run_pipeline

    return await run_pipeline(steps, args.get("inputs"), ctx, bool(args.get("stream")))
