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


class LocalContext:
    """The parts of Lambda's context object the worker uses."""

    def __init__(self, timeout: float | None) -> None:
        self.aws_request_id = uuid.uuid4().hex
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "lambdafutures-local")
        memory = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self.memory_limit_in_mb = int(memory) if memory else None
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
    while True:
        body = recv_frame(sock)
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
