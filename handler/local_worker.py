"""A local worker process: a stand-in for one warm Lambda sandbox.

Started by the host as `python -m lambdafutures_handler.local_worker FD TIMEOUT [CLAIMS]`, it
reads invoke events from the socket FD and runs each through `worker.handle`, one at a time,
for as long as the host keeps the socket open. Worker -> host frames are a 4-byte big-endian
length and a JSON body; host -> worker frames carry an 8-byte claim number after the length
and the event pickled: this worker runs whatever its host sends anyway, and unpickling the
event costs a third of parsing it as JSON (the event itself is still JSON's kind of data).

A claim number other than 0 marks an event that the host queued while this worker was busy,
and that its user may still cancel: before running it, the worker claims it in the CLAIMS
file (see `ClaimRecord`), and skips it if the host withdrew it first.

Worker -> host frames are {"completion": message or null, "idle": bool}. A completion sent
by `handle` itself rides on the frame that also says the worker is idle again; a completion
sent from another thread (the timeout watchdog) goes out at once with idle false.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import mmap
import os
import pickle
import socket
import struct
import sys
import threading
import time
import uuid

from . import transport
from .worker import handle

_HEADER = struct.Struct("!I")
_EVENT_HEADER = struct.Struct("!IQ")  # length, claim number
# One recv takes whatever frames have arrived, up to this much (below malloc's mmap threshold).
_READ_SIZE = 64 * 1024


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(_HEADER.pack(len(body)) + body)


def send_event(sock: socket.socket, body: bytes, claim: int = 0) -> None:
    sock.sendall(_EVENT_HEADER.pack(len(body), claim) + body)


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


class _EventReader:
    """Event frames from a socket, taking with one recv as many as have arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def next(self) -> tuple[bytes, int] | None:
        """The next frame's (body, claim number), or None once the host closed the socket."""
        buffer = self._buffer
        size = _EVENT_HEADER.size
        while True:
            if len(buffer) >= size:
                length, claim = _EVENT_HEADER.unpack_from(buffer)
                if len(buffer) >= size + length:
                    body = bytes(buffer[size:size + length])
                    del buffer[:size + length]
                    return body, claim
            chunk = self._sock.recv(_READ_SIZE)
            if not chunk:
                return None
            buffer += chunk


class ClaimRecord:
    """Decides, for an event queued at a busy worker, who has it: the worker, which starts
    it, or the host, which withdraws it because its future was cancelled. Exactly one wins.

    A small file shared by the two processes holds the last claim number the worker started
    and the numbers the host withdrew; an exclusive flock makes each check-and-set atomic
    between the processes, and a lock between the threads of one (flock does not exclude
    threads sharing the file). A worker's socket holds at most two events it has yet to
    claim, with consecutive numbers (the one it takes next and the one behind it), so one
    withdrawn number per parity is enough."""

    _LAYOUT = struct.Struct("!qqq")  # started, withdrawn (even), withdrawn (odd)

    def __init__(self, path: str, create: bool = False) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self._fd = os.open(path, flags, 0o600)
        if create:
            os.ftruncate(self._fd, self._LAYOUT.size)
        self._map = mmap.mmap(self._fd, self._LAYOUT.size)
        self._lock = threading.Lock()

    def start(self, claim: int) -> bool:
        """Take event `claim` for running; False if the host withdrew it first."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                record = list(self._LAYOUT.unpack_from(self._map))
                if record[1 + claim % 2] == claim:
                    return False
                if record[0] < claim:
                    record[0] = claim
                    self._LAYOUT.pack_into(self._map, 0, *record)
                return True
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def withdraw(self, claim: int) -> bool:
        """Withdraw event `claim`; False if it has been started already."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                record = list(self._LAYOUT.unpack_from(self._map))
                if record[0] >= claim:
                    return False
                record[1 + claim % 2] = claim
                self._LAYOUT.pack_into(self._map, 0, *record)
                return True
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def settle(self, claim: int) -> str:
        """For an event of a worker that is gone: "withdrawn", "started" (the worker took
        it), or "unstarted" (taken now by the host: it never ran there, and never will)."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                record = list(self._LAYOUT.unpack_from(self._map))
                if record[1 + claim % 2] == claim:
                    return "withdrawn"
                if record[0] >= claim:
                    return "started"
                record[0] = claim
                self._LAYOUT.pack_into(self._map, 0, *record)
                return "unstarted"
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            self._map.close()
            os.close(self._fd)


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


_SKIPPED = json.dumps({"completion": None, "idle": True, "skipped": True}).encode()
# Frames are ours, without cycles: skip the cycle check and the spaces.
_encode = json.JSONEncoder(check_circular=False, separators=(",", ":")).encode


def serve(sock: socket.socket, timeout: float | None, claims: ClaimRecord | None = None) -> None:
    send_lock = threading.Lock()
    loop_thread = threading.current_thread()
    outbox: list[dict] = []

    def reply(message: dict) -> None:
        if threading.current_thread() is loop_thread:
            outbox.append(message)
            return
        with send_lock:
            send_frame(sock, _encode({"completion": message, "idle": False}).encode())

    transport.set_local_reply(reply)
    frames = _EventReader(sock)
    while True:
        received = frames.next()
        if received is None:
            return
        body, claim = received
        if claim and claims is not None and not claims.start(claim):
            with send_lock:  # withdrawn by the host: its future was cancelled
                send_frame(sock, _SKIPPED)
            continue
        frame: dict = {"idle": True}
        try:
            handle(pickle.loads(body), LocalContext(timeout))
        except Exception as exc:  # noqa: BLE001 - Lambda would record it as a function error
            frame["handler_error"] = {"type": type(exc).__name__, "message": str(exc)}
        frame["completion"] = outbox.pop() if outbox else None
        with send_lock:
            send_frame(sock, _encode(frame).encode())


def main(argv: list[str]) -> None:
    fd = int(argv[1])
    timeout = float(argv[2]) if len(argv) > 2 and argv[2] != "none" else None
    claims = ClaimRecord(argv[3]) if len(argv) > 3 else None
    sock = socket.socket(fileno=fd)
    try:
        serve(sock, timeout, claims)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the host went away; a sandbox without a host has nothing left to do


if __name__ == "__main__":
    main(sys.argv)
