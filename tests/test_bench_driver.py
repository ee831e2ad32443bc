"""The port bench's escript: its msgpack codec against Python's, and its scenarios end to end.

``bench/port_driver.escript codec`` decodes each packet-4 frame into Erlang
terms and encodes it again; what comes back must be the same msgpack value
(and, where there is no map whose key order may differ, the same bytes).
The scenarios run with tiny counts: these tests check that each one finishes
and reports a number, not how fast it is.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

import msgpack
import pytest

from bench.port import DRIVER, pinned_peer, placements, port_peer

from .conftest import ROOT
from .test_erlang_port import escript  # noqa: F401  (the fixture: skip, or fail under CI, without Erlang)

pytestmark = pytest.mark.erlang

HEADER = struct.Struct(">I")

SCALARS = [None, True, False, 0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
           -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63, 1.5, -2.25e300, 1e-300]
SIZED = [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536]


def values() -> list:
    out: list = list(SCALARS)
    out += ["é" * (n // 2) + "x" * (n % 2) for n in SIZED]  # str8/16/32 by byte length
    out += [os.urandom(n) for n in SIZED]
    out += [list(range(n)) for n in SIZED]
    out.append({"type": "request", "id": 7, "args": {"nested": [1, {"k": b"\x00\xff"}], 3: None}})
    out += [{f"k{i}": i for i in range(n)} for n in (0, 15, 16, 70_000)]
    return out


@pytest.fixture(scope="module")
def codec(escript):  # noqa: F811
    proc = subprocess.Popen([escript, DRIVER, "codec"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield proc
    proc.stdin.close()
    assert proc.wait(10) == 0


def roundtrip(proc: subprocess.Popen, body: bytes) -> bytes:
    proc.stdin.write(HEADER.pack(len(body)) + body)
    proc.stdin.flush()
    (size,) = HEADER.unpack(proc.stdout.read(4))
    return proc.stdout.read(size)


@pytest.mark.parametrize("value", values(), ids=lambda v: type(v).__name__)
def test_codec_roundtrip(codec, value):
    sent = msgpack.packb(value, use_bin_type=True)
    back = roundtrip(codec, sent)
    assert msgpack.unpackb(back, raw=False, strict_map_key=False) == value
    if not isinstance(value, dict):
        assert back == sent  # the same, smallest encoding Python's packer chose


def test_codec_reads_float32(codec):
    back = roundtrip(codec, msgpack.packb(0.5, use_single_float=True))
    assert msgpack.unpackb(back) == 0.5


def test_scenarios_on_the_floor(escript):  # noqa: F811
    peer = port_peer([sys.executable, "-m", "bench.floor"], root=str(ROOT))
    try:
        assert peer.ready_ms > 0 and peer.pid != os.getpid()
        for scenario, ints in (("echo_seq", (20,)), ("echo_pipe", (500, 100)), ("stream", (500, 0)),
                               ("stream", (50, 1024)), ("first_chunk", (5,)), ("tool", (50, 1)),
                               ("tool", (500, 100)), ("start_ready", ())):
            value = peer.value(scenario, *ints)
            assert math.isfinite(value) and value > 0, (scenario, value)
    finally:
        peer.close()


def test_dspy_scenarios_on_the_worker(escript):  # noqa: F811
    peer = port_peer([sys.executable, "-m", "bridge", "serve", "--diagnostics"], root=str(ROOT))
    try:
        assert peer.value("predict", 3) > 0
        got = peer.run("ping_load", 20, 2, 2)
        assert 0 < got["p50"] <= got["p99"] and got["load_frames_per_s"] > 0, got
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def test_a_pinned_peer_holds_the_vm_and_the_peer_to_their_cpus(escript):  # noqa: F811
    if "two CPUs" not in placements():
        pytest.skip("needs taskset and two CPUs")
    vm_cpu, peer_cpu = placements()["two CPUs"]
    peer = pinned_peer([sys.executable, "-m", "bench.floor"], vm_cpu, peer_cpu)
    try:
        assert os.sched_getaffinity(peer.proc.pid) == {vm_cpu}  # taskset execs the VM in its place
        assert os.sched_getaffinity(peer.pid) == {peer_cpu} and peer.pid != peer.proc.pid
        assert peer.value("echo_seq", 20) > 0
    finally:
        peer.close()
