"""A pool of local worker processes that behave like Lambda sandboxes.

Each worker is a fresh interpreter (`python -m lambdafutures_handler.local_worker`) holding one
end of a socket pair: portable to Linux and macOS, no fork of the host's threads, and no
re-import of the user's `__main__`. Like Lambda, the pool starts a sandbox when an event
arrives and none is idle (a cold start; `prestart` starts some ahead of need), keeps it warm
for later events, queues events beyond its concurrency, kills a sandbox whose event runs past
the timeout, and replaces a sandbox that dies. What happened to an event that did not finish
is reported through `on_failure(event, kind, message)`; everything the worker says comes back
through `on_frame(completion)`.

With `depth=2` a busy worker also holds the next (small) event in its socket, so that it goes
on without waiting for the host (the local backend; Lambda's own sandboxes take one event at
a time). The pool never learns of futures: whoever invokes has already marked the task
running. A worker reads its next event only after sending the frames that end the previous
one (local_worker.py), so when a worker dies the first event it had not ended had started
(it is reported) and any event behind it had not (it goes to another worker): each event
runs at most once, and no event is lost.

One thread owns the sockets' read side: the pool's own manager thread or, with
`thread=False`, whichever single thread calls `poll()` (the local backend's completion
thread, so that a completion reaches its future without a thread hop). `invoke` writes
events directly to a worker, so that path costs no thread hop either.
"""

from __future__ import annotations

import logging
import math
import selectors
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from lambdafutures_handler import frames, protocol

from .processes import describe_exit, hold_limit, kill, start_worker, worker_env

log = logging.getLogger("lambdafutures")



class _Worker:
    __slots__ = ("process", "sock", "reader", "items", "deadline", "alive", "hold_limit")

    def __init__(self, process: subprocess.Popen, sock: socket.socket) -> None:
        self.process = process
        self.sock = sock
        # Only an event this small is held while the worker is busy: its socket holds it
        # whole, so sending it never blocks the sending thread (which holds the pool's lock).
        # A larger one waits in the pool's queue for a worker with nothing to run.
        self.hold_limit = hold_limit(sock)
        self.reader = frames.FrameReader(sock)
        # (event, pickled event) sent to this worker: the first one runs, the others wait.
        self.items: deque[tuple[dict, bytes]] = deque()
        self.deadline: float | None = None  # the first item's, when the pool has a timeout
        self.alive = True  # False once killed or lost: it gets no more events


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
        prestart: int = 0,
    ) -> None:
        if depth not in (1, 2):
            raise ValueError("depth is 1 or 2")
        self.size = size
        self.timeout = timeout
        self.depth = depth
        self._on_frame = on_frame
        self._on_failure = on_failure
        self._env = worker_env(blas_threads, env)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._starting = 0  # processes being started outside the lock (prestart)
        self._idle: list[_Worker] = []  # holding no event
        self._roomy: deque[_Worker] = deque()  # running an event, with room for one more
        self._backlog: deque[tuple[dict, bytes]] = deque()
        self._closed = False
        # When the reading thread will next wake up on its own (-inf while it is not
        # waiting): a deadline set before that must wake it, or it would be missed.
        self._sleeping_until = -math.inf
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        # Registered and unregistered only by the reading thread; `_changed` tells it that
        # the set of workers changed under it.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._changed = False
        self._threads: list[threading.Thread] = []
        if thread:
            self._threads.append(threading.Thread(
                target=self._manage, name=f"lambdafutures-{name}-pool", daemon=True))
        if prestart > 0:
            self._threads.append(threading.Thread(
                target=self._prestart, args=(min(prestart, size),),
                name=f"lambdafutures-{name}-prestart", daemon=True))
        for started in self._threads:
            started.start()

    # -- invoking (any thread) ------------------------------------------------------------

    def invoke(self, event: dict[str, Any]) -> None:
        """Hand `event` to a worker, or queue it until one has room."""
        item = (event, frames.encode(event))
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            self._backlog.append(item)
            if self._idle:
                self._fill(self._idle.pop())
            elif len(self._workers) + self._starting < self.size:
                self._fill(self._spawn())
            elif self._starting:
                pass  # a worker being started ahead of need takes it in a moment
            elif self._roomy and len(item[1]) <= self._roomy[0].hold_limit:
                self._fill(self._roomy.popleft())

    def _fill(self, worker: _Worker) -> None:
        """Give `worker` backlog events while it has room, else park it. Holds the lock."""
        if self._closed or not worker.alive:
            return
        backlog = self._backlog
        while backlog and len(worker.items) < self.depth:
            if worker.items and len(backlog[0][1]) > worker.hold_limit:
                break  # too large to wait in a busy worker's socket
            self._send(worker, backlog.popleft())
        if not worker.items:
            self._idle.append(worker)
        elif len(worker.items) < self.depth:
            self._roomy.append(worker)

    def _send(self, worker: _Worker, item: tuple[dict, bytes]) -> None:
        """Send one event to `worker`. Holds the lock."""
        if not worker.items:
            self._set_deadline(worker)
        worker.items.append(item)
        try:
            frames.send(worker.sock, item[1])
        except OSError:
            pass  # the worker died; the reader sees its socket close and reports the event

    def _set_deadline(self, worker: _Worker) -> None:
        """Start the time limit of the event `worker` runs now. Holds the lock."""
        if self.timeout is None:
            return
        worker.deadline = deadline = time.monotonic() + self.timeout
        if deadline < self._sleeping_until:
            self._sleeping_until = deadline
            self._wake()  # the reading thread waits past this deadline: it must look again

    def _spawn(self) -> _Worker:
        """Start a worker and watch it. Holds the lock."""
        worker = _Worker(*start_worker(self.timeout, self._env))
        self._adopt(worker)
        return worker

    def _adopt(self, worker: _Worker) -> None:
        self._workers.append(worker)
        self._changed = True
        self._wake()

    def _prestart(self, count: int) -> None:
        """Start up to `count` workers ahead of need, one at a time, outside the lock (a
        process start takes a millisecond or two; invokes meanwhile go on)."""
        for _ in range(count):
            with self._lock:
                if self._closed or len(self._workers) + self._starting >= self.size:
                    return
                self._starting += 1
            try:
                worker = _Worker(*start_worker(self.timeout, self._env))
            except OSError as exc:
                log.warning("could not start a worker process ahead of need: %s", exc)
                with self._lock:
                    self._starting -= 1
                self._start_for_backlog()
                return
            with self._lock:
                self._starting -= 1
                if not self._closed:
                    self._adopt(worker)
                    self._fill(worker)
                    continue
            worker.sock.close()  # closed meanwhile: the new worker sees end-of-file
            kill(worker.process)
            return

    def _start_for_backlog(self) -> None:
        """After a failed start ahead of need: events that waited for that worker get one
        started now, or are reported if none can be."""
        with self._lock:
            stranded: list[tuple[dict, bytes]] = []
            if self._backlog and not self._closed and not self._starting and (
                    len(self._workers) < self.size):
                try:
                    self._fill(self._spawn())
                except OSError:
                    stranded = list(self._backlog)
                    self._backlog.clear()
        for event, _ in stranded:
            self._on_failure(event, protocol.CRASH, "no worker process could be started")

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # already awake (the buffer is full), or closing

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
            now = time.monotonic()
            until = math.inf if timeout is None else now + timeout
            if self.timeout is not None:
                for worker in self._workers:
                    if worker.deadline is not None and worker.deadline < until:
                        until = worker.deadline
            self._sleeping_until = until
        wait = None if until == math.inf else max(0.0, until - now)
        events = self._selector.select(wait)
        with self._lock:
            self._sleeping_until = -math.inf
        for key, _ in events:
            if key.data is None:
                self._drain_wake()
            else:
                self._read(key.data)
        if self.timeout is not None:
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
        except OSError:
            pass

    def _read(self, worker: _Worker) -> None:
        if not self._take_frames(worker):
            self._lost(worker, protocol.CRASH, describe_exit(worker.process))

    def _take_frames(self, worker: _Worker) -> bool:
        """Pass on the frames one read brings; False once the worker's socket is closed."""
        try:
            bodies = worker.reader.read()
        except OSError:
            bodies = None
        if bodies is None:
            return False
        for body in bodies:
            self._handle_frame(worker, frames.decode(body))
        return True

    def _handle_frame(self, worker: _Worker, frame: dict) -> None:
        if frame.get("completion") is not None:
            self._on_frame(frame["completion"])
        if not frame.get("idle"):
            return
        with self._lock:
            done = worker.items.popleft() if worker.items else None
            # The event held behind it, if any, runs now: the worker takes it at once.
            worker.deadline = None
            if not worker.alive:
                pass  # killed: its frames are read to learn what ended, nothing more
            else:
                if worker.items:
                    self._set_deadline(worker)
                if worker in self._roomy:
                    self._roomy.remove(worker)
                self._fill(worker)
        error = frame.get("handler_error")
        if error is not None and done is not None:
            self._on_failure(done[0], protocol.PROTOCOL, f"{error['type']}: {error['message']}")

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [w for w in self._workers if w.deadline is not None and w.deadline <= now]
            heads = [w.items[0] if w.items else None for w in late]
            for worker in late:
                worker.alive = False
                if worker in self._roomy:
                    self._roomy.remove(worker)
        for worker, head in zip(late, heads, strict=True):
            kill(worker.process)
            # Not blocking: what the dead process sent is all there (a child it forked could
            # hold the socket open, and must not stall this thread).
            worker.sock.setblocking(False)
            # Frames the worker sent before it was killed come first: its late event may
            # have ended just now, and the one behind it started.
            while self._take_frames(worker):
                pass
            if worker.items and worker.items[0] is head:
                kind, message = protocol.TIMEOUT, (
                    f"task ran past its sandbox's {self.timeout:g} s limit; its worker "
                    f"process was killed and replaced")
            else:
                kind, message = protocol.CRASH, (
                    f"worker process {worker.process.pid} was killed just after this task "
                    f"started, because the task before it had run out of time")
            self._lost(worker, kind, message)

    def _lost(self, worker: _Worker, kind: str, message: str) -> None:
        """A worker is gone: report the event it had started, pass those it had not on to
        other workers, and start a replacement for queued work."""
        try:
            self._selector.unregister(worker.sock)
        except (KeyError, ValueError):
            pass  # started since the selector last looked, or already unregistered
        with self._lock:
            if worker not in self._workers:
                return  # reported already
            worker.alive = False
            self._workers.remove(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            if worker in self._roomy:
                self._roomy.remove(worker)
            started = worker.items.popleft() if worker.items else None
            # Never read by the worker (see the module's docstring): back to the front.
            self._backlog.extendleft(reversed(worker.items))
            worker.items.clear()
            worker.deadline = None
            if self._backlog and not self._closed:
                self._fill(self._spawn())
        worker.sock.close()
        if started is not None:
            event = started[0]
            log.debug("task %s attempt %s: %s", event.get("task"), event.get("attempt"), message)
            self._on_failure(event, kind, message)

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
            self._roomy.clear()
            self._backlog.clear()
        self._wake()
        for started in self._threads:
            if started is not threading.current_thread():
                started.join()
        for worker in workers:
            worker.sock.close()  # a worker sees end-of-file once its event ends, and exits
            if not worker.items:
                kill(worker.process)  # idle, or still starting: nothing to wait for
        deadline = time.monotonic() + 2.0
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill(worker.process)
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()
