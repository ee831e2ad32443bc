"""Peers driven from the BEAM: the worker or the floor loop behind a real Erlang port.

``bench/port_driver.escript`` opens the port the way an application does and
times every scenario from the BEAM's send; this side only sends it one command
per line and reads one JSON line back.  Any program that speaks the same line
protocol is a peer (``bench/inproc.py`` is one; ``elixir/bench/worker_driver.exs``, which
goes through the Elixir library's ``DSPyBridge.Worker``, is another).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

from .harness import ROOT, cpu_s

DRIVER = os.path.join(ROOT, "bench", "port_driver.escript")
INPROC = [sys.executable, "-m", "bench.inproc"]


def escript() -> str:
    found = shutil.which("escript")
    if found is None:
        raise SystemExit("escript not found on PATH: the port bench needs an Erlang VM "
                         "(Debian/Ubuntu: apt-get install erlang-base); `python -m bench --host python` does not")
    return found


class Driver:
    """One line-protocol driver process and the worker it runs (``os_pid``)."""

    def __init__(self, argv: list[str], warm: bool = True, root: str = ROOT, cwd: str | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=root, ERL_CRASH_DUMP_SECONDS="0")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=cwd or root, env=env)
        hello = self._answer()
        self.pid, self.ready_ms = hello["os_pid"], hello["ms"]
        if warm:
            self.run("warm")

    def _answer(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise EOFError(f"the driver {self.proc.args!r} ended (exit {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"driver: {answer['error']}")
        return answer

    def run(self, scenario: str, *ints: int) -> dict[str, Any]:
        """Run one scenario; its answer (``value``, or the figures it names)."""
        self.proc.stdin.write(" ".join([scenario, *map(str, ints)]) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._answer()

    def value(self, scenario: str, *ints: int) -> float:
        return self.run(scenario, *ints)["value"]

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def close(self) -> None:
        """End of input: the driver closes the port and waits for the worker to go."""
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def port_peer(worker: list[str], warm: bool = True, root: str = ROOT) -> Driver:
    """``worker`` (an argv starting with an absolute executable) behind a port in a fresh VM."""
    return Driver([escript(), DRIVER, "drive", *worker], warm, root)


def placements() -> dict[str, tuple[int, int]]:
    """``(VM's CPU, peer's CPU)`` for the placement-held latency rows: none without ``taskset`` or
    a second CPU.  Unheld, each run draws a placement, and the two cost different wake-ups."""
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(cpus) < 2:
        return {}
    return {"one CPU": (cpus[0], cpus[0]), "two CPUs": (cpus[0], cpus[1])}


def pinned_peer(worker: list[str], vm_cpu: int, peer_cpu: int) -> Driver:
    """``port_peer`` with the VM held to ``vm_cpu`` and the peer it starts to ``peer_cpu``."""
    taskset = shutil.which("taskset")
    assert taskset is not None, "placements() offers no placement without taskset"
    return Driver([taskset, "-c", str(vm_cpu), escript(), DRIVER, "drive", taskset, "-c", str(peer_cpu), *worker])


def library_peer(worker: list[str], root: str = ROOT) -> Driver:
    """``worker`` (``PYTHON -m bridge serve ARG...``) started by the Elixir library's ``DSPyBridge.Worker``
    (``elixir/bench/worker_driver.exs``), which adds ``-m bridge serve`` itself."""
    if shutil.which("mix") is None:
        raise SystemExit("mix not found on PATH: the DSPyBridge.Worker row needs Elixir (apt-get install elixir)")
    python, serve = worker[0], worker[1:]
    assert serve[:3] == ["-m", "bridge", "serve"], worker
    elixir = os.path.join(root, "elixir")
    # compiled first: `mix run` would print what it compiles where the driver's answers go
    built = subprocess.run(["mix", "compile"], cwd=elixir, capture_output=True, text=True)
    if built.returncode:
        raise SystemExit(f"mix compile failed in {elixir}:\n{built.stdout[-2000:]}{built.stderr[-2000:]}")
    return Driver(["mix", "run", "bench/worker_driver.exs", python, *serve[3:]], root=root, cwd=elixir)
