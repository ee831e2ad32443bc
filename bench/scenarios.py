"""One function per figure.  Each takes a ``Peer`` and returns one number."""

from __future__ import annotations

import time

import msgpack

from bridge.wire import framing

from .harness import Peer, median, percentile


def _is_terminal(body: bytes, rid: str) -> bool:
    frame = msgpack.unpackb(body, raw=False)
    return frame.get("id") == rid and frame.get("type") in ("result", "error")


def echo_sequential_us(peer: Peer, n: int = 3000) -> float:
    """Median round-trip latency, one request in flight (µs)."""
    request = peer.request("seq", "echo", {"x": 1})
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        peer.write(request)
        peer.bodies()
        latencies.append(time.perf_counter() - started)
    return median(latencies) * 1e6


def echo_pipelined_per_s(peer: Peer, n: int = 60000, depth: int = 100) -> float:
    """Round trips per second with ``depth`` requests always in flight."""
    requests = [peer.request(i, "echo", {"x": i}) for i in range(n)]
    started = time.perf_counter()
    peer.write(b"".join(requests[:depth]))
    sent, done = min(depth, n), 0
    while done < n:  # exactly n requests, so no reply is left behind for the next scenario
        got = len(peer.bodies())
        done += got
        more = min(got, n - sent)
        if more:
            peer.write(b"".join(requests[sent:sent + more]))
            sent += more
    return n / (time.perf_counter() - started)


def stream_per_s(peer: Peer, n: int = 200_000, size: int | None = None) -> float:
    """Chunks per second of one ``stream_count`` (int chunks, or ``size``-byte chunks)."""
    args = {"n": n} if size is None else {"n": n, "size": size}
    started = time.perf_counter()
    peer.write(peer.request("stream", "stream_count", args))
    count = 0
    while True:
        bodies = peer.bodies()
        count += len(bodies)
        if count >= n + 1 and _is_terminal(bodies[-1], "stream"):
            return n / (time.perf_counter() - started)


def first_chunk_us(peer: Peer, reps: int = 1000) -> float:
    """Median time from writing a stream request to reading its first chunk (µs)."""
    request = peer.request("first", "stream_count", {"n": 1})
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        peer.write(request)
        bodies = peer.bodies()
        samples.append(time.perf_counter() - started)
        if len(bodies) < 2:
            peer.bodies()  # the result frame
    return median(samples) * 1e6


def tool_per_s(peer: Peer, n: int = 20000, concurrency: int = 1) -> float:
    """Host tool round trips per second through ``rpc_loop`` with the host answering."""
    pack = msgpack.Packer(use_bin_type=True).pack
    started = time.perf_counter()
    peer.write(peer.request("rpc", "rpc_loop", {"n": n, "concurrency": concurrency}))
    while True:
        replies = []
        for body in peer.bodies():
            frame = msgpack.unpackb(body, raw=False)
            if frame["type"] == "rpc_request":
                reply = pack({"type": "rpc_response", "rpc_id": frame["rpc_id"], "ok": True,
                              "result": frame["args"][0]})
                replies.append(framing.HEADER.pack(len(reply)) + reply)
            elif frame.get("id") == "rpc" and frame["type"] in ("result", "error"):
                assert frame["type"] == "result", frame
                return n / (time.perf_counter() - started)
        if replies:
            peer.write(b"".join(replies))


def rss_growth_chunks_mb(peer: Peer, n: int = 1_000_000) -> float:
    """RSS growth over ``n`` streamed int chunks, after a warm-up stream (MB)."""
    stream_per_s(peer, 50_000)
    before = peer.rss()
    stream_per_s(peer, n)
    return (peer.rss() - before) / 1e6


def rss_growth_tools_mb(peer: Peer, n: int = 100_000) -> float:
    """RSS growth over ``n`` host tool calls, 100 in flight, after a warm-up (MB)."""
    tool_per_s(peer, 5_000, 100)
    before = peer.rss()
    tool_per_s(peer, n, 100)
    return (peer.rss() - before) / 1e6


def start_to_ready_ms(argv: list[str]) -> float:
    """Process start to the ``ready`` frame, measured at the host (ms)."""
    peer = Peer(argv, warm=False)
    peer.close()
    return peer.ready_ms


def ping_under_dspy_load_ms(peer: Peer, pings: int = 400, threads: int = 4) -> tuple[float, float]:
    """Ping latency p50 and p99 (ms) while a ``threads``-lane DSPy batch (on the loop) runs on the scripted engine."""
    configured = peer.call("lm.configure", {"model": "scripted/bench",
                                            "script": [{"when": {}, "reply": {"answer": "ok"}}]})
    assert configured["type"] == "result", configured
    items = [{"question": f"q{i}"} for i in range(100_000)]
    peer.write(peer.request("batch", "dspy.batch", {"signature": "question -> answer", "items": items,
                                                   "concurrency": threads}))
    _wait_for_chunks(peer, "batch", 2 * threads)  # the batch is under way on every thread
    latencies = []
    for i in range(pings):
        started = time.perf_counter()
        peer.write(peer.request(f"p{i}", "ping"))
        _wait_for_result(peer, f"p{i}")
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.002)
    peer.write(framing.encode({"type": "cancel", "id": "batch"}))
    _wait_for_result(peer, "batch")
    ordered = sorted(latencies)
    return ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]


def _wait_for_chunks(peer: Peer, rid: str, n: int) -> None:
    seen = 0
    while seen < n:
        for body in peer.bodies():
            frame = msgpack.unpackb(body, raw=False)
            if frame.get("id") == rid:
                assert frame["type"] == "chunk", frame
                seen += 1


def _wait_for_result(peer: Peer, rid: str) -> None:
    while True:
        for body in peer.bodies():
            frame = msgpack.unpackb(body, raw=False)
            if frame.get("id") == rid and frame["type"] in ("result", "error"):
                return


def ping_under_streams_ms(peer: Peer, pings: int = 400, streams: int = 8, lanes: int = 4) -> tuple[float, float]:
    """Ping p50 and p99 (ms, from the host's write) while ``streams`` ``dspy.stream`` requests and a
    ``lanes``-lane ``dspy.batch`` run on the scripted engine at 10 ms per token (issue 13)."""
    words = " ".join(f"w{i}" for i in range(400))
    configured = peer.call("lm.configure", {"model": "scripted/bench", "token_delay_ms": 10,
                                            "script": [{"when": {}, "reply": {"answer": words}}]})
    assert configured["type"] == "result", configured
    load = [peer.request(f"s{i}", "dspy.stream", {"signature": "question -> answer", "inputs": {"question": f"{i}"}})
            for i in range(streams)]
    items = [{"question": f"q{i}"} for i in range(10_000)]
    load.append(peer.request("batch", "dspy.batch", {"signature": "question -> answer", "items": items,
                                                     "concurrency": lanes}))
    peer.write(b"".join(load))
    for i in range(streams):
        _wait_for_chunks(peer, f"s{i}", 3)  # every stream is sending tokens
    ended: set[str] = set()
    latencies = _pings(peer, pings, ended)
    ids = [f"s{i}" for i in range(streams)] + ["batch"]
    peer.write(b"".join(framing.encode({"type": "cancel", "id": rid}) for rid in ids))
    _wait_for_ends(peer, set(ids) - ended)
    return percentile(latencies, 0.5), percentile(latencies, 0.99)


def _pings(peer: Peer, n: int, ended: set[str]) -> list[float]:
    """``n`` sequential pings 2 ms apart; each latency (ms) from the write to its result.
    The ids of other requests that end meanwhile go to ``ended``."""
    latencies = []
    for i in range(n):
        rid = f"p{i}"
        started = time.perf_counter()
        peer.write(peer.request(rid, "ping"))
        _wait_for_ends(peer, {rid}, ended)
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.002)
    return latencies


def _wait_for_ends(peer: Peer, pending: set[str], ended: set[str] | None = None) -> None:
    """Read frames until every id in ``pending`` has its terminal frame; note the others in ``ended``."""
    pending = set(pending)
    while pending:
        for body in peer.bodies():
            frame = msgpack.unpackb(body, raw=False)
            if frame.get("type") in ("result", "error"):
                pending.discard(frame.get("id"))
                if ended is not None:
                    ended.add(frame.get("id"))


def concurrent_predicts(peer: Peer, n: int = 500, latency_s: float = 1.0) -> tuple[float, float]:
    """Wall time (s) of ``n`` concurrent ``dspy.predict`` on the default (lm15) engine against the
    local OpenAI-compatible server answering each after ``latency_s``, and the worker's RSS after (MB)."""
    from tests.lmserver import LMServer

    with LMServer() as server:
        server.add("slow", [{"when": {}, "reply": {"answer": "ok"}}], first_byte_ms=latency_s * 1000)
        configured = peer.call("lm.configure", {"model": "openai/slow", "api_base": server.url, "api_key": "sk-bench",
                                                "cache": False, "num_retries": 0})
        assert configured["type"] == "result", configured
        requests = [peer.request(f"c{i}", "dspy.predict", {"signature": "question -> answer",
                                                            "inputs": {"question": f"q{i}"}}) for i in range(n)]
        started = time.perf_counter()
        peer.write(b"".join(requests))
        errors: list[dict] = []
        pending = {f"c{i}" for i in range(n)}
        while pending:
            for body in peer.bodies():
                frame = msgpack.unpackb(body, raw=False)
                if frame.get("id") in pending and frame["type"] in ("result", "error"):
                    pending.discard(frame["id"])
                    if frame["type"] == "error":
                        errors.append(frame)
        wall = time.perf_counter() - started
        assert not errors, errors[0]
        return wall, peer.rss() / 1e6


def ping_during_first_litellm_stream_ms(peer: Peer, tokens: int = 300) -> tuple[float, float]:
    """Ping p50 and p99 (ms) during a LiteLLM stream (10 ms per token from the local server), the
    whole stream long; on a fresh worker, its first, after ``lm.configure`` loaded LiteLLM off the
    loop (issue 14)."""
    from tests.lmserver import LMServer

    with LMServer() as server:
        server.add("tokens", [{"when": {}, "reply": {"answer": " ".join(f"w{i}" for i in range(tokens))}}],
                   token_delay_ms=10)
        configured = peer.call("lm.configure", {"model": "openai/tokens", "api_base": server.url, "engine": "litellm",
                                                "api_key": "sk-bench", "cache": False, "num_retries": 0})
        assert configured["type"] == "result", configured
        peer.write(peer.request("first", "dspy.stream", {"signature": "question -> answer",
                                                         "inputs": {"question": "count"}}))
        ended: set[str] = set()
        latencies: list[float] = []
        while "first" not in ended:  # pings cover the whole stream, its end included
            latencies += _pings(peer, 10, ended)
        return percentile(latencies, 0.5), percentile(latencies, 0.99)
