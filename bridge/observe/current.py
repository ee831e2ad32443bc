"""The request running in this task or thread: the one context variable for it.

Set by the worker in each request's own task; DSPy's threads and tasks inherit
it, so an LM call made anywhere for a request is accounted (``lm_usage``) and
recorded (``transcripts.recorder``) as that request's.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

REQUEST: ContextVar[Any] = ContextVar("bridge_request", default=None)
