"""``python -m bench``: every figure for the worker beside the floor loop, in one run.

The table of record drives both from an Erlang VM through a real port
(``bench/port_driver.escript``, targets from issue 18); the second table drives
them from a lean Python host (targets from issue 7).  Each figure is measured
``--reps`` times, alternating the two peers, and the median is shown with the ratio.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import sys
from functools import partial
from typing import Any, Callable

from . import ab
from . import scenarios as s
from .harness import BRIDGE, FLOOR, ROOT, Peer, alternate
from .port import INPROC, Driver, library_peer, pinned_peer, placements, port_peer

Row = tuple[str, float | None, float | None, str, str]


def measure(fn: Callable[[Any], float], reps: int, floor: bool = True,
            spawn: Callable[[list[str]], Any] = Peer) -> tuple[float, float | None]:
    """Median of ``reps`` runs on a warm worker, and on a warm floor loop when ``floor``;
    ``spawn`` makes a peer from an argv (``Peer``: the Python host; ``port_peer``: the BEAM)."""
    results = alternate([spawn(BRIDGE), spawn(FLOOR)] if floor else [spawn(BRIDGE)], fn, reps)
    return statistics.median(results[0]), statistics.median(results[1]) if floor else None


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "MISSED"


def scaler(scale: float) -> Callable[[int], int]:
    return lambda x: max(1, int(x * scale))


def port_rows(reps: int, scale: float) -> list[Row]:
    """The figures of record: both peers behind a real Erlang port, timed from the BEAM's send."""
    n = scaler(scale)
    out: list[Row] = []

    def both(scenario: str, *ints: int, runs: int = reps) -> tuple[float, float]:
        ours, floor = measure(lambda p: p.value(scenario, *ints), runs, spawn=port_peer)
        assert floor is not None
        return ours, floor

    def rate_row(name: str, scenario: str, ints: tuple[int, ...], target: float) -> None:
        ours, floor = both(scenario, *ints)
        out.append((f"{name} (/s)", ours, floor, f"{ours / floor:.2f}",
                    f">= {target:.0%} of floor: {verdict(ours / floor, target, True)}" if target else ""))

    seq, seq_floor = both("echo_seq", n(3000))
    out.append(("echo, 1 in flight (round trips/s)", 1e6 / seq, 1e6 / seq_floor, f"{seq_floor / seq:.2f}", ""))
    out.append(("echo latency, 1 in flight (µs, median)", seq, seq_floor, f"{seq / seq_floor:.2f}",
                f"<= 1.5x floor: {verdict(seq / seq_floor, 1.5, False)}"))
    for where, (vm_cpu, peer_cpu) in placements().items():
        held, held_floor = measure(lambda p: p.value("echo_seq", n(3000)), reps,
                                   spawn=partial(pinned_peer, vm_cpu=vm_cpu, peer_cpu=peer_cpu))
        assert held_floor is not None
        out.append((f"  the same, VM and peer held on {where} (µs, median)", held, held_floor,
                    f"{held / held_floor:.2f}", ""))
    rate_row("echo, 100 in flight", "echo_pipe", (n(60_000), 100), 0.6)
    out.append(_through_the_library(reps, n(60_000)))
    rate_row("stream, int chunks", "stream", (n(200_000), 0), 0.6)
    rate_row("stream, 1 KiB chunks", "stream", (n(100_000), 1024), 0.0)
    first, first_floor = both("first_chunk", n(1000))
    out.append(("time to first chunk (ms, median)", first, first_floor, f"{first / first_floor:.2f}",
                f"<= 1 ms: {verdict(first, 1, False)}"))
    rate_row("tool round trips, 1 in flight", "tool", (n(10_000), 1), 0.0)
    rate_row("tool round trips, 100 in flight", "tool", (n(50_000), 100), 0.6)
    ready, ready_floor = both("start_ready", runs=max(reps, 5))
    out.append(("start to ready (ms, median)", ready, ready_floor, f"{ready / ready_floor:.2f}",
                f"<= 2.5x floor: {verdict(ready / ready_floor, 2.5, False)}"))
    out.extend(_port_ping_under_load(n(1000)))
    out.extend(_dspy_call_overhead(reps, n(1000)))
    return out


def _through_the_library(reps: int, calls: int) -> Row:
    """Echo with 100 callers in flight through ``DSPyBridge.Worker``, against the floor through the escript."""
    worker, floor = alternate([library_peer(BRIDGE), port_peer(FLOOR)], lambda p: p.value("echo_pipe", calls, 100),
                              reps)
    ours, base = statistics.median(worker), statistics.median(floor)
    return ("echo, 100 in flight, through DSPyBridge.Worker (/s)", ours, base, f"{ours / base:.2f}", "")


def _port_ping_under_load(pings: int) -> list[Row]:
    """Ping while 8 ``dspy.stream`` and a 4-lane ``dspy.batch`` run (scripted engine, 1 ms per token)."""
    peer = port_peer(BRIDGE)
    try:
        got = peer.run("ping_load", pings, 8, 4)
    finally:
        peer.close()
    load = f"under 8 streams + 4-lane batch, {got['load_frames_per_s']:,.0f} frames/s"
    return [(f"ping p50 {load} (ms)", got["p50"], None, "", ""),
            (f"ping p99 {load} (ms)", got["p99"], None, "", f"<= 5 ms: {verdict(got['p99'], 5, False)}")]


def _dspy_call_overhead(reps: int, calls: int) -> list[Row]:
    """Sequential ``dspy.predict`` through the port against the same program's ``acall`` in-process,
    with DSPy as a user's process runs it (the target), and with the worker's changes to DSPy's
    per-call path (``bridge.lm.call_path``): the worker's own cost per call.  The "floor" column
    holds the in-process figure."""
    worker, plain, changed = alternate([port_peer(BRIDGE), Driver(INPROC, warm=False),
                                        Driver([*INPROC, "--call-path"], warm=False)],
                                       lambda p: p.value("predict", calls), reps)
    ours = statistics.median(worker)
    base, same = statistics.median(plain), statistics.median(changed)
    return [("dspy.predict, 1 in flight, vs in-process acall (µs/call)", ours, base, f"{ours / base:.2f}",
             f"<= 1.15x in-process: {verdict(ours / base, 1.15, False)}"),
            ("  the same, in-process with the worker's DSPy call path (µs/call)", ours, same, f"{ours / same:.2f}", "")]


def python_rows(reps: int, scale: float) -> list[Row]:
    """The Python-host figures (issue 7): pre-encoded requests written in batches."""
    n = scaler(scale)
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


def print_table(title: str, table: list[Row]) -> None:
    header = ("figure", "bridge", "floor", "ratio", "target")
    cells = [(r[0], fmt(r[1]), fmt(r[2]), r[3], r[4]) for r in table]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells)]
    print(f"\n{title}\n")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for line in cells:
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--reps", type=int, default=5, help="runs per figure; medians are shown")
    parser.add_argument("--quick", action="store_true", help="a tenth of the work, 1 rep: a smoke test")
    parser.add_argument("--host", choices=("both", "port", "python"), default="both",
                        help="port: the table of record (through an Erlang port); python: the Python-host "
                             "table; both (default): the port table, then the Python-host table")
    parser.add_argument("--lm", action="store_true", help="only the LM figures (local LM server, scripted engine)")
    opts = parser.parse_args(argv)
    reps, scale = (1, 0.1) if opts.quick else (opts.reps, 1.0)
    compileall.compile_dir(os.path.join(ROOT, "bridge"), quiet=1)  # start to ready is for compiled bytecode
    if not opts.lm and opts.host in ("both", "port"):
        print_table("Through a real BEAM port (bench/port_driver.escript)", port_rows(reps, scale))
    if not opts.lm and opts.host in ("both", "python"):
        print_table("From a Python host (bench/harness.py)", python_rows(reps, scale))
    if opts.lm or opts.host in ("both", "python"):
        print_table("LM figures from a Python host (tests/lmserver.py, scripted engine)", lm_rows(reps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
