"""The ``scripted/<name>`` engine: replies from a script, formatted as DSPy's adapter expects.

A script is a list of replies.  A reply is a map of output field -> value, used
up by one LM call in order; or ``{"when": {input: value}, "reply": {...}}``,
which answers every call whose inputs match and is never used up (checked
first, so concurrent batches stay deterministic); or ``{"raw": "text"}``, sent
verbatim.  The engine reads the request itself — the system prompt names the
output fields and their order, the last user message holds the inputs — so a
reply needs no knowledge of DSPy's wire format.

One reply answers one predictor call: when ChatAdapter cannot parse a reply
and DSPy retries the same call with JSONAdapter, that retry gets the same
reply again (rendered as JSON, or the same raw text) instead of using up the
next one.  So a ``raw`` reply fails its call cleanly with ``adapter_parse_error``.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.lm.offline import OfflineEngine, int_option

if TYPE_CHECKING:
    from dspy.lm15 import Request

_OUTPUTS = re.compile(r"Your output fields are:\n(.*?)(?:\nAll interactions will be structured|\Z)", re.S)
_OUTPUT_NAME = re.compile(r"^\d+\. `(\w+)`", re.M)
_SECTION = re.compile(r"\[\[ ## (\w+) ## \]\]\n")
_TRAILER = re.compile(r"\n\nRespond with .*\Z", re.S)
_RETRIES_KEPT = 1024  # remembered replies awaiting a possible JSONAdapter retry


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the engine needs from a request: which fields to answer, how, and the inputs."""

    outputs: list[str]
    json_mode: bool
    inputs: dict[str, str]

    @classmethod
    def read(cls, request: "Request") -> "Prompt":
        system = request.system if isinstance(request.system, str) else ""
        users = [m.text or "" for m in request.messages if m.role == "user"]
        return cls.parse(system or "", users[-1] if users else "")

    @classmethod
    def from_chat(cls, messages: list[dict[str, Any]]) -> "Prompt":
        """The prompt of OpenAI-style chat ``messages`` (an HTTP server answering as this engine)."""
        system = next((chat_text(m) for m in messages if m.get("role") == "system"), "")
        users = [chat_text(m) for m in messages if m.get("role") == "user"]
        return cls.parse(system, users[-1] if users else "")

    @classmethod
    def parse(cls, system: str, last_user: str) -> "Prompt":
        found = _OUTPUTS.search(system)
        outputs = _OUTPUT_NAME.findall(found.group(1)) if found else []
        return cls(outputs, "Respond with a JSON object" in last_user, _sections(last_user))

    def key(self) -> tuple:
        return tuple(sorted(self.inputs.items()))

    def matches(self, when: dict[str, Any]) -> bool:
        return all(name in self.inputs and _equal(self.inputs[name], value) for name, value in when.items())


def chat_text(message: dict[str, Any]) -> str:
    """The text of one OpenAI-style chat message (a string, or a list of text parts)."""
    content = message.get("content") or ""
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _sections(text: str) -> dict[str, str]:
    """The ``[[ ## field ## ]]`` sections of one user message, without the format reminder."""
    parts = _SECTION.split(_TRAILER.sub("", text))
    return {name: value.strip() for name, value in zip(parts[1::2], parts[2::2])}


def _equal(text: str, value: Any) -> bool:
    """Does an input as the prompt shows it equal a value from a ``when`` clause?"""
    if isinstance(value, str):
        return text == value.strip()
    try:
        return json.loads(text) == value
    except ValueError:
        return False


def _render_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(reply: dict[str, Any], prompt: Prompt) -> str:
    """Reply text in the format the calling adapter parses, fields in the prompt's order."""
    if "raw" in reply:
        return reply["raw"]
    names = [n for n in prompt.outputs if n in reply] if prompt.outputs else list(reply)
    if prompt.json_mode:
        return json.dumps({n: reply[n] for n in names}, ensure_ascii=False, indent=2)
    sections = [f"[[ ## {n} ## ]]\n{_render_value(reply[n])}" for n in names]
    return "\n\n".join([*sections, "[[ ## completed ## ]]"])


def _check_reply(reply: Any, where: str) -> dict[str, Any]:
    if not isinstance(reply, dict) or not reply:
        raise ValueError(f"{where} must be a non-empty map of output field -> value")
    if "raw" in reply and (len(reply) != 1 or not isinstance(reply["raw"], str)):
        raise ValueError(f"{where}: a raw reply is exactly {{'raw': text}}")
    return reply


def _check_when(entry: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if set(entry) != {"when", "reply"} or not isinstance(entry["when"], dict):
        raise ValueError(f"{where}: a conditional reply is {{'when': {{input: value}}, 'reply': {{...}}}}")
    return entry["when"], _check_reply(entry["reply"], f"{where}.reply")


class ScriptedEngine(OfflineEngine):
    """Serves a script to one configured LM.  Thread-safe: batch items call it concurrently."""

    def __init__(self, script: list[Any], **timing: Any) -> None:
        super().__init__(**timing)
        self._when: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._ordered: deque[dict[str, Any]] = deque()
        for i, entry in enumerate(script):
            if isinstance(entry, dict) and "when" in entry:
                self._when.append(_check_when(entry, f"script[{i}]"))
            else:
                self._ordered.append(_check_reply(entry, f"script[{i}]"))
        self._used = 0
        self._retries: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ScriptedEngine":
        """Pop this engine's options from ``lm.configure``'s arguments."""
        script = options.pop("script", None)
        if not isinstance(script, list):
            raise ValueError("a scripted model needs 'script': a list of replies, one per LM call")
        return cls(script, token_delay_ms=int_option(options, "token_delay_ms", 0, 0),
                   chunk_chars=int_option(options, "chunk_chars", None, 1))

    def reply_text(self, request: "Request", streaming: bool) -> str:
        return self.answer(Prompt.read(request), streaming)

    def answer(self, prompt: Prompt, streaming: bool) -> str:
        """The text of the next reply for ``prompt``, rendered for its adapter."""
        with self._lock:
            reply = self._pick(prompt)
            if not streaming and not prompt.json_mode:
                self._remember(prompt.key(), reply)
        return render(reply, prompt)

    def _pick(self, prompt: Prompt) -> dict[str, Any]:
        if prompt.json_mode and (retried := self._retries.pop(prompt.key(), None)) is not None:
            return retried
        for when, reply in self._when:
            if prompt.matches(when):
                return reply
        if not self._ordered:
            from dspy.lm15 import InvalidRequestError

            raise InvalidRequestError(
                f"the scripted LM has no replies left ({self._used} used, no 'when' reply matched "
                f"inputs {prompt.inputs!r}); configure it again with a longer script")
        self._used += 1
        return self._ordered.popleft()

    def _remember(self, key: tuple, reply: dict[str, Any]) -> None:
        """Keep the reply for DSPy's JSONAdapter retry of this call (only un-streamed calls retry)."""
        self._retries[key] = reply
        self._retries.move_to_end(key)
        if len(self._retries) > _RETRIES_KEPT:
            self._retries.popitem(last=False)
