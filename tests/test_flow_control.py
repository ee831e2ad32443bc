"""Credit-based flow control and backpressure, through the worker process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bridge import RemoteError
from bridge.wire import framing
from tests.conftest import ROOT, spawn


def test_window_bounds_unacknowledged_chunks():
    with spawn() as w:
        call = w.request("stream_count", {"n": 200}, window=10)
        received = granted = 0
        for seq in call.chunks():
            received += 1
            assert received - granted <= 10
            if received % 5 == 0:  # acknowledge in batches, as a GenStage consumer would
                assert w.call("ping")["pong"]  # the worker's loop ran meanwhile: it could have overrun
                if received < 190:  # (near the end the result frame is queued too)
                    assert call._queue.qsize() <= 10 - (received - granted)  # nothing beyond the window
                w.send({"type": "credit", "id": call.id, "n": 5})
                granted += 5
        assert received == 200 and call.result() is None


def test_a_stalled_window_suspends_the_generator():
    with spawn() as w:
        call = w.request("stream_count", {"n": 1000}, window=3)
        chunks = call.chunks()
        assert [next(chunks) for _ in range(3)] == [0, 1, 2]
        assert w.call("ping")["pong"]  # the loop is not blocked, and it ran the generator meanwhile
        assert call._queue.empty()  # suspended: nothing beyond the window was produced
        w.send({"type": "credit", "id": call.id, "n": 1000})
        assert list(chunks)[-1] == 999


def test_cancel_while_waiting_for_credit():
    with spawn() as w:
        call = w.request("stream_count", {"n": 100}, window=1)
        next(call.chunks())
        call.cancel()
        assert [f["type"] for f in call.frames][-1] == "chunk"
        with pytest.raises(RemoteError) as info:
            call.result()
        assert info.value.type == "cancelled"
        assert [f["type"] for f in call.frames].count("chunk") == 1  # none past the window, none after cancel
        assert w.call("stats")["in_flight"] == 0


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


def wait_until_warm(proc: subprocess.Popen, decoder: framing.Decoder) -> None:
    """A DSPy command waits for the warm-up: its reply says the warm-up is over."""
    proc.stdin.write(framing.encode({"type": "request", "id": "warm", "command": "lm.configure",
                                     "args": {"model": "scripted/demo", "script": []}}))
    proc.stdin.flush()
    frames: list = []
    while not frames:
        frames = [e.body for e in decoder.feed(os.read(proc.stdout.fileno(), 65536))]
    assert frames[-1]["id"] == "warm" and frames[-1]["type"] == "result", frames


def test_a_stalled_host_does_not_grow_the_worker():
    """The host stops reading; the worker must stop producing, not buffer 1 GB of chunks."""
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "serve", "--diagnostics"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        decoder = framing.Decoder(max_frame_bytes=2**32 - 1)
        assert decoder.feed(os.read(proc.stdout.fileno(), 65536))[0].body["type"] == "ready"
        wait_until_warm(proc, decoder)  # the background DSPy import would count as growth
        proc.stdin.write(framing.encode({"type": "request", "id": 1, "command": "stream_count",
                                         "args": {"n": 1_000_000, "size": 1024}}))
        proc.stdin.flush()
        time.sleep(0.5)
        before = rss_of(proc.pid)
        time.sleep(1.0)
        grown = rss_of(proc.pid) - before
        assert grown < 2 * 1024 * 1024, f"RSS grew by {grown} bytes while the host was stalled"
        # ... and the stream resumes once the host reads again
        seen = 0
        deadline = time.time() + 10
        while seen < 5000 and time.time() < deadline:
            seen += sum(1 for e in decoder.feed(os.read(proc.stdout.fileno(), 1 << 20))
                        if e.body.get("type") == "chunk")
        assert seen >= 5000
    finally:
        proc.kill()
        proc.wait()
