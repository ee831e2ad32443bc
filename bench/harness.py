"""A lean host for benchmarks: raw pipes, pre-encoded requests, frames counted by length.

The host must be cheaper than the worker it measures, so it never builds objects
it does not need: it decodes only the frames whose contents it must read.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, TypeVar

import msgpack

from bridge.wire import framing

HEADER = framing.HEADER
T = TypeVar("T")
P = TypeVar("P")  # a Peer, or a bench.port.Driver: anything with close()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BRIDGE = [sys.executable, "-m", "bridge", "serve", "--diagnostics"]
FLOOR = [sys.executable, "-m", "bench.floor"]


class Peer:
    """One worker process, spoken to over its stdin/stdout pipes."""

    def __init__(self, argv: list[str], warm: bool = True, root: str = ROOT) -> None:
        env = dict(os.environ, PYTHONPATH=root)
        started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     cwd=root, env=env)
        self.rfd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        self.wfd = self.proc.stdin.fileno()  # type: ignore[union-attr]
        self._buf = bytearray()
        ready = msgpack.unpackb(self.bodies()[0], raw=False)
        self.ready_ms = (time.perf_counter() - started) * 1000
        if warm and "stats" in ready.get("commands", ()):
            self.wait_warm()

    def wait_warm(self, timeout: float = 60.0) -> None:
        """Wait out the worker's background DSPy import: figures are for a worker in service."""
        deadline = time.monotonic() + timeout
        while not self.call("stats")["data"]["warm"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not finish warming up")
            time.sleep(0.02)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def bodies(self) -> list[bytes]:
        """Block until at least one whole frame is in; return every whole frame body."""
        buf = self._buf
        while True:
            out, pos, end = [], 0, len(buf)
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(buf, pos)
                if end - pos - 4 < size:
                    break
                out.append(bytes(buf[pos + 4:pos + 4 + size]))
                pos += 4 + size
            del buf[:pos]
            if out:
                return out
            data = os.read(self.rfd, 1 << 20)
            if not data:
                raise EOFError("worker closed its output")
            buf += data

    def request(self, rid: Any, command: str, args: dict | None = None) -> bytes:
        return framing.encode({"type": "request", "id": rid, "command": command, "args": args or {}})

    def call(self, command: str, args: dict | None = None) -> dict:
        """A plain request/response, decoding frames until the terminal one (not timed)."""
        self.write(self.request("call", command, args))
        while True:
            for body in self.bodies():
                frame = msgpack.unpackb(body, raw=False)
                if frame.get("type") in ("result", "error"):
                    return frame

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * 4096

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cpu_s(pid: int) -> float:
    """CPU time process ``pid``'s threads have used so far, in ns-resolution (schedstat): steadier
    than wall-clock rates on a noisy machine."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that just ended
            pass
    return total / 1e9


def alternate(peers: list[P], fn: Callable[[P], T], reps: int) -> list[list[T]]:
    """``fn`` run ``reps`` times on each peer, alternating (the machine drifts between runs);
    the peers are closed at the end.  Results are per peer, in ``peers`` order."""
    results: list[list[T]] = [[] for _ in peers]
    try:
        for _ in range(reps):
            for out, peer in zip(results, peers):
                out.append(fn(peer))
    finally:
        for peer in peers:
            peer.close()
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
