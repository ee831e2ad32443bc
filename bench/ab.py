"""``python -m bench.ab``: one figure for several worker builds or options, alternating, in one run.

Each variant is ``DIR`` (a checkout of this repository, e.g. a ``git worktree`` of an
older commit) optionally followed by ``:`` and extra ``bridge serve`` arguments.  The
first variant is the baseline of the ratios.  Besides the rate, the worker's CPU time
per item is shown: on a noisy 2-core machine it moves far less than wall-clock rates.

    git worktree add /tmp/before 96f374e
    python -m bench.ab --scenario echo /tmp/before . .:--no-meta

``--host port`` drives the variants from an Erlang VM through a real port
(``bench/port_driver.escript``, as the table of record does) instead of from
the lean Python host.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Callable

from . import scenarios as s
from .harness import BRIDGE, Peer, alternate
from .port import port_peer

SCENARIOS: dict[str, tuple[int, Callable[[Any, int], float]]] = {
    "echo": (60_000, lambda p, n: s.echo_pipelined_per_s(p, n)),
    "stream": (200_000, lambda p, n: s.stream_per_s(p, n)),
    "tool": (30_000, lambda p, n: s.tool_per_s(p, n, 100)),
}
PORT_SCENARIOS: dict[str, tuple[int, Callable[[Any, int], float]]] = {
    "echo": (60_000, lambda p, n: p.value("echo_pipe", n, 100)),
    "stream": (200_000, lambda p, n: p.value("stream", n, 0)),
    "tool": (30_000, lambda p, n: p.value("tool", n, 100)),
}


def spawn(variant: str, host: str = "python") -> Any:
    root, _, extra = variant.partition(":")
    argv = [*BRIDGE, *extra.split()]
    return port_peer(argv, root=root) if host == "port" else Peer(argv, root=root)


def run(variants: list[str], scenario: str, reps: int, n: int | None = None,
        host: str = "python") -> list[tuple[str, float, float]]:
    """Median rate (/s) and median worker CPU per item (µs) of each variant."""
    default_n, fn = (PORT_SCENARIOS if host == "port" else SCENARIOS)[scenario]
    n = n or default_n

    def timed(peer: Any) -> tuple[float, float]:
        before = peer.cpu_s()
        rate = fn(peer, n)
        return rate, (peer.cpu_s() - before) / n * 1e6

    results = alternate([spawn(v, host) for v in variants], timed, reps)
    return [(v, statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
            for v, runs in zip(variants, results)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", metavar="DIR[:ARGS]")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="echo")
    parser.add_argument("--reps", type=int, default=8, help="alternating runs per variant; medians are shown")
    parser.add_argument("--host", choices=("python", "port"), default="python",
                        help="python: the lean Python host; port: an Erlang VM through a real port")
    opts = parser.parse_args(argv)
    results = run(opts.variants, opts.scenario, opts.reps, host=opts.host)
    base_rate, base_cpu = results[0][1], results[0][2]
    width = max(len(v) for v in opts.variants)
    print(f"{'variant'.ljust(width)} | rate /s   | ratio | worker CPU µs/item | ratio")
    for variant, rate, cpu in results:
        print(f"{variant.ljust(width)} | {rate:9,.0f} | {rate / base_rate:.3f} | {cpu:18.2f} | {cpu / base_cpu:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
