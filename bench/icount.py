"""``python -m bench.icount``: the worker's own cost per item in CPU instructions, a figure the
machine's noise cannot move.

Rates on a shared machine swing from run to run (the floor's pipelined echo has measured
137k to 322k/s within a day); an instruction count does not.  Each scenario drives one
worker in-process on uvloop: ``Server.serve`` sets up as usual (writer, tool bridge,
responder; output to ``/dev/null``), and a driver stands in for its reading loop, handing
prepared reads to ``Server._on_read`` as the reader does.  The driver runs under
``valgrind --tool=callgrind`` twice, with N and with 3N items; the difference of the two
instruction totals, divided by 2N, is one item's cost, since start-up and imports cancel
out.  ``PYTHONHASHSEED`` is fixed so that both runs lay out their dicts alike.  Repeated
runs agree within about 0.3%.  The driver's own work per item (building the host's
frames) is in the figure too, the same for every build.

    python -m bench.icount --scenario tool /tmp/before .

Each positional argument is a checkout whose ``bridge`` package is measured (``git
worktree add --detach /tmp/before HEAD~1``).  Needs ``valgrind`` (Debian: ``apt-get
install valgrind``).

``--whole`` (echo or stream) counts whole processes instead, the floor loop beside each
build's worker, fed through their stdin pipe: the worker's reads, writes and event loop are
in the figure, and ``floor / peer`` compares as the rate targets do.  Kernel time is not
counted (the floor writes once per frame, the worker once per ~14).  Two runs at the same N
agree within 0.3%; another N moves the worker's figure by up to 3% (20,000 against 10,000
echoes), so builds are compared at one N.

    python -m bench.icount --whole --scenario echo /tmp/before .
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any, Awaitable, Callable

import msgpack

HEADER = struct.Struct(">I")
ECHO_PER_READ = 64  # pipelined echo: requests per read
LANES, ANSWERS_PER_READ = 100, 50  # host calls in flight, and answers per read


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


# ---- the drivers (in the measured process) ------------------------------------------------

async def _echo(server: Any, on_read: Callable[[memoryview], bool], n: int) -> None:
    """Reads of ``ECHO_PER_READ`` echo requests, each answered inline."""
    read = memoryview(b"".join(frame({"type": "request", "id": i, "command": "echo", "args": {"x": i}})
                               for i in range(ECHO_PER_READ)))
    for _ in range(n // ECHO_PER_READ):
        on_read(read)


async def _echo1(server: Any, on_read: Callable[[memoryview], bool], n: int) -> None:
    """Reads of one echo request each: a sequential caller's path, once per read."""
    read = memoryview(frame({"type": "request", "id": 1, "command": "echo", "args": {"x": 1}}))
    for _ in range(n):
        on_read(read)


async def _tool(server: Any, on_read: Callable[[memoryview], bool], n: int) -> None:
    """``rpc_loop`` with ``LANES`` calls parked, answered oldest first, ``ANSWERS_PER_READ`` per read.
    A lane takes its argument and its ``rpc_id`` in one step, so call ``rpc_id`` carries ``rpc_id - 1``."""
    import anyio

    on_read(memoryview(frame({"type": "request", "id": "rpc", "command": "rpc_loop",
                              "args": {"n": n, "concurrency": LANES}})))
    answered = 0
    while answered < n:
        while max(server.tools._slots, default=0) < min(answered + LANES, n):  # every call up to there made
            if not server.inflight:
                return  # rpc_loop failed: reported by the caller
            await anyio.sleep(0)
        batch = range(answered + 1, min(answered + ANSWERS_PER_READ, n) + 1)
        on_read(memoryview(b"".join(frame({"type": "rpc_response", "rpc_id": i, "ok": True, "result": i - 1})
                                    for i in batch)))
        answered += len(batch)
    while server.inflight:
        await anyio.sleep(0)


async def _stream(server: Any, on_read: Callable[[memoryview], bool], n: int) -> None:
    """One ``stream_count`` of ``n`` int chunks."""
    import anyio

    on_read(memoryview(frame({"type": "request", "id": "s", "command": "stream_count", "args": {"n": n}})))
    while server.inflight:
        await anyio.sleep(0)


DRIVERS: dict[str, Callable[[Any, Callable[[memoryview], bool], int], Awaitable[None]]] = {
    "echo": _echo, "echo1": _echo1, "tool": _tool, "stream": _stream}


def child(scenario: str, n: int) -> None:
    """Run one scenario with ``n`` items in this process (under valgrind)."""
    from functools import partial

    import anyio

    import bridge.commands.core  # noqa: F401  (registers echo)
    import bridge.commands.diagnostics  # noqa: F401  (registers rpc_loop and stream_count)
    from bridge.wire import framing
    from bridge.worker.options import Config
    from bridge.worker.server import Server

    class Driven(Server):
        async def _read_loop(self) -> None:  # the driver stands in for the reader
            on_read = partial(self._on_read, framing.Decoder(self.config.max_frame_bytes))
            await DRIVERS[scenario](self, on_read, n)
            self._tg.cancel_scope.cancel()
            snapshot = self.metrics.snapshot()
            expected = {"echo": n // ECHO_PER_READ * ECHO_PER_READ, "echo1": n}.get(scenario, 1)
            if snapshot["errors"] or sum(snapshot["requests"].values()) != expected:
                raise SystemExit(f"the {scenario} driver's requests failed: {snapshot['requests']}, {snapshot['errors']}")

    idle_input, _ = os.pipe()
    server = Driven(Config(in_fd=idle_input, out_fd=os.open(os.devnull, os.O_WRONLY)))
    anyio.run(server.serve, backend_options={"use_uvloop": True})


# ---- counting -----------------------------------------------------------------------------

VALGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]


def collected(stderr: str) -> int | None:
    """The instruction total valgrind reports at exit."""
    found = re.search(r"Collected : (\d+)", stderr)
    return None if found is None else int(found.group(1))


def difference(count: Callable[[int], int], n: int) -> float:
    """One item's instructions: runs of ``n`` and ``3n`` items, so that start-up cancels out."""
    return (count(3 * n) - count(n)) / (2 * n)


# ---- whole processes, the floor beside the worker ------------------------------------------

# The worker imports DSPy in a thread after ``ready``: its frames are sent once a request that
# needs DSPy was answered, so that no run counts the import, nor the thread switches beside it.
WARM = frame({"type": "request", "id": "warm", "command": "lm.configure",
              "args": {"model": "scripted/w", "script": [{"answer": "-"}]}})


def whole_input(scenario: str, n: int) -> bytes:
    """What the host writes: ``n`` pipelined echo requests, or one ``stream_count`` of ``n`` chunks."""
    if scenario == "echo":
        return b"".join(frame({"type": "request", "id": i, "command": "echo", "args": {"x": i}}) for i in range(n))
    return frame({"type": "request", "id": 1, "command": "stream_count", "args": {"n": n}})


def read_frame(stream: Any) -> dict:
    (size,) = HEADER.unpack(stream.read(4))
    return msgpack.unpackb(stream.read(size))


def answered(output: bytes, scenario: str, n: int) -> bool:
    """Did the peer answer every request, without an error frame (nor a bad or cut-off one)?"""
    from bridge.wire import framing

    decoder = framing.Decoder()
    events = decoder.feed(output) + decoder.close()
    types = [event.body.get("type") if isinstance(event, framing.Frame) else event for event in events]
    return types == (["result"] * n if scenario == "echo" else ["chunk"] * n + ["result"])


def whole_run(argv: list[str], root: str, scenario: str, n: int, warm: bool) -> tuple[int, bool, str]:
    """Run one whole peer process: ``ready``, with ``warm`` the warm-up request answered, then
    ``whole_input`` written in one go (a thread) and every answer read to EOF.  Its exit status,
    whether every request was answered, and its stderr."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=root, env=dict(os.environ, PYTHONPATH=root, PYTHONHASHSEED="0"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        ok = read_frame(proc.stdout).get("type") == "ready"
        if warm:
            proc.stdin.write(WARM)
            proc.stdin.flush()
            ok = ok and read_frame(proc.stdout).get("type") == "result"
        data = whole_input(scenario, n)

        def write() -> None:
            proc.stdin.write(data)
            proc.stdin.close()

        writer = threading.Thread(target=write)
        writer.start()
        ok = answered(proc.stdout.read(), scenario, n) and ok
        writer.join()
        code = proc.wait()
        err.seek(0)
        return code, ok, err.read()


def whole_instructions(argv: list[str], root: str, scenario: str, n: int, warm: bool) -> int:
    """The instructions valgrind counts for one ``whole_run``."""
    code, ok, log = whole_run([*VALGRIND, *argv], root, scenario, n, warm)
    found = collected(log)
    if code or found is None or not ok:
        raise SystemExit(f"{argv} in {root} did not answer every request (exit {code}):\n{log[-2000:]}")
    return found


def whole(roots: list[str], scenario: str, n: int) -> None:
    """``--whole``: each build's worker as a whole process (uvloop, reads, writes, start-up cancelled
    out), beside the floor loop; ``floor / peer`` compares as the rate targets do (>= 0.6)."""
    floor_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = [sys.executable, "-m", "bridge", "serve", "--diagnostics"]
    peers = [("floor", [sys.executable, "-m", "bench.floor"], floor_root, False)]
    peers += [(root, worker, os.path.abspath(root), True) for root in roots]
    floor = None
    print(f"{'peer':<30} | instructions per {scenario} item, whole process | floor / peer")
    for name, argv, root, warm in peers:
        cost = difference(lambda items: whole_instructions(argv, root, scenario, items, warm), n)
        floor = floor or cost
        print(f"{name:<30} | {cost:>41,.0f} | {floor / cost:.3f}")


# ---- the parent ---------------------------------------------------------------------------

def instructions(root: str, scenario: str, n: int) -> int:
    """The instructions valgrind counts for one run of ``scenario`` with ``n`` items."""
    env = dict(os.environ, PYTHONPATH=root, PYTHONHASHSEED="0")
    run = subprocess.run([*VALGRIND, sys.executable, os.path.abspath(__file__), "--child", scenario, str(n)],
                         cwd=root, env=env, capture_output=True, text=True)
    found = collected(run.stderr)
    if run.returncode or found is None:
        raise SystemExit(f"the {scenario} run in {root} failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return found


def per_item(root: str, scenario: str, n: int) -> float:
    return difference(lambda items: instructions(root, scenario, items), n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.icount", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", default=["."], help="checkouts to measure (default: this one)")
    parser.add_argument("--scenario", choices=sorted(DRIVERS), default="echo")
    parser.add_argument("-n", type=int, default=0, help="items in the smaller run (default: per scenario)")
    parser.add_argument("--whole", action="store_true",
                        help="echo or stream: whole worker processes fed through a pipe, beside the floor loop")
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "N"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child(opts.child[0], int(opts.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found on PATH (Debian: apt-get install valgrind)")
    if opts.whole:
        if opts.scenario not in ("echo", "stream"):
            raise SystemExit("--whole measures echo or stream (a host call needs a live host)")
        whole(opts.roots, opts.scenario, opts.n or 20000)
        return 0
    n = opts.n or {"echo": 32 * ECHO_PER_READ * 16, "echo1": 10000, "tool": 2000, "stream": 20000}[opts.scenario]
    baseline = None
    print(f"{'build':<30} | instructions per {opts.scenario} item | ratio")
    for root in opts.roots:
        cost = per_item(os.path.abspath(root), opts.scenario, n)
        baseline = baseline or cost
        print(f"{root:<30} | {cost:>26,.0f} | {cost / baseline:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
