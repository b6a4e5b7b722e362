"""A local worker process: a stand-in for one warm Lambda sandbox.

Started by the host as `python -m lambdafutures_handler.local_worker FD TIMEOUT`, it reads
invoke events from the socket FD and runs each through `worker.handle`, one at a time, for
as long as the host keeps the socket open. Frames on the socket are a 4-byte big-endian
length and a JSON body.

Worker -> host frames are {"completion": message or null, "idle": bool}. A completion sent
by `handle` itself rides on the frame that also says the worker is idle again; a completion
sent from another thread (the timeout watchdog) goes out at once with idle false.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import sys
import threading
import time
import uuid

from . import transport
from .worker import handle

_HEADER = struct.Struct("!I")
# One recv takes whatever frames have arrived, up to this much (below malloc's mmap threshold).
_READ_SIZE = 64 * 1024


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(_HEADER.pack(len(body)) + body)


def recv_frame(sock: socket.socket) -> bytes | None:
    """The next frame's body, or None once the peer has closed the socket."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    body = _recv_exactly(sock, size)
    if body is None:
        return None
    return body


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            return None
        received += count
    return bytes(buffer)


class _FrameReader:
    """Frames from a socket, taking with one recv as many as have arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def next(self) -> bytes | None:
        """The next frame's body, or None once the peer has closed the socket."""
        buffer = self._buffer
        while True:
            if len(buffer) >= _HEADER.size:
                end = _HEADER.size + _HEADER.unpack_from(buffer)[0]
                if len(buffer) >= end:
                    body = bytes(buffer[_HEADER.size:end])
                    del buffer[:end]
                    return body
            chunk = self._sock.recv(_READ_SIZE)
            if not chunk:
                return None
            buffer += chunk


# The environment is the sandbox's configuration: it is fixed when the process starts.
_FUNCTION_NAME = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "lambdafutures-local")
_MEMORY = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
# Request ids are unique like Lambda's (a random per-process part and a counter) without
# costing a uuid4 per event.
_REQUEST_PREFIX = uuid.uuid4().hex[:20]
_requests = itertools.count()


class LocalContext:
    """The parts of Lambda's context object the worker uses."""

    def __init__(self, timeout: float | None) -> None:
        self.aws_request_id = f"{_REQUEST_PREFIX}{next(_requests):012x}"
        self.function_name = _FUNCTION_NAME
        self.memory_limit_in_mb = int(_MEMORY) if _MEMORY else None
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def get_remaining_time_in_millis(self) -> int | None:
        # Unlike Lambda, a local sandbox may run without a time limit: None says so.
        if self._deadline is None:
            return None
        return int((self._deadline - time.monotonic()) * 1000)


def serve(sock: socket.socket, timeout: float | None) -> None:
    send_lock = threading.Lock()
    loop_thread = threading.current_thread()
    outbox: list[dict] = []

    def reply(message: dict) -> None:
        if threading.current_thread() is loop_thread:
            outbox.append(message)
            return
        with send_lock:
            send_frame(sock, json.dumps({"completion": message, "idle": False}).encode())

    transport.set_local_reply(reply)
    frames = _FrameReader(sock)
    while True:
        body = frames.next()
        if body is None:
            return
        frame: dict = {"idle": True}
        try:
            handle(json.loads(body), LocalContext(timeout))
        except Exception as exc:  # noqa: BLE001 - Lambda would record it as a function error
            frame["handler_error"] = {"type": type(exc).__name__, "message": str(exc)}
        frame["completion"] = outbox.pop() if outbox else None
        with send_lock:
            send_frame(sock, json.dumps(frame).encode())


def main(argv: list[str]) -> None:
    fd = int(argv[1])
    timeout = float(argv[2]) if len(argv) > 2 and argv[2] != "none" else None
    sock = socket.socket(fileno=fd)
    try:
        serve(sock, timeout)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the host went away; a sandbox without a host has nothing left to do


if __name__ == "__main__":
    main(sys.argv)
