"""DSPy programs the host builds, calls, saves and loads: module construction and plain data.

``build_module`` is the one place a module name becomes a DSPy module, so a new
kind (ReAct, with its tools) is one more entry.  Values crossing to the host
are made msgpack-able here.  DSPy is imported lazily: loaded before ``ready``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.programs.signatures import parse_signature
from bridge.wire.protocol import quote

if TYPE_CHECKING:
    import dspy

MODULES = ("Predict", "ChainOfThought", "ReAct")
PROGRAM_ARGS = ("signature", "module", "instructions", "config", "max_iters", "tools")  # what build_program reads


@dataclass(slots=True)
class Program:
    """A module plus the signature the host gave it (its inputs are what a call must supply)."""

    kind: str
    signature: "type[dspy.Signature]"
    module: "dspy.Module"
    config: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # ReAct: the host tools, as specified

    def with_tools(self, tools: Any) -> "Program":
        """This ReAct program with other host tools, keeping its learned state (``tools`` per call)."""
        if self.kind != "ReAct":
            raise ValueError("only a ReAct program takes 'tools'")
        other = Program(self.kind, self.signature, build_module(self.kind, self.signature, self.config, tools),
                        self.config, tools)
        other.module.load_state(self.module.dump_state())
        return other

    def result(self, prediction: "dspy.Prediction") -> dict[str, Any]:
        """The command result: the outputs, and for ReAct the trajectory as a list of steps."""
        if self.kind != "ReAct":
            return {"outputs": outputs(prediction)}
        from bridge.programs.react import trajectory

        return {"outputs": {k: plain(v) for k, v in prediction.items() if k != "trajectory"},
                "trajectory": plain(trajectory(prediction))}

    def check_inputs(self, inputs: Any, where: str = "inputs") -> dict[str, Any]:
        """The call's keyword arguments; ValueError when they do not fit the signature."""
        if not isinstance(inputs, dict):
            raise ValueError(f"'{where}' must be a map of input field -> value")
        expected = set(self.signature.input_fields)
        missing, unknown = expected - set(inputs), set(inputs) - expected
        if missing or unknown:
            raise ValueError(f"'{where}' must have exactly the input fields {sorted(expected)}"
                             f" (missing {sorted(missing)}, unknown {sorted(unknown)})")
        return inputs

    def output_fields(self) -> list[str]:
        """Every output field of every predictor, in order (ChainOfThought adds ``reasoning``)."""
        return [name for _, predictor in self.module.named_predictors()
                for name in predictor.signature.output_fields]

    def result_fields(self) -> list[str]:
        """The output fields a call returns: its last predictor's (ChainOfThought's, ReAct's extract step)."""
        _, last = self.module.named_predictors()[-1]
        return list(last.signature.output_fields)

    def state(self) -> dict[str, Any]:
        """DSPy's JSON state (demos, instructions…), as plain data."""
        return plain(self.module.dump_state(json_mode=True))


def build_module(kind: Any, signature: "type[dspy.Signature]", config: dict[str, Any],
                 tools: Any = None) -> "dspy.Module":
    """Construct the DSPy module ``kind``; ``config`` goes to its constructor (e.g. temperature, max_iters)."""
    import dspy

    if kind not in MODULES:
        raise ValueError(f"unknown module {quote(kind)}; one of {list(MODULES)}")
    if kind == "ReAct":
        from bridge.programs.react import build_react

        return build_react(signature, tools, config)
    if tools is not None:
        raise ValueError(f"'tools' needs module ReAct, not {kind}")
    return getattr(dspy, kind)(signature, **config)


_BUILT: OrderedDict[str, Program] = OrderedDict()
_BUILT_MAX = 256  # distinct program specs kept as templates
_BUILT_LOCK = threading.Lock()
_SPEC_KEYS = ("module", "signature", "instructions", "config", "max_iters", "tools")


def build_program(args: dict[str, Any], module_default: str | None = "Predict") -> Program:
    """A program from request arguments ``signature``, ``module``, ``instructions``, ``config``.

    DSPy builds a signature as a pydantic model (about 7 ms here, more for
    ChainOfThought), which would dominate a predict; so each spec is built once
    and later requests get a copy of its module (about 0.2 ms).
    """
    import json  # here and in field_text, not at import: json is off the start-up (DSPy loads it after ready)

    try:
        key = json.dumps([module_default, *(args.get(k) for k in _SPEC_KEYS)], sort_keys=True)
    except (TypeError, ValueError):  # not JSON (bytes in a spec): build it every time
        return _build_program(args, module_default)
    with _BUILT_LOCK:
        template = _BUILT.get(key)
        if template is not None:
            _BUILT.move_to_end(key)
    if template is None:
        template = _build_program(args, module_default)
        with _BUILT_LOCK:
            _BUILT[key] = template
            if len(_BUILT) > _BUILT_MAX:
                _BUILT.popitem(last=False)
    return Program(template.kind, template.signature, template.module.deepcopy(), template.config, template.tools)


def _build_program(args: dict[str, Any], module_default: str | None) -> Program:
    kind = args.get("module", module_default)
    config = args.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError("'config' must be a map of module settings")
    signature = parse_signature(args.get("signature"), args.get("instructions"))
    if "max_iters" in args:
        config = {**config, "max_iters": args["max_iters"]}
    try:
        module = build_module(kind, signature, config, args.get("tools"))
    except TypeError as exc:
        raise ValueError(f"bad module config: {exc}") from None
    return Program(kind, signature, module, config, args.get("tools"))


def load_program(args: dict[str, Any]) -> Program:
    """``program.load``: build from ``module``/``signature``, then restore DSPy's ``state``."""
    program = build_program(args, module_default=None)
    state = args.get("state")
    if not isinstance(state, dict):
        raise ValueError("'state' must be the map program.save returned")
    try:
        program.module.load_state(state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"state does not fit a {program.kind} of this signature: {exc!r}") from None
    return program


def plain(value: Any) -> Any:
    """A msgpack-able copy of ``value``: pydantic models, enums, tuples… become plain data."""
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value, fallback=str)


def outputs(prediction: "dspy.Prediction") -> dict[str, Any]:
    return {name: plain(value) for name, value in prediction.items()}


def field_text(value: Any) -> str:
    """A field's value as the LM wrote it: strings as they are, other values as JSON."""
    import json

    return value if isinstance(value, str) else json.dumps(plain(value), ensure_ascii=False)
