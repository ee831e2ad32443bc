"""Sessions: per-host-session state (LM, programs, objects by reference) with idle TTLs.

Everything a session holds hangs off its ``Session`` object, so closing or
expiring the session releases all of it at once.  Everything is bounded: the
number of sessions (``--max-sessions``), the objects across all of them
(``--max-objects``), and the ids of ended sessions remembered for the host.

A session named by a request but never created with ``session.create`` gets
the default idle TTL (``--session-ttl``); the default session never expires.
Deadlines wait in a heap, so a sweep costs O(expired · log n), not O(sessions):
a session used since its entry was queued is pushed again with its real deadline.
A request naming a session that expired or was closed gets ``unknown_session``
once (``details.reason``), so the host learns its state is gone; the next
request, or one that opens a session (``lm.configure``, ``session.create``,
``program.load``), starts it afresh.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from typing import Any

from bridge.observe.metrics import LmUsage
from bridge.wire.errors import ErrorType, PeerError
from bridge.wire.protocol import quote

DEFAULT_SESSION = "default"
EXPIRED, CLOSED = "expired", "closed"


class Session:
    __slots__ = ("id", "ttl_s", "last_used", "objects", "lm", "data", "usage", "queued")

    def __init__(self, session_id: str, ttl_s: float | None = None) -> None:
        self.id = session_id
        self.ttl_s = ttl_s
        self.last_used = time.monotonic()
        self.objects: dict[str, Any] = {}  # change through ``SessionStore`` (store, release): it counts them
        self.lm: Any = None
        self.data: dict[str, Any] = {}  # named things handlers keep, e.g. stored pipelines
        self.usage = LmUsage()  # every LM call made in this session (stats)
        self.queued: float | None = None  # the deadline of its live heap entry, if any

    @property
    def deadline(self) -> float | None:
        return None if self.ttl_s is None else self.last_used + self.ttl_s

    def get(self, ref: Any) -> Any:
        """The object behind ``ref``; ``unknown_ref`` if this session does not hold it."""
        try:
            return self.objects[ref]
        except (KeyError, TypeError):
            raise PeerError("unknown_ref", f"session {quote(self.id)} holds no object {quote(ref)}") from None


class SessionStore:
    """All sessions of the worker, and the bounds they share."""

    def __init__(self, max_objects: int = 10_000, max_sessions: int = 10_000, default_ttl: float = 3600.0) -> None:
        self.max_objects = max_objects
        self.max_sessions = max_sessions
        self.default_ttl = default_ttl
        self.object_count = 0
        self._sessions: dict[str, Session] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it ended, oldest first
        self._deadlines: list[tuple[float, int, str]] = []  # (deadline, tie-breaker, id): a heap
        self._order = itertools.count()
        self._refs = itertools.count(1)

    def __len__(self) -> int:
        return len(self._sessions)

    def lm_usage(self) -> dict[str, dict[str, Any]]:
        """LM usage of each live session that made LM calls."""
        return {sid: s.usage.as_dict() for sid, s in self._sessions.items() if s.usage.calls}

    def get_or_create(self, session_id: str | None, opens: bool = False) -> Session:
        """The session ``session_id`` names (the default one for None), used now.

        Raises ``unknown_session`` once for an id that expired or was closed, unless
        the request ``opens`` the session; ``overloaded`` past ``max_sessions``."""
        sid = session_id or DEFAULT_SESSION
        session = self._sessions.get(sid)
        if session is None:
            session = self._create(sid, opens)
        session.last_used = time.monotonic()
        return session

    def _create(self, sid: str, opens: bool) -> Session:
        reason = self._ended.pop(sid, None)
        if reason is not None and not opens:
            raise PeerError(ErrorType.UNKNOWN_SESSION,
                            f"session {sid!r} {reason}: its LM and refs are gone; this request did not run, and the "
                            "next one in this session starts it afresh (lm.configure or session.create first)",
                            {"session_id": sid, "reason": reason})
        if len(self._sessions) >= self.max_sessions:
            raise PeerError(ErrorType.OVERLOADED, f"the worker already holds {self.max_sessions} sessions "
                            "(--max-sessions); close sessions or give them a ttl_s", {"max_sessions": self.max_sessions})
        session = self._sessions[sid] = Session(sid, None if sid == DEFAULT_SESSION else self.default_ttl)
        self._queue(session)
        return session

    def set_ttl(self, session: Session, ttl_s: float | None) -> None:
        """``ttl_s`` seconds of idleness end ``session``; None keeps it until it is closed."""
        session.ttl_s = ttl_s
        self._queue(session)

    def _queue(self, session: Session) -> None:
        """Make sure a heap entry exists at or before the session's deadline."""
        deadline = session.deadline
        if deadline is None or (session.queued is not None and session.queued <= deadline):
            return  # no TTL, or an entry that comes first already: popped, it is pushed again if still early
        session.queued = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._order), session.id))
        if len(self._deadlines) > 2 * len(self._sessions) + 64:
            self._rebuild()  # entries left stale by shortened TTLs: keep the heap bounded

    def _rebuild(self) -> None:
        self._deadlines = [(s.queued, next(self._order), s.id) for s in self._sessions.values() if s.queued is not None]
        heapq.heapify(self._deadlines)

    def close(self, session_id: str | None) -> None:
        sid = session_id or DEFAULT_SESSION
        if sid not in self._sessions:
            reason = self._ended.get(sid)
            raise PeerError(ErrorType.UNKNOWN_SESSION, f"no session {quote(sid)}" + (f" (it {reason})" if reason else ""),
                            {"session_id": sid, "reason": reason} if reason else {"session_id": sid})
        self._end(sid, CLOSED)

    def _end(self, sid: str, reason: str) -> None:
        session = self._sessions.pop(sid)
        self.object_count -= len(session.objects)
        if sid != DEFAULT_SESSION:
            self._ended[sid] = reason
            if len(self._ended) > self.max_sessions:
                self._ended.popitem(last=False)

    def store(self, session: Session, obj: Any) -> str:
        """Keep ``obj`` in ``session`` and return its new ref."""
        if self.object_count >= self.max_objects:
            raise PeerError("object_limit", f"the worker already holds {self.max_objects} objects; "
                            "release refs or close sessions")
        ref = f"r{next(self._refs)}"
        session.objects[ref] = obj
        self.object_count += 1
        return ref

    def release(self, session: Session, ref: Any) -> None:
        """Drop ``ref`` from ``session``; ``unknown_ref`` if it holds none by that id."""
        session.get(ref)
        del session.objects[ref]
        self.object_count -= 1

    def sweep(self, now: float | None = None) -> list[str]:
        """End the sessions idle past their TTL; returns their ids.  Costs O(due entries · log n)."""
        now = time.monotonic() if now is None else now
        heap, dead = self._deadlines, []
        while heap and heap[0][0] <= now:
            queued, _, sid = heapq.heappop(heap)
            session = self._sessions.get(sid)
            if session is None or session.queued != queued:
                continue  # closed, or a stale entry of a session queued again since
            session.queued = None
            deadline = session.deadline
            if deadline is not None and deadline <= now:
                self._end(sid, EXPIRED)
                dead.append(sid)
            else:
                self._queue(session)  # used since: wait again, until its real deadline
        return dead
