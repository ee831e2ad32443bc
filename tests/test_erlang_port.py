"""The worker behind a real Erlang port, in both port modes.

``tests/erlang/relay.escript`` opens the worker with
``open_port({spawn_executable, Python}, [{packet,4}, binary, exit_status, use_stdio | nouse_stdio])``
and relays frames between it and this file over its own ``{fd,0,1}`` packet-4
port, so the VM does the framing on the worker's side and msgpack stays here.
Each relay frame starts with a tag byte (the escript's header lists them):
worker frames, ``exit_status``, the worker's OS pid, the ``port_close`` ack and
relay problems come back; frames to forward and ``port_close`` go out.

Without ``erl``/``escript`` these tests skip with the reason; with ``CI`` set
they fail instead, so CI cannot silently lose them.
"""

from __future__ import annotations

import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest

from .conftest import ROOT, TEST_HANDLERS

pytestmark = pytest.mark.erlang

RELAY = Path(__file__).resolve().parent / "erlang" / "relay.escript"
MODES = ["stdio", "nouse_stdio"]
WAIT = 10.0  # the longest any single step may take before the test fails instead of hanging

# Relay -> test tags
T_FRAME, T_EXIT_STATUS, T_OS_PID, T_CLOSED, T_PROBLEM = 0, 1, 2, 3, 4
# Test -> relay tags
C_FRAME, C_PORT_CLOSE = 0, 1

HEADER = struct.Struct(">I")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def escript() -> str:
    missing = [name for name in ("erl", "escript") if shutil.which(name) is None]
    if missing:
        why = (f"{' and '.join(missing)} not found on PATH: the real Erlang port tests need an Erlang VM "
               "(Debian/Ubuntu: apt-get install erlang-base)")
        if _ci():
            pytest.fail(f"CI is set, so these tests must run, but {why}", pytrace=False)
        pytest.skip(why)
    return shutil.which("escript")  # type: ignore[return-value]


class Relay:
    """One escript relay and the worker port inside it."""

    def __init__(self, escript: str, mode: str) -> None:
        self.mode = mode
        argv = [escript, str(RELAY), mode, sys.executable, "-m", "bridge", "serve",
                "--diagnostics", "--handlers", TEST_HANDLERS]
        if mode == "nouse_stdio":
            argv += ["--fds", "3,4"]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # stderr is inherited: the VM's and the worker's logs land in pytest's captured output.
        env["ERL_CRASH_DUMP_SECONDS"] = "0"  # a crashing VM leaves no erl_crash.dump behind
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     cwd=ROOT, bufsize=0)
        os.set_blocking(self.proc.stdin.fileno(), False)  # type: ignore[union-attr]
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="relay-reader", daemon=True)
        self._reader.start()
        self.os_pid: int | None = None
        try:
            self.os_pid = self.expect("os_pid")
            self.ready = self.frame()
            assert self.ready["type"] == "ready", self.ready
            assert self.ready["pid"] == self.os_pid, "the port's os_pid is not the worker's own pid"
        except BaseException:
            self.close()
            raise

    # ---- the wire ------------------------------------------------------------------

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        buf = bytearray()
        while data := os.read(fd, 1 << 20):
            buf += data
            pos = 0
            while len(buf) - pos >= 4:
                (size,) = HEADER.unpack_from(buf, pos)
                if len(buf) - pos - 4 < size:
                    break
                payload = bytes(buf[pos + 4:pos + 4 + size])
                pos += 4 + size
                try:
                    self.events.put(self._event(payload))
                except Exception as exc:  # keep reading: the test sees the problem, not a timeout
                    self.events.put(("garbage", f"{exc!r}: {_short(payload)}"))
            del buf[:pos]
        self.events.put(("eof", bytes(buf)))

    @staticmethod
    def _event(payload: bytes) -> tuple[str, Any]:
        tag, body = payload[0], payload[1:]
        if tag == T_FRAME:
            return "frame", msgpack.unpackb(body, raw=False, strict_map_key=False)
        if tag == T_EXIT_STATUS:
            return "exit_status", struct.unpack(">i", body)[0]
        if tag == T_OS_PID:
            return "os_pid", struct.unpack(">I", body)[0]
        if tag == T_CLOSED:
            return "closed", None
        if tag == T_PROBLEM:
            return "problem", body.decode("utf-8", "replace")
        return "garbage", payload

    def _write(self, payload: bytes, timeout: float = WAIT) -> None:
        """Write one relay frame; a relay that stops reading fails the test instead of hanging it."""
        data = memoryview(HEADER.pack(len(payload)) + payload)
        fd = self.proc.stdin.fileno()  # type: ignore[union-attr]
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        deadline = time.monotonic() + timeout
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"[{self.mode}] the relay stopped reading its input for {timeout:.1f} s")
            if not poller.poll(remaining * 1000):
                continue
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                pass

    def send(self, frame: dict) -> None:
        self._write(bytes([C_FRAME]) + msgpack.packb(frame, use_bin_type=True))

    def request(self, rid: Any, command: str, args: dict | None = None) -> None:
        frame = {"type": "request", "id": rid, "command": command}
        if args is not None:
            frame["args"] = args
        self.send(frame)

    def port_close(self) -> None:
        self._write(bytes([C_PORT_CLOSE]))

    # ---- waiting -------------------------------------------------------------------

    def event(self, timeout: float = WAIT) -> tuple[str, Any]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"[{self.mode}] nothing from the relay within {timeout:.1f} s") from None

    def expect(self, kind: str, timeout: float = WAIT) -> Any:
        got, value = self.event(timeout)
        assert got == kind, f"[{self.mode}] expected {kind}, got {got}: {_short(value)}"
        return value

    def frame(self, timeout: float = WAIT) -> dict:
        return self.expect("frame", timeout)

    def result(self, rid: Any, *, timeout: float = WAIT,
               on_frame: Callable[[dict], None] | None = None) -> Any:
        """Frames until ``rid``'s terminal one (``on_frame`` sees the others); its data, or fail."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.frame(max(deadline - time.monotonic(), 0.001))
            if frame.get("id") == rid and frame["type"] in ("result", "error"):
                assert frame["type"] == "result", f"[{self.mode}] request {rid!r} failed: {frame}"
                return frame.get("data")
            assert on_frame is not None, f"[{self.mode}] unexpected frame: {_short(frame)}"
            on_frame(frame)

    def call(self, rid: Any, command: str, args: dict | None = None, **kw: Any) -> Any:
        self.request(rid, command, args)
        return self.result(rid, **kw)

    # ---- teardown ------------------------------------------------------------------

    def close(self) -> bool:
        """End the relay (EOF on its input halts the VM); True if the worker had to be killed."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)
        self._reader.join(WAIT)
        if self.os_pid is not None and wait_gone(self.os_pid, WAIT) is None:
            os.kill(self.os_pid, signal.SIGKILL)
            return True
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "..."


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie left for its parent (the VM's forker) to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until ``pid`` is gone, polling every 0.5 ms; None if it outlives ``timeout``."""
    start = time.monotonic()
    while not process_gone(pid):
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.0005)
    return time.monotonic() - start


@pytest.fixture(params=MODES)
def relay(request, escript):
    r = Relay(escript, request.param)
    yield r
    leaked = r.close()
    assert not leaked, f"[{r.mode}] the worker outlived its Erlang VM and had to be killed"


# ---- tests -----------------------------------------------------------------------------


def test_ping(relay):
    data = relay.call(1, "ping")
    assert data["pong"] is True
    assert "stream_count" in relay.ready["commands"]


def test_stream_100k_chunks(relay):
    n = 100_000
    relay.request("s", "stream_count", {"n": n})
    seen = 0

    def chunk(frame: dict) -> None:
        nonlocal seen
        assert frame["type"] == "chunk" and frame["id"] == "s", _short(frame)
        assert frame["seq"] == seen and frame["data"] == seen, _short(frame)
        seen += 1

    relay.result("s", on_frame=chunk, timeout=20)
    assert seen == n


@pytest.mark.parametrize("n,concurrency", [(500, 1), (3000, 64)])
def test_tool_round_trips(relay, n, concurrency):
    asked: list[int] = []

    def answer(frame: dict) -> None:
        assert frame["type"] == "rpc_request" and frame["id"] == "r", _short(frame)
        assert frame["tool"] == "echo" and frame["kwargs"] == {}, _short(frame)
        asked.append(frame["args"][0])
        relay.send({"type": "rpc_response", "rpc_id": frame["rpc_id"], "ok": True, "result": frame["args"][0]})

    relay.request("r", "rpc_loop", {"n": n, "concurrency": concurrency})
    data = relay.result("r", on_frame=answer, timeout=20)
    assert data["n"] == n
    assert sorted(asked) == list(range(n))


def test_tool_error_answer(relay):
    relay.request("t", "test.tool", {"tool": "lookup", "args": ["x"]})
    ask = relay.frame()
    assert ask["type"] == "rpc_request" and ask["tool"] == "lookup" and ask["args"] == ["x"], ask
    relay.send({"type": "rpc_response", "rpc_id": ask["rpc_id"], "ok": False,
                "error": {"type": "not_found", "message": "no such key"}})
    err = relay.frame()
    assert err["type"] == "error" and err["id"] == "t", err
    assert "no such key" in err["error"]["message"]


def test_echo_20_mib(relay):
    blob = os.urandom(20 * 1024 * 1024)
    data = relay.call("big", "echo", {"b": blob})
    assert isinstance(data["b"], bytes) and data["b"] == blob
    assert relay.call("after", "ping")["pong"] is True


def test_port_close_while_busy_in_a_thread(relay):
    relay.request("zz", "sleep", {"seconds": 30})
    assert relay.call("p", "ping")["pong"] is True  # the sleep request has been dispatched
    time.sleep(0.05)  # and its thread is in time.sleep
    assert not process_gone(relay.os_pid)
    start = time.monotonic()
    relay.port_close()
    gone = wait_gone(relay.os_pid, 5.0)
    elapsed = time.monotonic() - start
    assert gone is not None, f"[{relay.mode}] worker {relay.os_pid} still alive 5 s after port_close"
    assert elapsed < 0.2, f"[{relay.mode}] worker took {elapsed * 1000:.0f} ms to exit after port_close"
    assert relay.expect("closed") is None  # port_close returned; nothing else came first


def test_exit_status_after_crash(relay):
    relay.request("c", "test.crash", {"code": 3})
    assert relay.expect("exit_status") == 3
    assert wait_gone(relay.os_pid, 2.0) is not None


def test_exit_status_after_shutdown(relay):
    relay.send({"type": "shutdown"})
    assert relay.expect("exit_status") == 0


def test_print_does_not_hang_the_port(relay):
    assert relay.call("pr", "test.print") == {"printed": True}
    assert relay.call("p", "ping", timeout=5)["pong"] is True
