"""Throttled logging: a warning that the peer can trigger once per frame must not flood stderr."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable


class Throttled:
    """Logs one kind of message at most once per ``interval`` seconds.  Messages in between are
    counted, and the next one logged says how many were left out.  Not thread-safe: one caller
    (the loop)."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self.clock = clock
        self.held = 0  # messages left out since the last one logged
        self._next = float("-inf")

    def __call__(self, message: str, *args: Any) -> None:
        now = self.clock()
        if now < self._next:
            self.held += 1
            return
        self._next = now + self.interval
        if self.held:
            message += " (and %d more like it since the last one logged)"
            args = (*args, self.held)
            self.held = 0
        self.logger.log(self.level, message, *args)
