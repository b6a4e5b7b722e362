"""The scheduler: everything a LambdaExecutor owns, and the threads that work for it.

It holds the task table, the backend, the executor's key, the invoker threads and the
completion thread (completion.py), and is the one place where an attempt's outcome becomes
a launch, a retry or an ended future (`conclude`). Its threads hold the scheduler, never the
executor, as thread.py's workers hold only a weak reference to theirs: a dropped executor is
collected, and a finalizer shuts its scheduler down.

Life cycle: open -> (shutdown requested) -> the completion thread exits once no task is left
-> close (invoker threads joined, reader pool joined, backend closed: its processes, threads
and queues gone). A broken scheduler ends every unfinished future with BrokenExecutor.
"""

from __future__ import annotations

import functools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Future, InvalidStateError
from typing import Any

from lambdafutures_handler import protocol

from . import completion, errors, shared
from .backends.base import Backend
from .completion import Outcome
from .observe import stats as task_stats
from .speculation import Speculation, StragglerWatch
from .tasks import Action, Failure, Task, TaskTable

log = logging.getLogger("lambdafutures")

# How many times an attempt that the platform dropped unrun is launched again.
_RELAUNCHES = 5

# Stands in for an inline payload that was sent and dropped.
_SENT: dict[str, str] = {"inline": ""}

# Schedulers not yet closed; the interpreter's exit handler closes them (executor.py).
live: set[Scheduler] = set()
_live_lock = threading.Lock()


_echo_lock = threading.Lock()


def _release(blobs: shared.BlobRegistry, digests: tuple[str, ...], _: Future) -> None:
    blobs.release(digests)


def _echo(task_id: int, text: str) -> None:
    """Print a task's output on the host, each line behind the task's number (the user asked
    for it with echo_output=True)."""
    prefix = f"[task {task_id}] "
    lines = "".join(prefix + line + "\n" for line in text.splitlines())
    with _echo_lock:
        sys.stdout.write(lines)
        sys.stdout.flush()


class Scheduler:
    def __init__(self, backend: Backend, executor_id: str, *, max_workers: int,
                 timeout: float | None, retries: int, speculation: Speculation | None,
                 queue_expiry: float | None, output_limit: int, echo_output: bool) -> None:
        self.id = executor_id
        self.key = protocol.new_key()
        self.backend = backend
        self.timeout = timeout
        self.retries = retries
        self.queue_expiry = queue_expiry
        self.output_limit = output_limit
        self.echo_output = echo_output
        self.table = TaskTable(max_workers + backend.prefetch)
        self.stragglers = StragglerWatch(speculation) if speculation else None
        self.broken: str | None = None
        self.shutting_down = False
        self._state_lock = threading.Lock()
        self._closed = threading.Event()
        # Workers read the key here (never from a message): see handler/protocol.py.
        backend.store.put(protocol.key_object(executor_id), self.key)
        self.reader = completion.ResultReader(backend.store)
        # Large objects that payloads name by digest, each stored once (shared.py).
        self.blobs = shared.BlobRegistry()
        self._launches: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._inline = threading.local()
        # A backend whose invoke never blocks (invoke_threads == 0) launches small tasks in
        # the thread that frees a slot, but a payload that goes to the store is written by
        # one launcher thread: neither submit() nor the completion thread waits for it.
        self._inline_launch = backend.invoke_threads == 0
        self._invokers = [
            threading.Thread(target=self._invoke_loop, name=f"lambdafutures-invoker-{n}",
                             daemon=True)
            for n in range(backend.invoke_threads or 1)
        ]
        for thread in self._invokers:
            thread.start()
        with _live_lock:
            live.add(self)
        self._completer = threading.Thread(target=completion.run, args=(self,),
                                           name="lambdafutures-completion", daemon=True)
        self._completer.start()

    # -- submitting (any thread) ------------------------------------------------------------

    def check_open(self) -> None:
        if self.broken:
            raise BrokenExecutor(self.broken)
        if self.shutting_down:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def new_task(self, task_id: int, future: Future, payload: bytes, calls: int,
                 batch: bool) -> Task:
        return Task(task_id, future, payload, calls, batch, self.retries,
                    _RELAUNCHES if self.queue_expiry is not None else 0)

    def submit(self, task: Task) -> None:
        digests = protocol.payload_blobs(task.payload) if task.payload is not None else ()
        with self._state_lock:
            self.check_open()
            start = self.table.add(task)
        if digests:
            # Counted while pickling (shared.py); a blob no task needs may then be deleted.
            task.future.add_done_callback(functools.partial(_release, self.blobs, digests))
        if self.stragglers is not None:
            self.stragglers.submitted_one()
        if start:
            self._start(task)

    # -- launching ----------------------------------------------------------------------------

    def _start(self, task: Task) -> None:
        """Launch a task that has a slot: through the invoker threads or, for a backend whose
        invoke never blocks (invoke_threads == 0), right here, which saves a thread hop per
        task. Launches that a launch causes (a failed one frees its slot) are queued for the
        loop below rather than run by recursion."""
        if not self._inline_launch or (
                task.payload is not None
                and not protocol.fits_inline(len(task.payload), self.backend.inline_limit)):
            self._launches.put(task)
            return
        batch = getattr(self._inline, "batch", None)
        if batch is not None:
            batch.append(task)
            return
        self._inline.batch = batch = deque((task,))
        try:
            while batch:
                self._launch(batch.popleft())
        finally:
            self._inline.batch = None

    def _invoke_loop(self) -> None:
        while True:
            task = self._launches.get()
            if task is None:
                return
            self._launch(task)
            del task  # while idle, hold no task: its future (and result) may be dropped

    def _launch(self, task: Task) -> None:
        if task.attempt == 0:
            try:
                running = task.future.set_running_or_notify_cancel()
            except RuntimeError:
                return  # it has ended already: the executor broke while it waited to launch
            if not running:
                nxt = self.table.drop_cancelled(task)
                if nxt is not None:
                    self._start(nxt)
                return
        attempt = task.attempt
        try:
            event = self._event_for(task, attempt)
            task.invoked_at = time.time()
            self.backend.invoker.invoke(event)
            if self._never_relaunched(task):
                # Nothing will invoke this task again, so its inline payload need not stay
                # in memory (a third of a task's footprint with 100,000 in flight).
                task.blob = _SENT
        except Exception as exc:  # noqa: BLE001 - every failure ends this attempt, typed
            failure = errors.InvocationFailed(f"task {task.id} could not be invoked: "
                                              f"{type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            self.conclude(task, attempt, Failure.FINAL, Outcome(exception=failure))
            return
        limit = self.timeout or self.backend.sandbox_timeout
        if limit is not None:
            # From when the invoke returned (time spent retrying the invoke is not the
            # task's) and, where the platform may queue the event, from its expiry: time in
            # Lambda's queue is not the task's either (the worker drops expired events).
            start = time.monotonic()
            if event["expires_at"] is not None:
                start += max(0.0, event["expires_at"] - time.time())
            elif self.backend.prefetch:
                start += limit  # handed to a busy local worker: it may first finish its own
            self.table.set_deadline(task, attempt, start + limit + self.backend.deadline_margin)

    def _never_relaunched(self, task: Task) -> bool:
        return (task.retries_left == 0 and task.relaunches_left == 0 and self.stragglers is None
                and task.blob is not None and not protocol.is_stored(task.blob))

    def _event_for(self, task: Task, attempt: int) -> dict[str, Any]:
        if task.blob is None:
            data = task.payload
            assert data is not None
            # The blobs the payload names are in the store before any worker looks for them
            # (put once per executor, by the first launch that needs each).
            digests = protocol.payload_blobs(data)
            if digests:
                self.blobs.ensure_stored(digests, self.backend.store, self.id)
            task.payload_sha256 = protocol.digest(data)
            if protocol.fits_inline(len(data), self.backend.inline_limit):
                task.blob = protocol.inline_blob(data, binary=self.backend.binary_inline)
            else:
                self.backend.store.put(protocol.payload_key(self.id, task.id), data)
                task.blob = dict(protocol.STORED)
            task.payload = None
        now = time.time()
        return protocol.make_event(
            key=self.key, executor=self.id, task=task.id, attempt=attempt, payload=task.blob,
            payload_sha256=task.payload_sha256, store=self.backend.store.url,
            reply=self.backend.reply_url, timeout=self.timeout, submitted_at=task.submitted_at,
            expires_at=None if self.queue_expiry is None else now + self.queue_expiry,
            limit=self.backend.inline_limit, output_limit=self.output_limit)

    # -- outcomes (the completion thread, reader threads, invoker threads) --------------------

    def conclude(self, task: Task, attempt: int, failure: Failure | None,
                 outcome: Outcome | Callable[[], Outcome] | None,
                 message: dict[str, Any] | None = None) -> None:
        """An attempt has ended. `outcome` may be a callable that decodes it (called only if
        the attempt was live), or None for a result still in the store (read on the pool)."""
        decision = self.table.conclude(task, attempt, failure)
        if decision.action is Action.DROP:
            if outcome is not None and not callable(outcome) and outcome.exception is not None:
                log.debug("task %d attempt %d ended (%s) while another attempt runs on",
                          task.id, attempt, outcome.exception)
            return
        if decision.action is Action.RELAUNCH:
            reason = outcome.exception if isinstance(outcome, Outcome) else failure
            log.warning("task %d attempt %d failed (%s); starting attempt %d", task.id,
                        attempt, reason, task.attempt)
            self._start(task)
            return
        # The task has left the table: pass its slot on first, so that the next task runs
        # while this result is read and unpickled (which takes a while when it is large).
        if decision.next_task is not None:
            self._start(decision.next_task)
        if task.blob is not None and protocol.is_stored(task.blob):
            self.reader.delete(protocol.payload_key(self.id, task.id))
        if outcome is None:
            object_key = protocol.result_key(self.id, task.id, attempt)

            def then(data: bytes | None, error: BaseException | None) -> None:
                if error is not None:
                    result = Outcome(exception=errors.LambdaFuturesError(
                        f"the result of task {task.id} could not be read from the object "
                        f"store: {type(error).__name__}: {error}"))
                    result.exception.__cause__ = error
                else:
                    result = completion.decode(message, data)
                self._finish(task, attempt, result, message)
                self.reader.delete(object_key)  # only once the future has it

            self.reader.read(object_key, then)
            return
        self._finish(task, attempt, outcome() if callable(outcome) else outcome, message)

    def _finish(self, task: Task, attempt: int, result: Outcome,
                message: dict[str, Any] | None) -> None:
        if self.stragglers is not None:
            self.stragglers.finished_in(
                None if result.exception is not None or task.invoked_at is None
                else time.time() - task.invoked_at)
        task_stats.attach(task.future, dict(
            task=task.id, attempt=attempt, calls=task.calls,
            host_submit=task.submitted_at, invoked=task.invoked_at, received=time.time(),
            status="ok" if result.exception is None else "error",
            worker=(message or {}).get("stats")))
        if message is not None and message.get("output"):
            task_stats.attach_output(task.future, message["output"])
            if self.echo_output:
                _echo(task.id, message["output"])
        try:
            if result.exception is None:
                task.future.set_result(result.value)
            else:
                task.future.set_exception(result.exception)
        except InvalidStateError:
            pass  # the executor broke while this task ended; the future already has an end

    def speculate(self) -> None:
        if self.stragglers is None:
            return
        for task in self.stragglers.stragglers(self.table.running()):
            if self.table.speculate(task):
                log.info("task %d has run %.1f s; starting a backup attempt %d", task.id,
                         time.time() - (task.invoked_at or time.time()), task.attempt)
                self._start(task)

    # -- ending -------------------------------------------------------------------------------

    def finished(self) -> bool:
        """True once shutdown was asked for and no task is left (the completion loop ends)."""
        return (self.shutting_down and len(self.table) == 0) or self._closed.is_set()

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        with self._state_lock:
            self.shutting_down = True
        if cancel_futures:
            self.cancel_waiting()
        if wait and self._completer is not threading.current_thread():
            self._completer.join()

    def cancel_waiting(self) -> None:
        """Cancel every task that has not been handed to a worker."""
        for task in self.table.cancel_pending():
            if task.future.cancel():
                task.future.set_running_or_notify_cancel()  # so wait() counts it done

    def abandon(self, reason: str) -> None:
        """Stop at once: cancel what waits, end what runs with BrokenExecutor, stop workers."""
        with self._state_lock:
            self.shutting_down = True
        self.cancel_waiting()
        self.break_(reason)
        if self._completer is not threading.current_thread():
            self._completer.join()

    def break_(self, reason: str) -> None:
        with self._state_lock:
            if self.broken is None:
                self.broken = reason
        for task in self.table.take_all():
            try:
                task.future.set_exception(BrokenExecutor(reason))
            except InvalidStateError:
                pass  # cancelled or already ended

    def close(self) -> None:
        """Called by the completion thread as it exits: join every thread, close the backend."""
        self._closed.set()
        for _ in self._invokers:
            self._launches.put(None)
        for thread in self._invokers:
            thread.join()
        self.reader.close()
        self.blobs.close()
        try:
            self.backend.close()
        except Exception:  # noqa: BLE001 - nothing is left to report it to but the log
            log.warning("closing the %s backend failed", self.backend.name, exc_info=True)
        with _live_lock:
            live.discard(self)
        log.info("executor %s closed", self.id)
