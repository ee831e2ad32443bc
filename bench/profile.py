"""``python -m bench.profile``: where the worker's time goes, behind a real Erlang port.

A warm worker runs one port-driver scenario over and over while ``py-spy record``
samples it (``pip install py-spy``); then the functions that hold the most
samples are listed by own time and by total time, as shares of the samples in
which a thread was running (py-spy leaves out idle threads unless ``--idle``).

    python -m bench.profile --scenario echo --seconds 15
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections import Counter

from .harness import BRIDGE
from .port import port_peer

SCENARIOS: dict[str, tuple[str, ...]] = {
    "echo": ("echo_pipe", "60000", "100"),
    "latency": ("echo_seq", "3000"),
    "ping_load": ("ping_load", "1000", "8", "4"),
    "stream": ("stream", "200000", "0"),
    "tool": ("tool", "50000", "100"),
    "predict": ("predict", "200"),
}


def record(scenario: tuple[str, ...], seconds: int, rate: int, out: str, idle: bool) -> int:
    """Sample the worker for ``seconds`` while it runs ``scenario``; the number of runs."""
    spy_bin = shutil.which("py-spy")
    if spy_bin is None:
        raise SystemExit("py-spy not found on PATH: pip install py-spy")
    peer = port_peer(BRIDGE)
    try:
        spy = subprocess.Popen([spy_bin, "record", "--pid", str(peer.pid), "--rate", str(rate), "--duration",
                                str(seconds), "--format", "raw", "--output", out, "--function", "--nonblocking",
                                *(["--idle"] if idle else [])], stdout=subprocess.DEVNULL)
        runs = 0
        while spy.poll() is None:
            peer.run(scenario[0], *map(int, scenario[1:]))
            runs += 1
    finally:
        peer.close()
    if spy.returncode:
        raise SystemExit(f"py-spy failed (exit {spy.returncode})")
    return runs


def tally(path: str) -> tuple[int, Counter[str], Counter[str]]:
    """Samples, and samples per function: as the innermost frame (own) and anywhere on the stack."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            n = int(count)
            samples += n
            own[frames[-1]] += n
            for frame in set(frames):
                total[frame] += n
    return samples, own, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="echo")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--idle", action="store_true", help="count idle threads' samples too")
    parser.add_argument("--out", default="/tmp/bridge-profile.txt", help="py-spy's raw (collapsed) stacks")
    opts = parser.parse_args(argv)
    runs = record(SCENARIOS[opts.scenario], opts.seconds, opts.rate, opts.out, opts.idle)
    samples, own, total = tally(opts.out)
    print(f"{opts.scenario}: {runs} runs, {samples} samples at {opts.rate}/s over {opts.seconds} s "
          f"({samples / (opts.rate * opts.seconds):.0%} of one thread's time), stacks in {opts.out}")
    for title, counts in (("own", own), ("total", total)):
        print(f"\n{title:>6} | function")
        for frame, n in counts.most_common(opts.top):
            print(f"{n / samples:6.1%} | {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
