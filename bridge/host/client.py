"""A small Python host for the worker: spawn it, send requests, read chunks and results.

The tests, the benchmarks, ``bridge demo`` and ``bridge replay`` all drive the
worker through this class, exactly as a port would: one pipe in, one pipe out,
packet-4 frames.  One reader thread routes frames to the calls waiting on them
and answers the worker's host-tool calls from ``tools``.
"""

from __future__ import annotations

import itertools
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from bridge.wire import framing


class RemoteError(Exception):
    """The worker ended a request with an ``error`` frame."""

    def __init__(self, frame: dict) -> None:
        err = frame.get("error") or {}
        super().__init__(f"{err.get('type')}: {err.get('message')}")
        self.frame = frame
        self.type = err.get("type")
        self.message = err.get("message")
        self.details = err.get("details")


class Call:
    """One request in flight: iterate for chunk data, then ``result()``."""

    def __init__(self, worker: "Worker", rid: Any) -> None:
        self.worker = worker
        self.id = rid
        self.frames: list[dict] = []
        self.arrivals: list[float] = []  # perf_counter() when the reader received each frame
        self.terminal: dict | None = None
        self._seq = 0
        self._queue: queue.SimpleQueue[tuple[float, dict]] = queue.SimpleQueue()

    def _next_frame(self, timeout: float | None) -> dict:
        try:
            arrival, frame = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame for request {self.id!r} within {timeout} s") from None
        if frame.get("type") == "closed":
            raise ConnectionError(f"worker exited before request {self.id!r} finished: {self.worker.exit_report()}")
        self.frames.append(frame)
        self.arrivals.append(arrival)
        return frame

    def chunks(self, timeout: float | None = 30.0) -> Iterator[Any]:
        """Yield each chunk's data in order until the terminal frame; checks ``seq``."""
        while self.terminal is None:
            frame = self._next_frame(timeout)
            if frame["type"] == "chunk":
                if frame["seq"] != self._seq:
                    raise AssertionError(f"request {self.id!r}: seq {frame['seq']}, expected {self._seq}")
                self._seq += 1
                yield frame["data"]
            elif frame["type"] != "telemetry":  # telemetry frames stay in ``frames`` only
                self.terminal = frame

    __iter__ = chunks

    def result(self, timeout: float | None = 30.0) -> Any:
        """Wait for the terminal frame; return its data or raise ``RemoteError``."""
        for _ in self.chunks(timeout):
            pass
        assert self.terminal is not None
        if self.terminal["type"] == "error":
            raise RemoteError(self.terminal)
        return self.terminal.get("data")

    def cancel(self) -> None:
        self.worker.send({"type": "cancel", "id": self.id})


class Worker:
    """A worker process driven over its stdin/stdout pipes."""

    def __init__(self, argv: list[str], *, tools: dict[str, Callable[..., Any]] | None = None,
                 env: dict[str, str] | None = None, stderr: Any = None, ready_timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=env, bufsize=0)
        self.tools = tools
        self._stderr = stderr
        self.unrouted: queue.SimpleQueue[dict] = queue.SimpleQueue()  # id-less errors, unknown ids
        self.rpc_requests: queue.SimpleQueue[dict] = queue.SimpleQueue()  # when tools is None
        self.rpc_cancels: queue.SimpleQueue[dict] = queue.SimpleQueue()
        self._calls: dict[Any, Call] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="host-tool")
        self._ready: queue.SimpleQueue[dict] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="bridge-client-reader", daemon=True)
        self._reader.start()
        try:
            self.ready = self._ready.get(timeout=ready_timeout)
        except queue.Empty:
            self.kill()
            raise TimeoutError("worker sent no ready frame") from None

    @classmethod
    def spawn(cls, *args: str, python: str = sys.executable, **kwargs: Any) -> "Worker":
        """Start ``python -m bridge serve ARGS`` the way an Erlang port does."""
        return cls([python, "-m", "bridge", "serve", *args], **kwargs)

    # ---- sending -----------------------------------------------------------------

    def send(self, frame: dict) -> None:
        self.send_raw(framing.encode(frame))

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(data)
            except BrokenPipeError as exc:
                raise ConnectionError(f"worker exited: {self.exit_report()}") from exc

    def request(self, command: str, args: dict | None = None, *, id: Any = None, **fields: Any) -> Call:
        """Send a request; extra fields (``session_id``, ``timeout_ms``, ``window``…) go in the frame."""
        rid = next(self._ids) if id is None else id
        call = self._calls[rid] = Call(self, rid)
        frame = {"type": "request", "id": rid, "command": command, **fields}
        if args is not None:
            frame["args"] = args
        self.send(frame)
        return call

    def call(self, command: str, args: dict | None = None, timeout: float = 30.0, **fields: Any) -> Any:
        """Request and wait: the result's data, or ``RemoteError``."""
        return self.request(command, args, **fields).result(timeout)

    def respond(self, rpc_id: Any, result: Any = None, error: dict | None = None) -> None:
        """Answer a host-tool call by hand (when ``tools`` is None)."""
        frame: dict = {"type": "rpc_response", "rpc_id": rpc_id, "ok": error is None}
        frame["result" if error is None else "error"] = result if error is None else error
        self.send(frame)

    # ---- receiving ---------------------------------------------------------------

    def _read(self) -> None:
        decoder = framing.Decoder(max_frame_bytes=2**32 - 1)
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while data := os.read(fd, 1 << 20):
            for event in decoder.feed(data):
                if isinstance(event, framing.Frame):
                    self._route(event.body)
                else:
                    self.unrouted.put({"type": "undecodable", "event": repr(event)})
        for call in list(self._calls.values()):
            call._queue.put((time.perf_counter(), {"type": "closed"}))
        self._ready.put({"type": "closed"})

    def _route(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind in ("chunk", "result", "error", "telemetry") and frame.get("id") in self._calls:
            call = self._calls[frame["id"]]
            if kind in ("result", "error"):
                del self._calls[frame["id"]]
            call._queue.put((time.perf_counter(), frame))
        elif kind == "rpc_request":
            if self.tools is None:
                self.rpc_requests.put(frame)
            else:
                self._pool.submit(self._answer_tool, frame)
        elif kind == "rpc_cancel":
            self.rpc_cancels.put(frame)
        elif kind == "ready":
            self._ready.put(frame)
        else:
            self.unrouted.put(frame)

    def _answer_tool(self, frame: dict) -> None:
        fn = (self.tools or {}).get(frame["tool"])
        try:
            if fn is None:
                raise LookupError(f"no host tool {frame['tool']!r}")
            self.respond(frame["rpc_id"], fn(*frame.get("args", []), **frame.get("kwargs", {})))
        except Exception as exc:
            try:
                self.respond(frame["rpc_id"], error={"type": type(exc).__name__, "message": str(exc)})
            except OSError:
                pass  # the worker is gone

    # ---- lifecycle ---------------------------------------------------------------

    def exit_report(self, tail: int = 16_000) -> str:
        """Why the worker is gone: its exit status and, when its stderr went to a file, how that ends."""
        try:
            report = f"exit status {self.proc.wait(5)}"
        except subprocess.TimeoutExpired:
            report = "its stdout closed but it is still running"
        if hasattr(self._stderr, "fileno"):
            fd = self._stderr.fileno()
            try:  # a terminal, a pipe or a write-only file has no end to read back
                ending = os.pread(fd, tail, max(0, os.fstat(fd).st_size - tail)).decode(errors="replace")
            except OSError:
                return report
            report += f"; its stderr ends:\n{ending}"
        return report

    def close_input(self) -> None:
        assert self.proc.stdin is not None
        with self._send_lock:
            self.proc.stdin.close()

    def shutdown(self, timeout: float = 10.0) -> int:
        """Send ``shutdown`` and wait for the exit code."""
        self.send({"type": "shutdown"})
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        self._pool.shutdown(wait=False)
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None:
            try:
                self.close_input()
                self.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
