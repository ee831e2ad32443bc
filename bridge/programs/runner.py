"""What every DSPy command shares: the session's LM, stored programs, one program call,
and DSPy's failures mapped to their own error types.

Every DSPy run happens inside ``dspy.context(lm=<the session's LM>)``:
``dspy.configure`` only works from the first thread that calls it, and
sessions must not share an LM.  Every program call (predict, stream, batch
items, ReAct, ``program.call``, pipeline steps, evaluation items) runs with
``acall`` on the event loop, over DSPy's async LM engines: cancelling the
request cancels the awaiting task, which closes the provider's connection at
once.  DSPy's prompt formatting and reply parsing then run on the loop too
(a few hundred µs per call, measured in ``bench``); a thread would not stop on
cancel.  DSPy is imported lazily.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Iterator

from bridge.programs.program import Program
from bridge.programs.typenames import SignatureError
from bridge.wire.errors import ErrorType, PeerError
from bridge.wire.protocol import int_arg, quote
from bridge.worker.context import Context

DEFAULT_CONCURRENCY = 8


# ---- errors ------------------------------------------------------------------------

def dspy_error(exc: Exception) -> PeerError | None:
    """DSPy's LM and parse failures as error frames the host can act on (no traceback)."""
    from dspy.utils.exceptions import AdapterParseError, LMError

    if isinstance(exc, AdapterParseError):
        return PeerError("adapter_parse_error", str(exc),
                         {"adapter": exc.adapter_name, "lm_response": str(exc.lm_response)})
    if isinstance(exc, LMError):
        return PeerError("lm_error", with_frame_note(str(exc)), {"code": exc.code, "model": exc.model})
    return None


FRAME_NOTE = ("\n\n  From the host: send \"api_key\" in lm.configure's arguments, or give the worker the "
              "provider's key variable in its environment (Elixir: Port.open({:spawn_executable, path}, "
              "[env: [{'OPENAI_API_KEY', key}], ...])).")


def with_frame_note(message: str) -> str:
    """DSPy's and LiteLLM's key errors advise Python calls (``api_key=`` on ``dspy.LM``); a host
    sends frames, so say the frame equivalent too."""
    return message + FRAME_NOTE if "api_key" in message else message


@contextmanager
def bad_request() -> Iterator[None]:
    """Our builders' ValueErrors (bad signature, module, inputs, LM options) are the host's."""
    try:
        yield
    except ValueError as exc:
        raise PeerError(ErrorType.BAD_REQUEST, str(exc), getattr(exc, "details", None)) from None


@contextmanager
def reported() -> Iterator[None]:
    """Raise DSPy's LM and parse failures as their own error types instead of ``handler_error``;
    a signature with a type outside the table (``programs.typenames``) is ``bad_request``."""
    try:
        yield
    except SignatureError as exc:
        raise PeerError(ErrorType.BAD_REQUEST, str(exc), exc.details) from None
    except Exception as exc:
        peer = dspy_error(exc)
        if peer is None:
            raise
        raise peer from None


# ---- shared steps ------------------------------------------------------------------

def session_lm(ctx: Context) -> Any:
    session = ctx.session
    if session.lm is None:
        raise PeerError("lm_not_configured",
                        f"session {quote(session.id)} has no language model: send lm.configure {{model, ...}} "
                        "in this session first, e.g. {\"model\": \"openai/gpt-4o-mini\"} or "
                        "{\"model\": \"scripted/demo\", \"script\": [{\"answer\": \"42\"}]}")
    return session.lm


def stored(ctx: Context, ref: Any) -> Program:
    program = ctx.session.get(ref)
    if not isinstance(program, Program):
        raise PeerError("unknown_ref", f"{quote(ref)} is not a program in session {quote(ctx.session.id)}")
    return program


def new_ref(ctx: Context, program: Program) -> dict[str, str]:
    return {"ref": ctx.shared.sessions.store(ctx.session, program)}


async def run(program: Program, inputs: Any, ctx: Context, stream: bool, fields: Any = None) -> dict[str, Any]:
    """Call ``program`` once for predict, stream and program.call."""
    from bridge.programs.streaming import listeners_for, stream_program  # imports DSPy: after warm-up only

    with bad_request():
        inputs = program.check_inputs(inputs)
        routes = listeners_for(program, fields) if stream else {}
    lm = session_lm(ctx)
    with reported():
        async with react_steps(ctx, program):
            if stream:
                prediction = await stream_program(program, inputs, lm, routes, ctx.emit)
            else:
                prediction = await on_loop(program, inputs, lm)
    return program.result(prediction)


async def on_loop(program: Program, inputs: dict[str, Any], lm: Any) -> Any:
    """One un-streamed program call through DSPy's async path (``acall``) on the event loop:
    a cancel reaches the LM's connection.  ReAct needs it anyway: its async host tools
    would hang in sync ReAct."""
    import dspy

    with dspy.context(lm=lm):
        return await program.module.acall(**inputs)


@asynccontextmanager
async def react_steps(ctx: Context, program: Program) -> AsyncIterator[None]:
    """For ReAct: tool proxies call the host through ``ctx`` and steps become chunks."""
    if program.kind != "ReAct":
        yield
        return
    from bridge.programs.react import steps

    async with steps(ctx, program.module):
        yield


def concurrency(args: dict[str, Any]) -> int:
    return int_arg(args, "concurrency", DEFAULT_CONCURRENCY, minimum=1)
