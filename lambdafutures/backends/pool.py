"""A pool of local worker processes that behave like Lambda sandboxes.

Each worker is a fresh interpreter (`python -m lambdafutures_handler.local_worker`) holding one
end of a socket pair: portable to Linux and macOS, no fork of the host's threads, and no
re-import of the user's `__main__`. Like Lambda, the pool starts a sandbox when an event
arrives and none is idle (a cold start), keeps it warm for later events, queues events
beyond its concurrency, kills a sandbox whose event runs past the timeout, and replaces a
sandbox that dies. What happened to an event that did not finish is reported through
`on_failure(event, kind, message)`; everything the worker says comes back through
`on_frame(frame)`.

One thread owns the sockets' read side: the pool's own manager thread or, with
`thread=False`, whichever single thread calls `poll()` (the local backend's completion
thread, so that a completion reaches its future without a thread hop). `invoke` writes
events directly to an idle worker, so that path costs no thread hop either.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from lambdafutures_handler import protocol
from lambdafutures_handler.local_worker import send_frame

log = logging.getLogger("lambdafutures")

_BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                          "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


# Like a Lambda sandbox, a worker imports only what is installed: the user's own modules
# reach it by value (serialize.py), so a task that works here also works on Lambda.
_NO_CWD_ON_PATH = ("-P",) if sys.version_info >= (3, 11) else ()

# One recv per readable socket, below malloc's mmap threshold; most frames fit in one.
_READ_SIZE = 64 * 1024
_FRAME_HEADER = 4


class _Worker:
    def __init__(self, number: int, process: subprocess.Popen, sock: socket.socket) -> None:
        self.number = number
        self.process = process
        self.sock = sock
        self.event: dict[str, Any] | None = None
        self.deadline: float | None = None
        self.inbox = bytearray()  # bytes read but not yet a whole frame


class WorkerPool:
    def __init__(
        self,
        size: int,
        *,
        timeout: float | None,
        on_frame: Callable[[dict], None],
        on_failure: Callable[[dict, str, str], None],
        blas_threads: int | None = 1,
        env: dict[str, str | None] | None = None,
        name: str = "local",
        thread: bool = True,
    ) -> None:
        self.size = size
        self.timeout = timeout
        self._on_frame = on_frame
        self._on_failure = on_failure
        self._env = self._worker_env(blas_threads, env)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._backlog: deque[tuple[dict, bytes]] = deque()
        self._spawned = 0
        self._closed = False
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        # Registered and unregistered only by the reading thread; `_changed` tells it that
        # the set of workers changed under it.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._changed = False
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._manage,
                                            name=f"lambdafutures-{name}-pool", daemon=True)
            self._thread.start()

    @staticmethod
    def _worker_env(blas_threads: int | None,
                    extra: dict[str, str | None] | None) -> dict[str, str]:
        """The host's environment, one BLAS thread per worker, and `extra` on top (a None
        value removes a variable)."""
        env = dict(os.environ)
        if blas_threads is not None:
            for variable in _BLAS_THREAD_VARIABLES:
                env[variable] = str(blas_threads)
        for name, value in (extra or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    # -- invoking (any thread) ------------------------------------------------------------

    def invoke(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode()
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            worker = self._idle.pop() if self._idle else None
            if worker is None and len(self._workers) < self.size:
                worker = self._spawn()
            if worker is None:
                self._backlog.append((event, data))
                return
            self._assign(worker, event, data)

    def _assign(self, worker: _Worker, event: dict, data: bytes) -> None:
        worker.event = event
        worker.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            send_frame(worker.sock, data)
        except OSError:
            pass  # the worker died; the manager sees its socket close and reports the event

    def _spawn(self) -> _Worker:
        host_end, worker_end = socket.socketpair()
        timeout = "none" if self.timeout is None else repr(self.timeout)
        process = subprocess.Popen(
            [sys.executable, *_NO_CWD_ON_PATH, "-m", "lambdafutures_handler.local_worker",
             str(worker_end.fileno()), timeout],
            pass_fds=(worker_end.fileno(),), env=self._env, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the host, which then stops its workers
        )
        worker_end.close()
        self._spawned += 1
        worker = _Worker(self._spawned, process, host_end)
        self._workers.append(worker)
        self._changed = True
        self._wake()
        log.debug("started worker process %d (pid %d)", worker.number, process.pid)
        return worker

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or closing

    # -- the reading thread ---------------------------------------------------------------

    def _manage(self) -> None:
        while self.poll(None):
            pass

    def poll(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: until something happens) for what workers
        say, pass it on, and enforce deadlines. False once the pool is closed. Only one
        thread may call this (the manager thread, when the pool has one)."""
        with self._lock:
            if self._closed:
                return False
            if self._changed:
                self._sync_selector()
            deadlines = None
            if self.timeout is not None:
                deadlines = [w.deadline for w in self._workers if w.deadline is not None]
        if deadlines:
            left = max(0.0, min(deadlines) - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._drain_wake()
            else:
                self._read(key.data)
        if deadlines is not None:
            self._enforce_deadlines()
        return True

    def _sync_selector(self) -> None:
        """Watch the sockets of workers started since the last look. Holds the lock."""
        self._changed = False
        watched = {key.data for key in self._selector.get_map().values()}
        for worker in self._workers:
            if worker not in watched:
                self._selector.register(worker.sock, selectors.EVENT_READ, worker)

    def _drain_wake(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _read(self, worker: _Worker) -> None:
        try:
            chunk = worker.sock.recv(_READ_SIZE)
        except OSError:
            chunk = b""
        if not chunk:
            self._lost(worker, protocol.CRASH, self._describe_exit(worker))
            return
        inbox = worker.inbox
        inbox += chunk
        # Every whole frame read so far (a frame is a 4-byte big-endian length and a body).
        while len(inbox) >= _FRAME_HEADER:
            end = _FRAME_HEADER + int.from_bytes(inbox[:_FRAME_HEADER], "big")
            if len(inbox) < end:
                break
            body = bytes(inbox[_FRAME_HEADER:end])
            del inbox[:end]
            self._handle_frame(worker, body)

    def _handle_frame(self, worker: _Worker, body: bytes) -> None:
        frame = json.loads(body)
        if frame.get("completion") is not None:
            self._on_frame(frame["completion"])
        if frame.get("idle"):
            event = worker.event
            with self._lock:
                worker.event = worker.deadline = None
                self._next(worker)
            error = frame.get("handler_error")
            if error is not None and event is not None:
                self._on_failure(event, protocol.PROTOCOL, f"{error['type']}: {error['message']}")

    def _next(self, worker: _Worker) -> None:
        """Give an idle worker the oldest queued event, or park it. Holds the lock."""
        if self._closed:
            return
        if self._backlog:
            event, data = self._backlog.popleft()
            self._assign(worker, event, data)
        else:
            self._idle.append(worker)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [w for w in self._workers if w.deadline is not None and w.deadline <= now]
        for worker in late:
            self._kill(worker)
            self._lost(worker, protocol.TIMEOUT,
                       f"task ran past its sandbox's {self.timeout:g} s limit; its worker "
                       f"process was killed and replaced")

    def _lost(self, worker: _Worker, kind: str, message: str) -> None:
        """A worker is gone: report its event, and start a replacement for queued work."""
        try:
            self._selector.unregister(worker.sock)
        except (KeyError, ValueError):
            pass  # started since the selector last looked, or already unregistered
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            event = worker.event
            worker.event = worker.deadline = None
            if self._backlog and not self._closed:
                self._next(self._spawn())
        worker.sock.close()
        if event is not None:
            log.debug("task %s attempt %s: %s", event.get("task"), event.get("attempt"),
                      message)
            self._on_failure(event, kind, message)

    def _describe_exit(self, worker: _Worker) -> str:
        try:
            code = worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill(worker)
            code = worker.process.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"worker process {worker.process.pid} was killed by {name}"
        return f"worker process {worker.process.pid} exited with code {code}"

    @staticmethod
    def _kill(worker: _Worker) -> None:
        try:
            worker.process.kill()
        except ProcessLookupError:
            pass
        worker.process.wait()

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker process; queued events are dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
            self._idle.clear()
            self._backlog.clear()
        self._wake()
        if self._thread is not None:
            self._thread.join()
        for worker in workers:
            worker.sock.close()  # an idle worker sees end-of-file and exits on its own
        deadline = time.monotonic() + 2.0
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(worker)
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()
