"""The floor: the simplest synchronous framed loop a Python worker can be.

Read 4 bytes, read the body, unpack, handle, pack, write, flush, in a plain
``while`` loop.  It serves the same diagnostic commands as ``bridge --diagnostics``
so every benchmark can run against both in the same session.
"""

from __future__ import annotations

import os
import struct
import sys

import msgpack

HEADER = struct.Struct(">I")


def main() -> None:
    inp = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    pack = msgpack.Packer(use_bin_type=True).pack

    def send(frame: dict) -> None:
        body = pack(frame)
        out.write(HEADER.pack(len(body)) + body)
        out.flush()

    def receive() -> dict | None:
        header = inp.read(4)
        if len(header) < 4:
            return None
        return msgpack.unpackb(inp.read(HEADER.unpack(header)[0]), raw=False)

    send({"type": "ready", "protocol": 1, "pid": os.getpid()})
    while (frame := receive()) is not None:
        rid, command, args = frame.get("id"), frame.get("command"), frame.get("args") or {}
        if command == "ping":
            send({"type": "result", "id": rid, "data": {"pong": True}})
        elif command == "echo":
            send({"type": "result", "id": rid, "data": args})
        elif command == "stream_count":
            payload = bytes(args["size"]) if "size" in args else None
            for i in range(args["n"]):
                send({"type": "chunk", "id": rid, "seq": i, "data": i if payload is None else payload})
            send({"type": "result", "id": rid, "data": None})
        elif command == "rpc_loop":
            n, lanes = args["n"], args.get("concurrency", 1)
            sent = answered = 0
            while answered < n:
                while sent < n and sent - answered < lanes:
                    send({"type": "rpc_request", "rpc_id": sent, "id": rid, "tool": "echo", "args": [sent],
                          "kwargs": {}})
                    sent += 1
                reply = receive()
                if reply is None:
                    return
                answered += 1
            send({"type": "result", "id": rid, "data": {"n": n}})


if __name__ == "__main__":
    sys.exit(main())
