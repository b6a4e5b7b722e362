"""A pool of local worker processes that behave like Lambda sandboxes.

Each worker is a fresh interpreter (`python -m lambdafutures_handler.local_worker`) holding one
end of a socket pair: portable to Linux and macOS, no fork of the host's threads, and no
re-import of the user's `__main__`. Like Lambda, the pool starts a sandbox when an event
arrives and none is idle (a cold start), keeps it warm for later events, queues events
beyond its concurrency, kills a sandbox whose event runs past the timeout, and replaces a
sandbox that dies. What happened to an event that did not finish is reported through
`on_failure(event, kind, message)`; everything the worker says comes back through
`on_frame(frame)`.

With `depth=2` a busy worker also holds the next event in its socket, so that it goes on
without waiting for the host (the local backend; Lambda's own sandboxes take one event at a
time). Such an event's task has not started, and its future, although it already says
running (as ProcessPoolExecutor's queued calls do), can still be cancelled until the worker
takes it: see `_hold` and `ClaimRecord`.

One thread owns the sockets' read side: the pool's own manager thread or, with
`thread=False`, whichever single thread calls `poll()` (the local backend's completion
thread, so that a completion reaches its future without a thread hop). `invoke` writes
events directly to an idle worker, so that path costs no thread hop either.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, _base
from typing import Any

from lambdafutures_handler import protocol
from lambdafutures_handler.local_worker import ClaimRecord, send_event

log = logging.getLogger("lambdafutures")

_BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                          "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


# Like a Lambda sandbox, a worker imports only what is installed: the user's own modules
# reach it by value (serialize.py), so a task that works here also works on Lambda.
_NO_CWD_ON_PATH = ("-P",) if sys.version_info >= (3, 11) else ()

# One recv per readable socket, below malloc's mmap threshold; most frames fit in one.
_READ_SIZE = 64 * 1024
_FRAME_HEADER = 4


class _Item:
    """An event on its way to a worker, with the future it may start (see `invoke`)."""

    __slots__ = ("event", "data", "future", "on_dropped", "claim")

    def __init__(self, event: dict, data: bytes, future: Future | None,
                 on_dropped: Callable[[], None] | None) -> None:
        self.event = event
        self.data = data
        self.future = future
        self.on_dropped = on_dropped
        self.claim = 0  # its claim number while it waits at a busy worker


class _Worker:
    def __init__(self, number: int, process: subprocess.Popen, sock: socket.socket,
                 claims: ClaimRecord | None, claims_path: str | None) -> None:
        self.number = number
        self.process = process
        self.sock = sock
        self.items: deque[_Item] = deque()  # the first one runs, the others wait
        self.deadline: float | None = None
        self.inbox = bytearray()  # bytes read but not yet a whole frame
        self.claims = claims
        self.claims_path = claims_path
        self.claimed = 0  # the last claim number given out

    @property
    def event(self) -> dict[str, Any] | None:
        return self.items[0].event if self.items else None

    def withdraw(self, claim: int) -> bool:
        """Withdraw waiting event `claim` (see ClaimRecord); False if it was taken, or if the
        worker is gone (its waiting events went elsewhere, no longer withdrawable here)."""
        claims = self.claims
        try:
            return claims is not None and claims.withdraw(claim)
        except (ValueError, OSError):
            return False  # closed meanwhile: the worker is gone


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
        depth: int = 1,
        claims_dir: str | None = None,
    ) -> None:
        if depth not in (1, 2) or (depth == 2 and claims_dir is None):
            raise ValueError("depth is 1, or 2 with a claims_dir")
        self.size = size
        self.timeout = timeout
        self.depth = depth
        self._claims_dir = claims_dir
        self._on_frame = on_frame
        self._on_failure = on_failure
        self._env = self._worker_env(blas_threads, env)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []  # holding no event
        self._roomy: deque[_Worker] = deque()  # running an event, with room for one more
        self._backlog: deque[_Item] = deque()
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

    def invoke(self, event: dict[str, Any], future: Future | None = None,
               on_dropped: Callable[[], None] | None = None) -> None:
        """Hand `event` to a worker. With `future` (its task's future, still pending), the
        pool marks the future running when the event reaches a worker, and keeps it
        cancellable while the event waits at a busy one (depth 2); if the future is
        cancelled before the event reaches a worker, or while it waits, the event is
        dropped and `on_dropped()` called."""
        # Pickled for the worker (local_worker.py says why); what it sends back is JSON.
        item = _Item(event, pickle.dumps(event, pickle.HIGHEST_PROTOCOL), future, on_dropped)
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            self._backlog.append(item)
            if self._idle:
                dropped = self._fill(self._idle.pop())
            elif len(self._workers) < self.size:
                dropped = self._fill(self._spawn())
            elif self._roomy:
                dropped = self._fill(self._roomy.popleft())
            else:
                dropped = []
        self._call(dropped)

    def _fill(self, worker: _Worker) -> list[Callable[[], None]]:
        """Give `worker` backlog events while it has room, else park it. Holds the lock;
        returns the `on_dropped` of events whose futures had been cancelled."""
        dropped: list[Callable[[], None]] = []
        while not self._closed:
            if len(worker.items) >= self.depth:
                return dropped
            if not self._backlog:
                break
            item = self._backlog.popleft()
            if not self._send(worker, item):
                if item.on_dropped is not None:
                    dropped.append(item.on_dropped)
        if self._closed:
            return dropped
        if not worker.items:
            self._idle.append(worker)
        elif len(worker.items) < self.depth:
            self._roomy.append(worker)
        return dropped

    def _send(self, worker: _Worker, item: _Item) -> bool:
        """Send one event to `worker`; False when its future was cancelled. Holds the lock."""
        future = item.future
        if not worker.items:
            if future is not None and not _run_or_notify(future):
                return False
            worker.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        else:
            # Behind a busy worker's event: numbered, so that the worker claims it before
            # running it (and the host can tell, should the worker die, whether it had).
            worker.claimed += 1
            item.claim = claim = worker.claimed
            if future is not None and not _hold(future, lambda: worker.withdraw(claim),
                                                item.on_dropped or _nothing):
                _run_or_notify(future)  # cancelled first: count it done for wait()
                return False
        worker.items.append(item)
        try:
            send_event(worker.sock, item.data, item.claim)
        except OSError:
            pass  # the worker died; the reader sees its socket close and reports the event
        return True

    def _spawn(self) -> _Worker:
        host_end, worker_end = socket.socketpair()
        timeout = "none" if self.timeout is None else repr(self.timeout)
        self._spawned += 1
        claims = claims_path = None
        if self.depth > 1:
            assert self._claims_dir is not None
            claims_path = os.path.join(self._claims_dir,
                                       f".claims-{os.getpid()}-{id(self)}-{self._spawned}")
            claims = ClaimRecord(claims_path, create=True)
        process = subprocess.Popen(
            [sys.executable, *_NO_CWD_ON_PATH, "-m", "lambdafutures_handler.local_worker",
             str(worker_end.fileno()), timeout, *([claims_path] if claims_path else [])],
            pass_fds=(worker_end.fileno(),), env=self._env, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the host, which then stops its workers
        )
        worker_end.close()
        worker = _Worker(self._spawned, process, host_end, claims, claims_path)
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
            with self._lock:
                done = worker.items.popleft() if worker.items else None
                if done is not None and done.future is not None:
                    _taken(done.future)
                # The next event, if one waited, runs now (or is skipped, if withdrawn): the
                # worker claims it without waiting for the host.
                worker.deadline = None
                if worker.items and self.timeout is not None:
                    worker.deadline = time.monotonic() + self.timeout
                if worker in self._roomy:
                    self._roomy.remove(worker)
                dropped = self._fill(worker)
            self._call(dropped)
            error = frame.get("handler_error")
            if error is not None and done is not None:
                self._on_failure(done.event, protocol.PROTOCOL,
                                 f"{error['type']}: {error['message']}")

    @staticmethod
    def _call(callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            callback()

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
        """A worker is gone: report the events it had started, pass those it had not on to
        other workers (none runs twice), and start a replacement for queued work."""
        try:
            self._selector.unregister(worker.sock)
        except (KeyError, ValueError):
            pass  # started since the selector last looked, or already unregistered
        dropped: list[Callable[[], None]] = []
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            if worker in self._roomy:
                self._roomy.remove(worker)
            failed: list[tuple[dict, str, str]] = []
            unstarted: list[_Item] = []
            for position, item in enumerate(worker.items):
                if item.future is not None:
                    _taken(item.future)
                state = "started"
                if item.claim:
                    assert worker.claims is not None
                    state = worker.claims.settle(item.claim)
                if state == "unstarted":
                    item.claim = 0
                    item.future = None  # it says running already; it just waits again
                    unstarted.append(item)
                elif state == "started" and position == 0:
                    failed.append((item.event, kind, message))
                elif state == "started":  # it had followed the first one: the process died
                    failed.append((item.event, protocol.CRASH, f"{message}, after this task "
                                   f"had started in it"))
            worker.items.clear()
            worker.deadline = None
            self._backlog.extendleft(reversed(unstarted))
            if self._backlog and not self._closed:
                dropped = self._fill(self._spawn())
            self._forget_claims(worker)
        worker.sock.close()
        self._call(dropped)
        for event, why, text in failed:
            log.debug("task %s attempt %s: %s", event.get("task"), event.get("attempt"), text)
            self._on_failure(event, why, text)

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
    def _forget_claims(worker: _Worker) -> None:
        if worker.claims is not None:
            worker.claims.close()
            worker.claims = None
            try:
                os.remove(worker.claims_path)
            except OSError:
                pass

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
            for worker in workers:
                for item in worker.items:
                    if item.future is not None:
                        _taken(item.future)
            self._workers.clear()
            self._idle.clear()
            self._roomy.clear()
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
            self._forget_claims(worker)
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()


def _nothing() -> None:
    pass


def _hold(future: Future, withdraw: Callable[[], bool], on_withdrawn: Callable[[], None]) -> bool:
    """Mark `future` running while its event waits at a busy worker, with a cancel() of its
    own that withdraws the event (see `_cancel_held`); False if it is no longer pending (it
    was cancelled), and then the event must not be sent.

    The future stays a plain concurrent.futures.Future: its own cancel() is shadowed on the
    instance. One that looked up the plain cancel() before this sees it running and fails,
    which is never wrong (the event is not sent without the worker's claim record)."""
    with future._condition:
        if future._state != _base.PENDING:
            return False
        future._state = _base.RUNNING
        future.cancel = functools.partial(_cancel_held, future, withdraw, on_withdrawn)
        return True


def _taken(future: Future) -> None:
    """The event is done with (or no longer withdrawable): `future` goes on like any other,
    and no longer refers to itself through its shadowing cancel()."""
    with future._condition:
        future.__dict__.pop("cancel", None)


def _cancel_held(future: Future, withdraw: Callable[[], bool],
                 on_withdrawn: Callable[[], None]) -> bool:
    with future._condition:
        if "cancel" not in future.__dict__ or future._state != _base.RUNNING:
            future.__dict__.pop("cancel", None)
            return Future.cancel(future)  # taken meanwhile, or ended: the plain answer
        if not withdraw():
            return False  # the worker has started it
        del future.__dict__["cancel"]
        future._state = _base.CANCELLED
        future._condition.notify_all()
    future._invoke_callbacks()
    # Its event will never run: count it done for wait() now, and free its slot.
    future.set_running_or_notify_cancel()
    on_withdrawn()
    return True


def _run_or_notify(future: Future) -> bool:
    """future.set_running_or_notify_cancel(); False also for a future that has ended already
    (the executor broke meanwhile) or whose cancel was notified already."""
    if future._state in (_base.FINISHED, _base.CANCELLED_AND_NOTIFIED):
        return False
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:
        return False  # it ended just now
