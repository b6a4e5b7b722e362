"""LambdaExecutor: a concurrent.futures.Executor whose workers are Lambda sandboxes.

submit() pickles the call in the caller's thread (so a pickling error is raised right
there), enters the task in the table and, when a slot is free, hands it to an invoker
thread. One completion thread reads the backend's CompletionQueue, ends futures, retries
crashed or timed-out tasks when asked to, and passes each freed slot to the next pending
task. It is the only place where breakage becomes errors: if it dies, every unfinished
future gets BrokenExecutor, and so does every later submit.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, InvalidStateError
from typing import Any

from lambdafutures_handler import protocol

from . import completion, config, errors, serialize
from .backends.base import Backend
from .observe import stats as task_stats
from .speculation import Speculation, StragglerWatch
from .tasks import Task, TaskTable

log = logging.getLogger("lambdafutures")

# Lambda's hard limit on a function's timeout.
LAMBDA_MAX_TIMEOUT_S = 900
_RECEIVE_BATCH = 10
_LOOP_WAIT_S = 0.05

# Stands in for an inline payload that was sent and dropped.
_SENT: dict[str, str] = {}

_live: weakref.WeakSet[LambdaExecutor] = weakref.WeakSet()


def _at_exit() -> None:
    # Like the standard executors, let submitted work finish before the interpreter exits;
    # this also closes worker processes and removes temporary objects.
    for executor in list(_live):
        executor.shutdown(wait=True)


atexit.register(_at_exit)


class LambdaExecutor(Executor):
    """Runs calls on AWS Lambda (or in local Lambda-like worker processes).

    Args:
        max_workers: tasks in flight at once; None means the CPU count locally, 1000 on AWS.
        backend: "local" or "aws"; None means $LAMBDAFUTURES_BACKEND, else the deployment
            config written by `lambdafutures deploy`, else "local".
        timeout: per-task time limit in seconds (the Lambda function timeout on AWS).
        retries: how many times to re-run a task whose worker crashed or timed out. A task
            whose function raised is never retried.
        speculation: opt-in backup attempts for stragglers (see `Speculation`).
        **backend_options: passed to the backend (see README).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        backend: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        speculation: Speculation | None = None,
        **backend_options: Any,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        name, deployment = config.resolve_backend(backend)
        if name == "aws" and timeout is not None and timeout > LAMBDA_MAX_TIMEOUT_S:
            raise ValueError(f"timeout {timeout:g} s exceeds Lambda's limit of "
                             f"{LAMBDA_MAX_TIMEOUT_S} s")
        self._id = uuid.uuid4().hex[:16]
        self._key = protocol.new_key()
        self._timeout = timeout
        self._retries = retries
        self._backend = _open_backend(name, max_workers, timeout, self._id, deployment,
                                      backend_options)
        self._max_workers = max_workers or self._backend.default_max_workers
        # max_workers tasks run at once; `prefetch` more may wait at busy workers, cancellable.
        self._table = TaskTable(self._max_workers + self._backend.prefetch)
        self._ids = itertools.count()
        self._shutdown = False
        self._broken: str | None = None
        self._state_lock = threading.Lock()
        self._launches: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._inline = threading.local()
        self._stale_keys: list[str] = []
        self._stragglers = StragglerWatch(speculation) if speculation else None
        self._invokers = [
            threading.Thread(target=self._invoke_loop, name=f"lambdafutures-invoker-{n}",
                             daemon=True)
            for n in range(self._backend.invoke_threads)
        ]
        for thread in self._invokers:
            thread.start()
        self._completer = threading.Thread(target=self._completion_loop,
                                           name="lambdafutures-completion", daemon=True)
        self._completer.start()
        _live.add(self)
        log.info("executor %s started: backend %s, max_workers %d, timeout %s, retries %d",
                 self._id, name, self._max_workers, timeout, retries)

    @property
    def max_workers(self) -> int:
        return self._max_workers

    @property
    def backend(self) -> str:
        return self._backend.name

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._submit(fn, [(args, kwargs)], batch=False)

    def _submit(self, fn: Callable[..., Any], calls: list[tuple[tuple, dict]],
                batch: bool) -> Future:
        self._check_open()
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        payload = serialize.dumps_call(fn, calls, batch)
        future: Future = Future()
        task = Task(next(self._ids), future, payload, len(calls), batch, self._retries)
        with self._state_lock:
            self._check_open()
            start = self._table.add(task)
            if self._stragglers is not None:
                self._stragglers.submitted += 1
        if start:
            self._start(task)
        return future

    def _check_open(self) -> None:
        if self._broken:
            raise BrokenExecutor(self._broken)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Like Executor.map. `chunksize` calls travel in one invocation; `buffersize`
        (as in Python 3.14) bounds how many calls are submitted ahead of the consumer."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0.")
        end_time = None if timeout is None else timeout + time.monotonic()
        calls = zip(*iterables)  # noqa: B905 - map stops at the shortest, as the stdlib does
        if chunksize == 1:
            submissions = (self.submit(fn, *args) for args in calls)
        else:
            submissions = (self._submit(fn, [(args, {}) for args in chunk], batch=True)
                           for chunk in _batched(calls, chunksize))
        window = None if buffersize is None else max(1, -(-buffersize // chunksize))
        futures = deque(itertools.islice(submissions, window))

        def results() -> Iterator[Any]:
            try:
                while futures:
                    if window is not None:
                        futures.extend(itertools.islice(submissions, 1))
                    if chunksize == 1:
                        yield _result_or_cancel(futures.popleft(), end_time)
                    else:
                        # Pop each result as it is yielded (as the stdlib does), so that the
                        # chunk does not keep results the consumer has already dropped.
                        chunk = _result_or_cancel(futures.popleft(), end_time)
                        chunk.reverse()
                        while chunk:
                            yield chunk.pop()
            finally:
                for future in futures:
                    future.cancel()

        return results()

    # -- invoking -----------------------------------------------------------------------------

    def _start(self, task: Task) -> None:
        """Launch a task that has a slot: through the invoker threads or, for a backend whose
        invoke never blocks (invoke_threads == 0), right here, which saves a thread hop per
        task. A failed launch frees its slot for the next task; that one is queued for the
        loop below rather than launched by recursion."""
        if self._invokers:
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
                if not task.future.set_running_or_notify_cancel():
                    self._end(task)
                    return
            except RuntimeError:
                return  # it has ended already: the executor broke while it waited to launch
        attempt = task.attempt
        try:
            event = self._event_for(task)
            task.invoked_at = time.time()
            self._backend.invoker.invoke(event)
            limit = self._timeout or self._backend.sandbox_timeout
            if limit is not None:
                # From when the invoke returned: time spent retrying the invoke itself is not
                # the task's. A task handed to a busy local worker may first wait for that
                # worker's current one.
                wait = limit if self._backend.prefetch else 0.0
                self._table.set_deadline(task, attempt, time.monotonic() + wait + limit
                                         + self._backend.deadline_margin)
            if (task.retries_left == 0 and self._stragglers is None and task.blob is not None
                    and protocol.blob_key(task.blob) is None):
                # Nothing will invoke this task again, so its inline payload need not stay
                # in memory (a third of a task's footprint with 100,000 in flight).
                task.blob, task.sig = _SENT, ""
        except Exception as exc:  # noqa: BLE001 - every failure ends this future, typed
            failure = errors.InvocationFailed(f"task {task.id} could not be invoked: "
                                              f"{type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            self._settle(task, attempt, completion.Outcome(exception=failure))

    def _event_for(self, task: Task) -> dict[str, Any]:
        if task.blob is None:
            data = task.payload
            assert data is not None
            task.sig = protocol.sign(self._key, data)
            if protocol.fits_inline(len(data), self._backend.inline_limit):
                task.blob = protocol.inline_blob(data)
            else:
                object_key = protocol.payload_key(self._id, task.id)
                self._backend.store.put(object_key, data)
                task.blob = protocol.stored_blob(object_key)
            task.payload = None
        return protocol.make_event(
            executor=self._id, task=task.id, attempt=task.attempt, payload=task.blob,
            sig=task.sig, store=self._backend.store.url, reply=self._backend.reply_url,
            key=self._key, timeout=self._timeout, submitted_at=task.submitted_at,
            limit=self._backend.inline_limit)

    # -- completing -----------------------------------------------------------------------------

    def _completion_loop(self) -> None:
        completions = self._backend.completions
        try:
            while not (self._shutdown and len(self._table) == 0):
                messages = completions.receive(_RECEIVE_BATCH, _LOOP_WAIT_S)
                for message in messages:
                    self._complete(message)
                if messages:
                    completions.ack(messages)
                for task, attempt in self._table.expired(time.monotonic()):
                    self._settle(task, attempt, completion.Outcome(
                        exception=errors.TaskTimeout(
                            f"task {task.id} reported nothing within its time limit plus "
                            f"{self._backend.deadline_margin:g} s"),
                        retryable=True))
                if self._stragglers is not None:
                    self._speculate()
                self._delete_stale_objects()
        except BaseException as exc:  # noqa: BLE001 - becomes BrokenExecutor for everyone
            log.exception("lambdafutures completion thread failed")
            self._break(f"the completion thread failed: {type(exc).__name__}: {exc}")
        finally:
            self._close()

    def _complete(self, message: dict[str, Any]) -> None:
        if message.get("executor") != self._id:
            log.debug("ignoring a completion for executor %s", message.get("executor"))
            return
        task = self._table.current(message.get("task"), message.get("attempt"))
        if task is None:
            log.debug("ignoring a duplicate or stale completion: task %s attempt %s",
                      message.get("task"), message.get("attempt"))
            return
        if not completion.is_final(message):
            result = completion.outcome(message, self._backend.store, self._key)
            self._settle(task, message["attempt"], result, message)
            return
        # Whatever its result holds, this completion ends the task: pass its slot on first,
        # so that the next task runs while this result is read, checked and unpickled
        # (which takes a while when it is large).
        self._end(task)
        try:
            result = completion.outcome(message, self._backend.store, self._key)
        except BaseException as exc:  # the task has left the table: end its future here
            result = completion.Outcome(exception=BrokenExecutor(
                f"the completion thread failed: {type(exc).__name__}: {exc}"))
            self._finish(task, message["attempt"], result, message)
            raise
        self._stale_keys.extend(result.stored_keys)
        self._finish(task, message["attempt"], result, message)

    def _speculate(self) -> None:
        assert self._stragglers is not None
        for task in self._stragglers.stragglers(self._table.running()):
            with self._table.lock:
                if task.id not in self._table.tasks or task.other_live is not None:
                    continue
                task.speculated = True
                task.other_live = task.attempt
                task.attempt += 1
            log.info("task %d has run %.1f s; starting a backup attempt %d", task.id,
                     time.time() - (task.invoked_at or time.time()), task.attempt)
            self._start(task)

    def _settle(self, task: Task, attempt: int, result: completion.Outcome,
                message: dict[str, Any] | None = None) -> None:
        """End one attempt of a task: wait for its twin, retry it, or end its future."""
        self._stale_keys.extend(result.stored_keys)
        if result.retryable:
            with self._table.lock:
                twin_runs = task.other_live is not None
                if twin_runs:
                    # One of two racing attempts died; the other may still finish.
                    if attempt == task.other_live:
                        task.other_live = None
                    else:
                        task.attempt, task.other_live = task.other_live, None
            if twin_runs:
                return
        if result.retryable and task.retries_left > 0 and not self._broken:
            log.warning("task %d attempt %d failed (%s); retrying", task.id, task.attempt,
                        result.exception)
            with self._table.lock:
                task.retries_left -= 1
                task.attempt += 1
            self._start(task)
            return
        self._finish(task, attempt, result, message)
        self._end(task)

    def _finish(self, task: Task, attempt: int, result: completion.Outcome,
                message: dict[str, Any] | None) -> None:
        """Record a task's stats and end its future with `result`."""
        if self._stragglers is not None:
            self._stragglers.finished_in(
                None if result.exception is not None or task.invoked_at is None
                else time.time() - task.invoked_at)
        task_stats.attach(task.future, task_stats.from_message(
            task=task.id, attempt=attempt, calls=task.calls,
            host_submit=task.submitted_at, invoked=task.invoked_at, received=time.time(),
            status="ok" if result.exception is None else "error",
            worker=(message or {}).get("stats")))
        try:
            if result.exception is None:
                task.future.set_result(result.value)
            else:
                task.future.set_exception(result.exception)
        except InvalidStateError:
            pass  # the executor broke while this task ended; the future already has an end

    def _end(self, task: Task) -> None:
        if task.blob is not None and protocol.blob_key(task.blob):
            self._stale_keys.append(protocol.blob_key(task.blob))
        nxt = self._table.end(task)
        if nxt is not None:
            self._start(nxt)

    def _delete_stale_objects(self) -> None:
        if self._stale_keys:
            keys, self._stale_keys = self._stale_keys, []
            try:
                self._backend.store.delete(keys)
            except Exception:  # noqa: BLE001 - leftovers expire by lifecycle rule / gc
                log.warning("could not delete %d task objects", len(keys), exc_info=True)

    def _break(self, reason: str) -> None:
        with self._state_lock:
            self._broken = reason
        for task in self._table.take_all():
            try:
                task.future.set_exception(BrokenExecutor(reason))
            except InvalidStateError:
                pass  # cancelled or already ended

    def _close(self) -> None:
        for _ in self._invokers:
            self._launches.put(None)
        for thread in self._invokers:
            if thread is not threading.current_thread():
                thread.join()
        self._delete_stale_objects()
        self._backend.close()
        _live.discard(self)
        log.info("executor %s closed", self._id)

    # -- shutting down ------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._state_lock:
            self._shutdown = True
        if cancel_futures:
            self._cancel_waiting()
        if wait and self._completer is not threading.current_thread():
            self._completer.join()

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._abandon("interrupted (KeyboardInterrupt) before this task ended")
            return False
        self.shutdown(wait=True)
        return False

    def _abandon(self, reason: str) -> None:
        """Stop at once: cancel what waits, end what runs with BrokenExecutor, stop workers."""
        with self._state_lock:
            self._shutdown = True
        self._cancel_waiting()
        self._break(reason)
        self._completer.join()

    def _cancel_waiting(self) -> None:
        """Cancel every task that has not been handed to a worker."""
        for task in self._table.cancel_pending():
            if task.future.cancel():
                task.future.set_running_or_notify_cancel()  # so wait() counts it done


def _result_or_cancel(future: Future, end_time: float | None) -> Any:
    try:
        try:
            if end_time is None:
                return future.result()
            return future.result(end_time - time.monotonic())
        finally:
            future.cancel()
    finally:
        del future  # a consumed result must not be kept alive by this frame


def _batched(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _open_backend(name: str, max_workers: int | None, timeout: float | None, executor_id: str,
                  deployment: dict[str, Any] | None, options: dict[str, Any]) -> Backend:
    if name == "local":
        from .backends import local

        return local.open_local_backend(
            max_workers=max_workers or local.default_max_workers(), timeout=timeout, **options)
    from .backends import aws

    return aws.open_aws_backend(executor_id=executor_id, max_workers=max_workers,
                                timeout=timeout, deployment=deployment, **options)
