"""Sessions: per-host-session state (LM, programs, objects by reference) with idle TTLs.

Everything a session holds hangs off its ``Session`` object, so closing or
expiring the session releases all of it at once.  The object count is bounded
across all sessions, so a host that forgets to release refs cannot grow the worker.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from bridge.observe.metrics import LmUsage
from bridge.wire.errors import PeerError
from bridge.wire.protocol import quote

DEFAULT_SESSION = "default"


class Session:
    __slots__ = ("id", "ttl_s", "last_used", "objects", "lm", "data", "usage")

    def __init__(self, session_id: str, ttl_s: float | None = None) -> None:
        self.id = session_id
        self.ttl_s = ttl_s
        self.last_used = time.monotonic()
        self.objects: dict[str, Any] = {}
        self.lm: Any = None
        self.data: dict[str, Any] = {}  # named things handlers keep, e.g. stored pipelines
        self.usage = LmUsage()  # every LM call made in this session (stats)

    def expired(self, now: float) -> bool:
        return self.ttl_s is not None and now - self.last_used > self.ttl_s

    def get(self, ref: Any) -> Any:
        """The object behind ``ref``; ``unknown_ref`` if this session does not hold it."""
        try:
            return self.objects[ref]
        except (KeyError, TypeError):
            raise PeerError("unknown_ref", f"session {quote(self.id)} holds no object {quote(ref)}") from None


class SessionStore:
    """All sessions of the worker, and the object-count bound they share."""

    def __init__(self, max_objects: int = 10_000) -> None:
        self.max_objects = max_objects
        self._sessions: dict[str, Session] = {}
        self._refs = itertools.count(1)

    def __len__(self) -> int:
        return len(self._sessions)

    def lm_usage(self) -> dict[str, dict[str, Any]]:
        """LM usage of each live session that made LM calls."""
        return {sid: s.usage.as_dict() for sid, s in self._sessions.items() if s.usage.calls}

    @property
    def object_count(self) -> int:
        return sum(len(s.objects) for s in self._sessions.values())

    def get_or_create(self, session_id: str | None) -> Session:
        sid = session_id or DEFAULT_SESSION
        session = self._sessions.get(sid)
        if session is None:
            session = self._sessions[sid] = Session(sid)
        session.last_used = time.monotonic()
        return session

    def close(self, session_id: str | None) -> None:
        sid = session_id or DEFAULT_SESSION
        if self._sessions.pop(sid, None) is None:
            raise PeerError("unknown_session", f"no session {quote(sid)}")

    def store(self, session: Session, obj: Any) -> str:
        """Keep ``obj`` in ``session`` and return its new ref."""
        if self.object_count >= self.max_objects:
            raise PeerError("object_limit", f"the worker already holds {self.max_objects} objects; "
                            "release refs or close sessions")
        ref = f"r{next(self._refs)}"
        session.objects[ref] = obj
        return ref

    def sweep(self, now: float | None = None) -> list[str]:
        """Drop expired sessions; returns their ids.  Called about once a second."""
        now = time.monotonic() if now is None else now
        dead = [sid for sid, s in self._sessions.items() if s.expired(now)]
        for sid in dead:
            del self._sessions[sid]
        return dead
