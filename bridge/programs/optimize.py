"""Evaluating and optimizing programs on the host's examples, with progress chunks.

``dspy.evaluate`` runs each example through the DSPy commands' ``run`` on the
loop, like ``dspy.batch``: one chunk per example as it finishes (failures
included), cancellable, ReAct programs with host tools work, and no tqdm.

``dspy.optimize`` runs a DSPy optimizer in one worker thread (it calls programs
synchronously, and fans out into its own thread pools).  DSPy has no per-item
hooks, so progress comes from a callback (evaluations, proposer modules) and
from the metric we hand DSPy (a call with a ``trace`` is a bootstrapped trace).
Those same points check ``ctx.cancelled``: a cancelled request raises
``Abort``, a ``BaseException``, because DSPy's ``except Exception`` handlers
would count an ordinary one as a bad example and carry on.

Imports DSPy: load after warm-up.
"""

from __future__ import annotations

import importlib.util
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

import dspy
from dspy.evaluate.metrics import EM, F1, normalize_text
from dspy.utils.callback import BaseCallback

from bridge.programs.allowlist import checked_keywords
from bridge.programs.program import Program, field_text, outputs
from bridge.programs.runner import reported, run
from bridge.programs.streaming import Relay
from bridge.wire.errors import ErrorType, PeerError, RequestClosed
from bridge.worker.context import Context
from bridge.worker.tasks import each

OPTIMIZERS = ("BootstrapFewShot", "BootstrapFewShotWithRandomSearch", "MIPROv2")
RESERVED = {"self", "metric", "student", "teacher", "trainset", "valset", "prompt_model", "task_model"}


# ---- examples and metrics --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Item:
    """One example as the host gave it: the program's inputs and the expected outputs."""

    inputs: dict[str, Any]
    outputs: dict[str, Any]

    def plain(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs}

    def example(self) -> dspy.Example:
        return dspy.Example(**self.inputs, **self.outputs).with_inputs(*self.inputs)


def _contains(prediction: str, expected: str) -> bool:
    return normalize_text(expected) in normalize_text(prediction)


BUILTINS: dict[str, Callable[[str, str], float]] = {
    "exact_match": lambda prediction, expected: float(EM(prediction, [expected])),
    "f1": lambda prediction, expected: float(F1(prediction, [expected])),
    "contains": lambda prediction, expected: float(_contains(prediction, expected)),
}


class Metric:
    """A score from 0 to 1 for one prediction: a built-in over the expected fields, or the host's tool."""

    def __init__(self, spec: Any, ctx: Context) -> None:
        self.ctx = ctx
        self.builtin = BUILTINS.get(spec) if isinstance(spec, str) else None
        self.tool = spec.get("tool") if isinstance(spec, dict) and set(spec) == {"tool"} else None
        if self.builtin is None and (not isinstance(self.tool, str) or not self.tool):
            raise ValueError(f"'metric' must be one of {sorted(BUILTINS)} or {{'tool': NAME}}")

    def compare(self, item: Item, prediction: dict[str, Any]) -> float:
        """The built-in's score: the mean over the expected fields (strings normalized as DSPy's EM/F1 do)."""
        assert self.builtin is not None
        return sum(self.builtin(field_text(prediction.get(name, "")), field_text(expected))
                   for name, expected in item.outputs.items()) / len(item.outputs)

    async def ascore(self, item: Item, prediction: dict[str, Any]) -> float:
        """On the loop."""
        if self.builtin is not None:
            return self.compare(item, prediction)
        return self.number(await self.ctx.call_tool(self.tool, example=item.plain(), prediction=prediction))

    def score(self, item: Item, prediction: dict[str, Any]) -> float:
        """In a worker thread (DSPy's optimizers)."""
        if self.builtin is not None:
            return self.compare(item, prediction)
        return self.number(self.ctx.call_tool_blocking(self.tool, example=item.plain(), prediction=prediction))

    def number(self, answer: Any) -> float:
        if not isinstance(answer, (int, float)):
            raise PeerError(ErrorType.BAD_REQUEST, f"metric tool {self.tool!r} answered {answer!r}, not a number")
        return float(answer)


def check_items(program: Program, items: Any, where: str, metric: Metric) -> list[Item]:
    """The host's ``[{inputs, outputs}]``; ValueError (``bad_request``) names the first bad one."""
    if not isinstance(items, list) or not items:
        raise ValueError(f"'{where}' must be a non-empty list of {{inputs, outputs}}")
    results = program.result_fields()
    checked = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "inputs" not in item or set(item) - {"inputs", "outputs"}:
            raise ValueError(f"{where}[{i}] must be {{inputs, outputs}}")
        inputs = program.check_inputs(item["inputs"], f"{where}[{i}].inputs")
        expected = item.get("outputs", {})
        if not isinstance(expected, dict) or set(expected) & set(inputs):
            raise ValueError(f"{where}[{i}].outputs must be a map of output field -> value, apart from the inputs")
        if metric.builtin is not None and (not expected or set(expected) - set(results)):
            raise ValueError(f"{where}[{i}].outputs must name some of the output fields {results} "
                             "for a built-in metric")
        checked.append(Item(inputs, expected))
    return checked


# ---- evaluation on the loop --------------------------------------------------------------------

async def evaluate(program: Program, items: list[Item], metric: Metric, ctx: Context, lanes: int,
                   report: bool) -> float:
    """The mean score over ``items``; a failing program call scores 0 (DSPy's ``failure_score``).

    With ``report``, one ``example`` chunk per item as it finishes.  A failing
    metric (a host tool error) fails the whole request: its scores would mean nothing.
    """
    scores = [0.0] * len(items)

    async def one(index: int) -> None:
        item = items[index]
        chunk: dict[str, Any] = {"event": "example", "index": index}
        try:
            result = await run(program, item.inputs, Relay(ctx, lambda data: {**data, "index": index}), stream=False)
        except Exception as exc:
            error = exc if isinstance(exc, PeerError) else PeerError(ErrorType.HANDLER_ERROR,
                                                                     str(exc) or type(exc).__name__)
            chunk.update(score=0.0, error={"type": error.type, "message": error.message})
        else:
            scores[index] = await metric.ascore(item, result["outputs"])
            chunk.update(score=scores[index], outputs=result["outputs"])
        if report:
            await ctx.emit(chunk)

    await each(len(items), lanes, one)
    return sum(scores) / len(scores)


# ---- optimization in a worker thread ------------------------------------------------------------

class Abort(BaseException):
    """Unwinds an optimizer thread through DSPy's ``except Exception`` handlers; ``error`` is re-raised."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__(error)
        self.error = error


class Checkpoints(BaseCallback):
    """The points where a cancel stops DSPy work running in a thread (an optimizer, a ``call``):
    every module call and LM call starts by checking the request."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def check(self) -> None:
        if self.ctx.cancelled:
            raise Abort()

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.check()

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.check()


class Progress(Checkpoints):
    """``progress`` chunks from inside an optimizer's threads, and the points where a cancel stops it.

    Runs on DSPy's threads: chunks go out with ``emit_blocking``, one at a time
    under a lock, so a phase's first chunk always precedes its items.
    """

    def __init__(self, ctx: Context, metric: Metric, trainset: list[dspy.Example], threshold: Any) -> None:
        super().__init__(ctx)
        self.scorer = metric
        self.index = {id(example): i for i, example in enumerate(trainset)}
        self.threshold = threshold
        self.phase = "start"
        self.candidates = 0
        self.best: float | None = None
        self.sizes: dict[str, tuple[int, bool]] = {}  # evaluation call_id -> (examples, whole valset?)
        self.lock = threading.Lock()

    def emit(self, phase: str, **data: Any) -> None:
        """A bare ``{phase}`` chunk when the phase changes, then ``data`` (if any) in that phase."""
        self.check()
        with self.lock:
            try:
                if phase != self.phase:
                    self.phase = phase
                    self.ctx.emit_blocking({"event": "progress", "phase": phase})
                if data:
                    self.ctx.emit_blocking({"event": "progress", "phase": phase, **data})
            except RequestClosed:
                raise Abort() from None

    def metric(self, example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
        """The metric DSPy calls.  With a ``trace`` it judges a bootstrapped trace: kept or rejected."""
        self.check()
        item = Item(example.inputs().toDict(), example.labels().toDict())
        try:
            score = self.scorer.score(item, outputs(prediction))
        except Exception as exc:  # the host's metric failed: stop, DSPy would score it 0 and go on
            raise Abort(exc) from exc
        if trace is not None:
            kept = score >= self.threshold if self.threshold else bool(score)
            self.emit("bootstrap", example=self.index.get(id(example)), score=score, kept=kept)
        return score

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.check()
        if type(instance).__module__.startswith("dspy.propose"):  # MIPROv2's instruction proposer
            self.emit("propose")

    def on_evaluate_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        devset = inputs.get("devset") or instance.devset
        self.sizes[call_id] = (len(devset), len(devset) == len(instance.devset))
        self.emit("evaluate")

    def on_evaluate_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        n, full = self.sizes.pop(call_id, (0, False))
        if exception is not None or outputs is None:
            return
        score = round(outputs.score / 100, 4)  # DSPy's Evaluate reports percent, rounded to 2 places
        with self.lock:
            self.candidates += 1
            candidate = self.candidates
            if full and (self.best is None or score > self.best):
                self.best = score
        self.emit("evaluate", candidate=candidate, n=n, score=score, best=self.best)


@dataclass(frozen=True, slots=True)
class Plan:
    """An optimizer and the host's ``params``, split between its constructor and ``compile``."""

    name: str
    init: dict[str, Any]
    compile: dict[str, Any]

    @classmethod
    def of(cls, name: Any, params: Any, max_threads: int) -> "Plan":
        """The host's ``params`` checked; an optimizer's own thread pool (``num_threads``) is
        bounded by ``--max-threads``, given or not (DSPy's default is ``settings.num_threads``)."""
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; one of {list(OPTIMIZERS)}")
        if name == "MIPROv2" and importlib.util.find_spec("optuna") is None:
            raise ValueError("MIPROv2 needs optuna, which is not installed: pip install 'dspy[optuna]'")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise ValueError("'params' must be a map of optimizer settings")
        params = checked_keywords(f"dspy.{name}", params)  # no input() on the frame pipe; log_dir confined
        optimizer = getattr(dspy, name)
        init, compile_ = _keywords(optimizer.__init__), _keywords(optimizer.compile)
        unknown = set(params) - init - compile_
        if unknown:
            raise ValueError(f"{name} takes no params {sorted(unknown)}; it takes {sorted(init | compile_)}")
        threads = params.get("num_threads")
        if threads is not None and (type(threads) is not int or not 1 <= threads <= max_threads):
            raise ValueError(f"'num_threads' must be an integer from 1 to --max-threads={max_threads}")
        if "num_threads" in init and threads is None:
            params = {**params, "num_threads": min(dspy.settings.num_threads or 1, max_threads)}
        return cls(name, {k: v for k, v in params.items() if k in init},
                   {k: v for k, v in params.items() if k not in init})

    def takes_valset(self) -> bool:
        return "valset" in inspect.signature(getattr(dspy, self.name).compile).parameters


def _keywords(fn: Callable[..., Any]) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds} - RESERVED


async def optimize(plan: Plan, program: Program, trainset: list[Item], valset: list[Item] | None,
                   metric: Metric, ctx: Context, lm: Any) -> Program:
    """Compile ``program`` with ``plan``'s optimizer in a worker thread; the compiled copy."""
    train = [item.example() for item in trainset]
    extra = {"valset": [item.example() for item in valset]} if valset and plan.takes_valset() else {}
    progress = Progress(ctx, metric, train, plan.init.get("metric_threshold"))
    await ctx.emit({"event": "progress", "phase": "start", "optimizer": plan.name, "trainset": len(trainset),
                    "valset": len(valset) if valset else None})

    def compile_() -> dspy.Module:
        with dspy.context(lm=lm, callbacks=[*dspy.settings.callbacks, progress]):
            optimizer = getattr(dspy, plan.name)(metric=progress.metric, **plan.init)  # MIPROv2 reads the LM here
            return optimizer.compile(program.module, trainset=train, **extra, **plan.compile)

    try:
        with reported():
            module = await ctx.shared.threads.run_sync(compile_)
    except Abort as abort:
        raise abort.error or PeerError(ErrorType.CANCELLED, "the request ended during optimization") from None
    return Program(program.kind, program.signature, module, program.config, program.tools)
