"""Pipelines: module steps, branches and parallel lanes over one map of fields.

A pipeline is checked whole before it runs (or when ``pipeline.create`` stores
it): every module is built, every condition parsed, and parallel lanes that
could write the same field are refused, so a long run cannot fail on a typo
half-way.  Each step has a fixed path (``0/branch/then/1``,
``2/parallel/0/0``) that names it in chunks and errors.  Module steps reuse the
DSPy commands' ``run``, so a step behaves exactly like ``dspy.predict``/
``dspy.stream``/``dspy.react``; only its chunks carry the path.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Union

from bridge.programs.expressions import KEYWORDS, Expression, parse
from bridge.programs.program import Program, build_program
from bridge.programs.runner import run
from bridge.wire.errors import ErrorType, ExpressionError, PeerError, PipelineError
from bridge.worker.context import Context
from bridge.worker.tasks import together

log = logging.getLogger("bridge.pipelines")

MODULE_KEYS = {"name", "module", "signature", "instructions", "config", "tools"}


@dataclass(frozen=True, slots=True)
class ModuleStep:
    path: str
    name: str
    program: Program


@dataclass(frozen=True, slots=True)
class Branch:
    path: str
    condition: Expression
    then: tuple["Step", ...]
    otherwise: tuple["Step", ...]


@dataclass(frozen=True, slots=True)
class Lane:
    steps: tuple["Step", ...]
    namespace: str | None  # "as": the lane's outputs land under this one field


@dataclass(frozen=True, slots=True)
class Parallel:
    path: str
    lanes: tuple[Lane, ...]


Step = Union[ModuleStep, Branch, Parallel]


# ---- checking ------------------------------------------------------------------------------

def build_pipeline(spec: Any) -> tuple[Step, ...]:
    """The checked steps of ``spec``; ``PipelineError`` names the first bad step."""
    if not isinstance(spec, list) or not spec:
        raise PipelineError("'steps' must be a non-empty list of steps", "")
    return _steps(spec, "")


def _steps(spec: Any, prefix: str) -> tuple[Step, ...]:
    if not isinstance(spec, list):
        raise PipelineError("must be a list of steps", prefix)
    return tuple(_step(item, f"{prefix}/{i}" if prefix else str(i)) for i, item in enumerate(spec))


def _step(spec: Any, path: str) -> Step:
    if not isinstance(spec, dict):
        raise PipelineError("a step is a map: a module step, {'branch': …} or {'parallel': …}", path)
    for kind, build in (("branch", _branch), ("parallel", _parallel)):
        if kind in spec:
            if len(spec) != 1:
                raise PipelineError(f"a {kind} step has only the key {kind!r}", path)
            return build(spec[kind], path)
    unknown = set(spec) - MODULE_KEYS
    if unknown or "signature" not in spec:
        raise PipelineError(f"a module step has 'signature' and optionally {sorted(MODULE_KEYS - {'signature'})}"
                            f"; unknown keys {sorted(unknown)}", path)
    name = spec.get("name", spec.get("module", "Predict"))
    if not isinstance(name, str):
        raise PipelineError("'name' must be a string", path)
    try:
        program = build_program({k: v for k, v in spec.items() if k != "name"})
    except ValueError as exc:
        raise PipelineError(str(exc), path) from None
    return ModuleStep(path, name, program)


def _branch(spec: Any, path: str) -> Branch:
    if not isinstance(spec, dict) or "if" not in spec or "then" not in spec or set(spec) - {"if", "then", "else"}:
        raise PipelineError("a branch is {'if': EXPR, 'then': [steps], 'else'?: [steps]}", path)
    try:
        condition = parse(spec["if"])
    except ExpressionError as exc:
        raise PipelineError(f"bad condition: {exc}", path, exc.position) from None
    return Branch(path, condition, _steps(spec["then"], f"{path}/branch/then"),
                  _steps(spec.get("else", []), f"{path}/branch/else"))


def _parallel(spec: Any, path: str) -> Parallel:
    if not isinstance(spec, list) or not spec:
        raise PipelineError("'parallel' is a non-empty list of lanes: [steps] or {'as': NAME, 'steps': [steps]}", path)
    lanes = tuple(_lane(lane, f"{path}/parallel/{k}") for k, lane in enumerate(spec))
    writers: dict[str, int] = {}
    for k, lane in enumerate(lanes):
        for key in sorted(lane_keys(lane)):
            if key in writers:
                raise PipelineError(f"lanes {writers[key]} and {k} can both write the field {key!r}; "
                                    "give each lane its own 'as'", path)
            writers[key] = k
    return Parallel(path, lanes)


def _lane(spec: Any, prefix: str) -> Lane:
    if isinstance(spec, list):
        return Lane(_steps(spec, prefix), None)
    if not isinstance(spec, dict) or "steps" not in spec or set(spec) - {"as", "steps"}:
        raise PipelineError("a lane is [steps] or {'as': NAME, 'steps': [steps]}", prefix)
    namespace = spec.get("as")
    if namespace is not None and (not isinstance(namespace, str) or not namespace.isidentifier()
                                  or namespace in KEYWORDS):
        raise PipelineError(f"'as' must be a field name, not {namespace!r}", prefix)
    return Lane(_steps(spec["steps"], prefix), namespace)


def step_keys(steps: tuple[Step, ...]) -> set[str]:
    """Every field these steps may write (both arms of a branch)."""
    keys: set[str] = set()
    for step in steps:
        if isinstance(step, ModuleStep):
            keys.update(step.program.result_fields())
        elif isinstance(step, Branch):
            keys |= step_keys(step.then) | step_keys(step.otherwise)
        else:
            for lane in step.lanes:
                keys |= lane_keys(lane)
    return keys


def lane_keys(lane: Lane) -> set[str]:
    return {lane.namespace} if lane.namespace else step_keys(lane.steps)


# ---- running ---------------------------------------------------------------------------------

@contextmanager
def failing_at(path: str) -> Iterator[None]:
    """A failure inside a step ends the request with its own error type, plus ``details.path``."""
    try:
        yield
    except PeerError as exc:
        raise PeerError(exc.type, exc.message, {**(exc.details or {}), "path": path}) from None
    except ExpressionError as exc:
        raise PeerError(ErrorType.BAD_REQUEST, f"step {path}: {exc}",
                        {"path": path, "position": exc.position}) from None
    except Exception as exc:
        log.exception("pipeline step %s failed", path)
        raise PeerError(ErrorType.HANDLER_ERROR, f"step {path}: {type(exc).__name__}: {exc}",
                        {"exception": type(exc).__name__, "path": path}) from exc


class Runner:
    """One run of a pipeline for one request: sends the step chunks, mutates the fields."""

    def __init__(self, ctx: Context, stream: bool) -> None:
        self.ctx = ctx
        self.stream = stream

    async def steps(self, steps: tuple[Step, ...], fields: dict[str, Any]) -> dict[str, Any]:
        """Run ``steps`` in order over ``fields``; returns what they wrote."""
        written: dict[str, Any] = {}
        for step in steps:
            if isinstance(step, ModuleStep):
                written.update(await self.module(step, fields))
            elif isinstance(step, Branch):
                written.update(await self.branch(step, fields))
            else:
                written.update(await self.parallel(step, fields))
        return written

    async def module(self, step: ModuleStep, fields: dict[str, Any]) -> dict[str, Any]:
        from bridge.programs.streaming import Relay

        path = step.path
        with failing_at(path):
            names = list(step.program.signature.input_fields)
            missing = [name for name in names if name not in fields]
            if missing:
                raise PeerError(ErrorType.BAD_REQUEST,
                                f"step {path} needs the field(s) {missing}; the fields are {sorted(fields)}")
            await self.ctx.emit({"event": "step_start", "path": path, "name": step.name})
            relay = Relay(self.ctx, lambda data: {**data, "path": path})
            result = await run(step.program, {name: fields[name] for name in names}, relay, self.stream)
        fields.update(result["outputs"])
        await self.ctx.emit({"event": "step_complete", "path": path, "name": step.name, **result})
        return result["outputs"]

    async def branch(self, step: Branch, fields: dict[str, Any]) -> dict[str, Any]:
        with failing_at(step.path):
            taken = "then" if step.condition(fields) else "else"
        await self.ctx.emit({"event": "branch", "path": step.path, "condition": step.condition.source,
                             "taken": taken})
        return await self.steps(step.then if taken == "then" else step.otherwise, fields)

    async def parallel(self, step: Parallel, fields: dict[str, Any]) -> dict[str, Any]:
        """Lanes run at once, each on its own copy of the fields; the first failure cancels the rest."""
        written: list[dict[str, Any]] = [{} for _ in step.lanes]

        async def lane(k: int) -> None:
            written[k] = await self.steps(step.lanes[k].steps, dict(fields))

        await together([partial(lane, k) for k in range(len(step.lanes))])
        merged: dict[str, Any] = {}
        for spec, outputs in zip(step.lanes, written):
            merged.update({spec.namespace: outputs} if spec.namespace else outputs)
        fields.update(merged)
        return merged


async def run_pipeline(steps: tuple[Step, ...], inputs: Any, ctx: Context, stream: bool) -> dict[str, Any]:
    """Run ``steps`` from ``inputs``; returns the final fields."""
    if not isinstance(inputs, dict) or not all(isinstance(key, str) for key in inputs):
        raise PeerError(ErrorType.BAD_REQUEST, "'inputs' must be a map of field name -> value")
    fields = dict(inputs)
    await Runner(ctx, stream).steps(steps, fields)
    return fields
