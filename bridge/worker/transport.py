"""Non-blocking frame I/O on raw descriptors: the only place that reads or writes the wire.

The writer coalesces: frames queue in one bytearray and a single writer task
flushes whatever has accumulated with one ``write`` call, so a burst of chunks or
a pipelined batch of replies costs one syscall instead of one per frame.  The
buffer is bounded: past ``high_water`` producers wait for it to drain, which is
how a stalled host pushes back all the way to the handlers.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import time
from typing import Any, Awaitable, Callable

import anyio
import anyio.lowlevel

from bridge.wire import framing, protocol
from bridge.wire.redact import KEYLESS, by_name, holds_secret, redact

READ_SIZE = 256 * 1024
HIGH_WATER = 1024 * 1024
EAGER_BYTES = 512  # pending output written at once, so the host starts on it while we go on
F_SETPIPE_SZ = 1031


def _decoded(data: bytes) -> Any:
    """An encoded frame's map again, for the tap."""
    return framing.unpack_body(data[framing.HEADER.size:]).body


def prepare_fd(fd: int, pipe_size: int = 1024 * 1024) -> None:
    """Make ``fd`` non-blocking and, for pipes, widen the kernel buffer (fewer wake-ups)."""
    os.set_blocking(fd, False)
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, pipe_size)
    except OSError:
        pass  # not a pipe, or over /proc/sys/fs/pipe-max-size: the default is fine


def peer_closed(fd: int) -> bool:
    """True when the reading end of our output pipe is gone (Erlang ``port_close``)."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


class Reader:
    """Reads the input descriptor from the loop's readiness callback and hands each read to ``on_data``.

    The read is handled inside the callback: no future, no task step and no second
    pass of the loop between the wake-up and the reply.  Each read is one loop
    callback, so handlers' tasks run between reads.  Reads go into one preallocated
    buffer (no allocation per read).  The descriptor stays registered while reading
    goes on (no ``epoll_ctl`` per request).
    """

    def __init__(self, fd: int, on_data: Callable[[memoryview], bool], size: int = READ_SIZE) -> None:
        self.fd = fd
        self.on_data = on_data  # one read's bytes (empty at EOF), valid during the call; False: pause
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[bool] | None = None

    async def run(self, drained: Callable[[], Awaitable[None]]) -> None:
        """Read until EOF.  When ``on_data`` asks for a pause, reading stops until ``drained()`` returns."""
        self._loop = loop = asyncio.get_running_loop()
        while True:
            self._stop = loop.create_future()
            try:
                loop.add_reader(self.fd, self._on_readable)
            except PermissionError:  # a regular file (or /dev/null): always readable, never polled
                more = await self._read_unpolled()
            else:
                try:
                    more = await self._stop
                finally:
                    loop.remove_reader(self.fd)
            if not more:
                return
            await drained()

    def _on_readable(self) -> None:
        if self._stop.done():  # type: ignore[union-attr]  # the reading task was cancelled in this pass
            self._loop.remove_reader(self.fd)  # type: ignore[union-attr]
            return
        try:
            status = self._read_once()
        except BaseException as exc:  # a bug in ``on_data``: the reading task raises it
            status = exc
        if status is not READING:
            self._loop.remove_reader(self.fd)  # type: ignore[union-attr]
            if isinstance(status, BaseException):
                self._stop.set_exception(status)  # type: ignore[union-attr]
            else:
                self._stop.set_result(status is PAUSED)  # type: ignore[union-attr]

    async def _read_unpolled(self) -> bool:
        while (status := self._read_once()) is READING:
            await anyio.lowlevel.checkpoint()
        return status is PAUSED

    def _read_once(self) -> object:
        try:
            n = os.readv(self.fd, (self._buf,))
        except BlockingIOError:
            return READING
        except OSError:
            n = 0
        with self._view[:n] as data:
            go_on = self.on_data(data)
        if not n:
            return ENDED
        return READING if go_on else PAUSED


READING, PAUSED, ENDED = object(), object(), object()  # what a read leaves the reader doing


class FrameWriter:
    """Bounded, coalescing frame writer owned by one writer task (``run``)."""

    def __init__(self, fd: int, high_water: int = HIGH_WATER) -> None:
        self.fd = fd
        self.high_water = high_water
        self.frames_out = 0
        self.bytes_out = 0
        self.broken = anyio.Event()
        self.dead = False  # ``broken.is_set()`` as a plain attribute: read for every frame
        self.tap: Any = None  # optional callable(frame) observing every frame sent
        self._buf = bytearray()
        self._wake = anyio.Event()
        self._drained = anyio.Event()
        self._scheduled = False
        self._corked = False

    def send(self, frame: dict, extra: bytes = b"", named: bool = False) -> int:
        """Queue one frame (plus ``extra``, a packed key and value: see ``framing.encode``);
        returns its encoded size.  Never blocks.  Secrets are redacted here (``wire.redact``).

        ``named``: the caller has already redacted by name every part of ``frame`` it did not
        build itself (its own keys name no secret), so only the by-value scan of the bytes is left.
        """
        data = framing.encode(frame, extra)
        hidden = frame if named and not holds_secret(data) else redact(frame, data)
        if hidden is not frame:
            frame, data = hidden, framing.encode(hidden, extra)
        if self.tap is not None and not self.dead:
            self.tap(_decoded(data) if extra else frame)
        return self._append(data, 1)

    def send_chunk(self, prefix: bytes, rid: Any, seq: int, data: Any) -> int:
        """Queue one ``chunk`` frame (``prefix``: ``framing.chunk_prefix(rid)``); returns its size.

        The streams' hot path: two values packed, and only ``data`` walked for secret-named
        keys, since the frame's own keys name none.  A chunk in which a known secret occurs,
        or whose data needs redacting, goes through ``send`` like any frame."""
        encoded = framing.encode_chunk(prefix, seq, data)
        if holds_secret(encoded) or (type(data) not in KEYLESS and by_name(data, 1) is not data):
            return self.send(protocol.chunk(rid, seq, data))
        if self.tap is not None and not self.dead:
            self.tap(protocol.chunk(rid, seq, data))
        return self._append(encoded, 1)

    def send_encoded(self, frames: list[bytes]) -> int:
        """Queue frames that are already encoded, in one append (a group of replies); their
        producer has redacted them (``Responder.flush``)."""
        if self.tap is not None and not self.dead:
            for data in frames:
                self.tap(_decoded(data))
        return self._append(b"".join(frames), len(frames))

    def _append(self, data: bytes, frames: int) -> int:
        if self.dead:
            return len(data)
        self._buf += data
        self.frames_out += frames
        self.bytes_out += len(data)
        if len(self._buf) >= EAGER_BYTES:
            self._write_now()
        if not self._corked and self._buf and not self._scheduled:
            self._scheduled = True
            self._wake.set()
        return len(data)

    def _write_now(self) -> None:
        buf = self._buf
        try:
            del buf[:os.write(self.fd, buf)]
        except BlockingIOError:
            pass
        except OSError:
            self._break()

    def cork(self) -> None:
        """Hold frames back while the reader handles a read, so its replies go out in few writes
        (one per ``EAGER_BYTES``: the host starts on the first ones while we go on)."""
        self._corked = True

    def uncork(self) -> None:
        """Write what the batch produced now, from the caller; the writer task gets any rest."""
        self._corked = False
        buf = self._buf
        if buf and not self.dead:
            self._write_now()
        if buf and not self._scheduled:
            self._scheduled = True
            self._wake.set()

    @property
    def congested(self) -> bool:
        return len(self._buf) > self.high_water

    async def wait_drained(self) -> None:
        """Wait until the buffer is back under the high-water mark."""
        while self.congested and not self.dead:
            await self._drained.wait()

    async def run(self) -> None:
        """The writer task: flush whatever accumulated each time it is woken."""
        while not self.dead:
            await self._wake.wait()
            self._wake = anyio.Event()
            self._scheduled = False
            await self._flush()

    async def _flush(self) -> None:
        buf = self._buf
        while buf:
            try:
                n = os.write(self.fd, buf)
            except BlockingIOError:
                await anyio.wait_writable(self.fd)
                continue
            except OSError:
                self._break()
                return
            del buf[:n]
            if len(buf) <= self.high_water and not self._drained.is_set():
                self._drained.set()
                self._drained = anyio.Event()

    def _break(self) -> None:
        self._buf.clear()
        self.dead = True
        self.broken.set()
        self._drained.set()

    def flush_blocking(self, timeout: float) -> None:
        """Write out what is left at exit, waiting at most ``timeout`` for a slow host."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        buf = self._buf
        while buf and not self.dead:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                n = os.write(self.fd, buf)
            except BlockingIOError:
                poller.poll(remaining * 1000)
                continue
            except OSError:
                self._break()
                return
            del buf[:n]
