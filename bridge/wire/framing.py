"""Sans-I/O framing: Erlang ``{packet, 4}`` frames holding one msgpack map each.

Bytes go in, typed events come out; frames go in, bytes come out.  Nothing here
touches a descriptor, so every edge case (cut frames, oversize lengths, garbage)
is testable without a process or an event loop.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import msgpack

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024
COPY_BYTES = 4096  # bodies up to this size are decoded from a copy, larger ones in place

_packer = msgpack.Packer(use_bin_type=True, autoreset=True)
_new_tuple = tuple.__new__


class Frame(NamedTuple):
    """A well-formed frame: one decoded msgpack map (``raw``: its body bytes, when kept)."""

    body: dict
    raw: bytes | None = None


class BadFrame(NamedTuple):
    """A frame the peer got wrong; ``reason`` says how.  The stream stays in sync."""

    reason: str
    size: int
    raw: bytes | None = None


class FrameTooLarge(NamedTuple):
    """A length over the limit.  Its body is skipped, not buffered."""

    size: int
    limit: int
    header: bytes = b""  # the four length bytes: JSON text sent by mistake shows here


class Truncated(NamedTuple):
    """End of input in the middle of a frame."""

    have: int
    want: int
    raw: bytes | None = None


Event = Frame | BadFrame | FrameTooLarge | Truncated


_FIXMAP = [bytes((i,)) for i in range(256)]


def encode(obj: Any, extra: bytes = b"") -> bytes:
    """One frame: length header plus msgpack body (``use_bin_type`` keeps bytes as bytes).

    ``extra`` is one more key and value of the map, already packed (a terminal frame's
    ``meta``); ``obj`` must then have fewer than 15 keys (a msgpack fixmap).
    """
    body = _packer.pack(obj)
    if extra:
        return b"".join((HEADER.pack(len(body) + len(extra)), _FIXMAP[body[0] + 1], memoryview(body)[1:], extra))
    return HEADER.pack(len(body)) + body


def result_prefix(meta: bytes | None) -> bytes:
    """The constant start of a ``result`` frame's body, up to its ``id`` value: the type and,
    when given, ``meta`` (already msgpack).  Built once per group of replies."""
    if meta is None:
        return b"\x83" + _RESULT_TYPE + _ID_KEY
    return b"\x84" + _RESULT_TYPE + META_KEY + meta + _ID_KEY


def encode_result(prefix: bytes, rid: Any, data: Any) -> bytes:
    """A ``result`` frame from ``result_prefix``: the replies' hot path.  Packing only the id
    and the data is cheaper than packing the whole map, constant keys included."""
    body = prefix + _packer.pack(rid) + _DATA_KEY + _packer.pack(data)
    return HEADER.pack(len(body)) + body


def chunk_prefix(rid: Any) -> bytes:
    """The constant start of a request's ``chunk`` frames' bodies, up to the ``seq`` value."""
    return b"\x84" + _CHUNK_TYPE + _ID_KEY + _packer.pack(rid) + _SEQ_KEY


def encode_chunk(prefix: bytes, seq: int, data: Any) -> bytes:
    """A ``chunk`` frame from ``chunk_prefix``: the streams' hot path (two values packed per chunk)."""
    body = b"".join((prefix, _packer.pack(seq), _DATA_KEY, _packer.pack(data)))
    return HEADER.pack(len(body)) + body


_RESULT_TYPE = msgpack.packb("type") + msgpack.packb("result")
_CHUNK_TYPE, _SEQ_KEY = msgpack.packb("type") + msgpack.packb("chunk"), msgpack.packb("seq")
META_KEY, _ID_KEY, _DATA_KEY = msgpack.packb("meta"), msgpack.packb("id"), msgpack.packb("data")


def unpack_body(body: bytes | memoryview) -> Frame | BadFrame:
    """Decode one frame body; anything but exactly one map is a ``BadFrame``."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.ExtraData:
        return BadFrame("more than one msgpack object in the frame", len(body))
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        return BadFrame(f"invalid msgpack: {exc}", len(body))
    if not isinstance(obj, dict):
        return BadFrame(f"frame is a {type(obj).__name__}, not a map", len(body))
    return _new_tuple(Frame, (obj, None))  # not ``Frame(obj)``: a NamedTuple's ``__new__`` is a Python call


JSON_HINT = "this looks like JSON, not a frame; pipe JSON lines through `bridge encode` first"


def looks_like_json(header: bytes) -> bool:
    """Four length bytes that are the start of a JSON object or array (``{"ty``, ``[{"``)."""
    return header[:2] in (b'{"', b"[{", b'["')


def describe(event: Event) -> str:
    """A bad frame event in plain words, for error frames and ``bridge decode``."""
    if isinstance(event, BadFrame):
        return f"{event.reason} ({event.size} bytes)"
    if isinstance(event, FrameTooLarge):
        text = f"frame of {event.size} bytes exceeds --max-frame-bytes={event.limit}; it was skipped"
        return f"{text}; {JSON_HINT}" if looks_like_json(event.header) else text
    if isinstance(event, Truncated):
        return f"input ended inside a frame ({event.have} of {event.want} bytes)"
    return "a frame"


class Decoder:
    """Incremental decoder: ``feed`` any cut of the byte stream, get whole-frame events.

    ``keep_raw`` attaches each frame's bytes to its event, for byte-faithful
    transcripts; off, the hot path pays one branch per frame.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, keep_raw: bool = False) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.keep_raw = keep_raw
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversize body still to discard

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; return the events of every frame it completes."""
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos, end = 0, len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(buf, pos)
                if size > self.max_frame_bytes:
                    events.append(FrameTooLarge(size, self.max_frame_bytes, bytes(buf[pos:pos + 4])))
                    available = end - pos - 4
                    pos += 4 + min(size, available)
                    self._skip = size - min(size, available)
                    continue
                if end - pos - 4 < size:
                    break
                start = pos + 4
                # a small body as a copy: msgpack takes a memoryview's buffer at about 0.4 µs more
                event = unpack_body(buf[start:start + size] if size <= COPY_BYTES else view[start:start + size])
                if self.keep_raw:  # a copy: no view may outlive this call (the buffer is resized)
                    event = event._replace(raw=bytes(view[start:start + size]))
                events.append(event)
                pos += 4 + size
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return events

    def close(self) -> list[Event]:
        """Signal end of input: a partial frame left over becomes ``Truncated``."""
        if self._skip:
            skipped, self._skip = self._skip, 0
            return [Truncated(0, skipped)]
        if not self._buf:
            return []
        have = len(self._buf)
        want = HEADER.unpack_from(self._buf)[0] + 4 if have >= 4 else 4
        raw = bytes(self._buf) if self.keep_raw else None
        self._buf.clear()
        return [Truncated(have, want, raw)]
