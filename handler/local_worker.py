"""A local worker process: a stand-in for one warm Lambda sandbox.

Started by the host as `python -m lambdafutures_handler.local_worker FD TIMEOUT HOST_PID`, it
reads invoke events from the socket FD and runs each through `worker.handle`, one at a time,
for as long as the host keeps the socket open. Frames both ways are `frames`' (a length and
a pickle): the host sends events, the worker sends {"completion": message or None, "idle":
bool}. A completion sent by `handle` itself rides on the frame that also says the worker is
idle again; a completion sent from another thread (the timeout watchdog) goes out at once
with idle false.

The worker reads its next event only after it has sent the frame that ends the previous
one. The host relies on that order: when a worker dies, the first event it had not ended
had started, and any event behind it (one the host queued at the busy worker) had not.

A worker ends with its host: a thread watches the parent process and ends this one when it
changes (the host died and this process was re-parented), even while a task runs. A
parent-death signal (Linux's PR_SET_PDEATHSIG) would fire when the host *thread* that
started the worker ends, and hosts start workers from short-lived threads.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
import time
import uuid

from . import frames, transport
from .worker import handle

# How often the worker checks that its host is alive: a dead host's workers end within this.
_HOST_CHECK_S = 0.25
# Exit status of a worker that ended because its host was gone.
_HOST_GONE_STATUS = 75

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
            frames.send(sock, frames.encode({"completion": message, "idle": False}))

    transport.set_local_reply(reply)
    reader = frames.FrameReader(sock)
    while True:
        body = reader.next()
        if body is None:
            return
        frame: dict = {"idle": True}
        try:
            handle(frames.decode(body), LocalContext(timeout))
        except Exception as exc:  # noqa: BLE001 - Lambda would record it as a function error
            frame["handler_error"] = {"type": type(exc).__name__, "message": str(exc)}
        frame["completion"] = outbox.pop() if outbox else None
        with send_lock:
            frames.send(sock, frames.encode(frame))


def watch_host(host_pid: int, interval: float = _HOST_CHECK_S) -> None:
    """End this process once its host is gone; runs in a daemon thread. The host is this
    process's parent, unless an interpreter wrapper started it: then the parent it had at
    first (whose change means it was re-parented too), with the host itself checked too."""
    parent = os.getppid()
    while os.getppid() == parent and (parent == host_pid or _exists(host_pid)):
        time.sleep(interval)
    os._exit(_HOST_GONE_STATUS)  # no cleanup: a task may be running, and nobody waits


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> None:
    fd = int(argv[1])
    timeout = float(argv[2]) if argv[2] != "none" else None
    host_pid = int(argv[3])
    threading.Thread(target=watch_host, args=(host_pid,), name="lambdafutures-host-watch",
                     daemon=True).start()
    sock = socket.socket(fileno=fd)
    try:
        serve(sock, timeout)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the host went away; a sandbox without a host has nothing left to do


if __name__ == "__main__":
    main(sys.argv)
