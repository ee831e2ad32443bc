"""``python -m bench``: every figure for the worker beside the floor loop, in one run.

Each figure is measured ``--reps`` times, alternating the two peers, and the
median is shown with the ratio; targets come from issue 7.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

from . import ab
from . import scenarios as s
from .harness import BRIDGE, FLOOR, ROOT, Peer, alternate

Row = tuple[str, float | None, float | None, str, str]


def measure(fn: Callable[[Peer], float], reps: int, floor: bool = True) -> tuple[float, float | None]:
    """Median of ``reps`` runs on a warm worker, and on a warm floor loop when ``floor``."""
    results = alternate([Peer(BRIDGE), Peer(FLOOR)] if floor else [Peer(BRIDGE)], fn, reps)
    return statistics.median(results[0]), statistics.median(results[1]) if floor else None


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "MISSED"


def rows(reps: int, scale: float) -> list[Row]:
    def n(x: int) -> int:
        return max(1, int(x * scale))

    out: list[Row] = []

    def ratio_row(name: str, fn: Callable[[Peer], float], target: float, unit: str = "/s") -> None:
        ours, floor = measure(fn, reps)
        ratio = ours / floor
        out.append((f"{name} ({unit})", ours, floor, f"{ratio:.2f}",
                    f">= {target:.0%} of floor: {verdict(ratio, target, True)}" if target else ""))

    seq_ours, seq_floor = measure(lambda p: s.echo_sequential_us(p, n(3000)), reps)
    out.append(("echo, 1 in flight (round trips/s)", 1e6 / seq_ours, 1e6 / seq_floor,
                f"{seq_floor / seq_ours:.2f}", ""))
    out.append(("echo latency, 1 in flight (µs, median)", seq_ours, seq_floor, f"{seq_ours / seq_floor:.2f}",
                f"<= 1.5x floor: {verdict(seq_ours / seq_floor, 1.5, False)}"))
    ratio_row("echo, 100 in flight", lambda p: s.echo_pipelined_per_s(p, n(60_000)), 0.5)
    out.extend(_meta_cost(reps, n(60_000)))
    ratio_row("stream, int chunks", lambda p: s.stream_per_s(p, n(200_000)), 0.5)
    ratio_row("stream, 1 KiB chunks", lambda p: s.stream_per_s(p, n(100_000), 1024), 0.5)
    first, first_floor = measure(lambda p: s.first_chunk_us(p, n(1000)), reps)
    out.append(("time to first chunk (µs, median)", first, first_floor, f"{first / first_floor:.2f}",
                f"<= 1000 µs: {verdict(first, 1000, False)}"))
    ratio_row("tool round trips, 1 in flight", lambda p: s.tool_per_s(p, n(10_000), 1), 0.0)
    ratio_row("tool round trips, 100 in flight", lambda p: s.tool_per_s(p, n(50_000), 100), 0.5)
    ready = statistics.median(s.start_to_ready_ms(BRIDGE) for _ in range(max(reps, 5)))
    ready_floor = statistics.median(s.start_to_ready_ms(FLOOR) for _ in range(max(reps, 5)))
    out.append(("start to ready (ms, median)", ready, ready_floor, f"{ready / ready_floor:.2f}",
                f"<= 150 ms: {verdict(ready, 150, False)}"))
    p50, p99 = _ping_under_load(n(400))
    if p99 is not None:
        out.append(("ping p50 under 4-lane DSPy batch (ms)", p50, None, "", ""))
        out.append(("ping p99 under 4-lane DSPy batch (ms)", p99, None, "", f"<= 5 ms: {verdict(p99, 5, False)}"))
    for name, fn in (("RSS growth over 1M chunks (MB)", lambda p: s.rss_growth_chunks_mb(p, n(1_000_000))),
                     ("RSS growth over 100k tool calls (MB)", lambda p: s.rss_growth_tools_mb(p, n(100_000)))):
        ours, floor = measure(fn, 1)
        out.append((name, ours, floor, "", f"<= 5 MB: {verdict(ours, 5, False)}"))
    return out


def _meta_cost(reps: int, n: int) -> list[Row]:
    """Pipelined echo with ``meta`` against the same build with ``--no-meta`` (issue 8: < 2%).
    The "floor" column holds the ``--no-meta`` figure here."""
    (_, rate, cpu), (_, bare_rate, bare_cpu) = ab.run([ROOT, f"{ROOT}:--no-meta"], "echo", max(reps, 8), n)
    return [("echo, 100 in flight, meta vs --no-meta (/s)", rate, bare_rate, f"{rate / bare_rate:.2f}",
             f">= 98% of --no-meta: {verdict(rate / bare_rate, 0.98, True)}"),
            ("worker CPU per echo, meta vs --no-meta (µs)", cpu, bare_cpu, f"{cpu / bare_cpu:.2f}",
             f"<= 1.02x --no-meta: {verdict(cpu / bare_cpu, 1.02, False)}")]


def _ping_under_load(pings: int) -> tuple[float | None, float | None]:
    peer = Peer(BRIDGE)
    try:
        return s.ping_under_dspy_load_ms(peer, pings)
    except AssertionError as exc:  # no DSPy commands in this build
        print(f"ping under DSPy load: skipped ({exc})", file=sys.stderr)
        return None, None
    finally:
        peer.close()


def lm_rows(reps: int) -> list[Row]:
    """The LM figures (issues 13 and 14).  The "floor" of the first ping row is the idle ping p99 on
    the same worker (this machine's scheduling noise); of the LiteLLM row, the same worker's second
    LiteLLM stream (what the first costs beyond it); of the predict row, the server's latency."""
    out: list[Row] = []
    loaded, idle, first, later, wall, rss = [], [], [], [], [], []
    peer = Peer(BRIDGE)
    try:
        for _ in range(reps):
            idle.append(s.percentile(s._pings(peer, 400, set()), 0.99))
            loaded.append(s.ping_under_streams_ms(peer)[1])
            seconds, mb = s.concurrent_predicts(peer)
            wall.append(seconds)
            rss.append(mb)
    finally:
        peer.close()
    for _ in range(min(reps, 3)):  # a fresh worker each time: its first LiteLLM stream
        fresh = Peer(BRIDGE)
        try:
            first.append(s.ping_during_first_litellm_stream_ms(fresh)[1])
            later.append(s.ping_during_first_litellm_stream_ms(fresh)[1])
        finally:
            fresh.close()
    for name, values, floor in (("ping p99 under 8 dspy.stream + 4-lane batch (ms)", loaded, idle),
                                ("ping p99 during the first LiteLLM stream (ms)", first, later)):
        value, base = statistics.median(values), statistics.median(floor)
        out.append((name, value, base, f"{value / base:.2f}", f"<= 5 ms: {verdict(value, 5, False)}"))
    value = statistics.median(wall)
    out.append(("500 concurrent dspy.predict, 1 s server latency (s)", value, 1.0, f"{value:.2f}",
                f"<= 2 s: {verdict(value, 2, False)}"))
    value = max(rss)
    out.append(("worker RSS after 500 concurrent predicts (MB)", value, None, "", f"<= 300 MB: {verdict(value, 300, False)}"))
    return out


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--reps", type=int, default=5, help="runs per figure; medians are shown")
    parser.add_argument("--quick", action="store_true", help="a tenth of the work, 1 rep: a smoke test")
    parser.add_argument("--lm", action="store_true", help="only the LM figures (local LM server, scripted engine)")
    opts = parser.parse_args(argv)
    reps, scale = (1, 0.1) if opts.quick else (opts.reps, 1.0)
    table = lm_rows(reps) if opts.lm else rows(reps, scale) + lm_rows(reps)
    header = ("figure", "bridge", "floor", "ratio", "target")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *[(r[0], fmt(r[1]), fmt(r[2]), r[3], r[4])
                                                                      for r in table])]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in table:
        cells = (r[0], fmt(r[1]), fmt(r[2]), r[3], r[4])
        print(" | ".join(str(c).ljust(w) for c, w in zip(cells, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
