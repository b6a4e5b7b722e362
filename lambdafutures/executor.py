"""LambdaExecutor: a concurrent.futures.Executor whose workers are Lambda sandboxes.

submit() pickles the call in the caller's thread (so a pickling error is raised right
there) and hands the task to the executor's scheduler (scheduler.py), which launches it when
a slot is free; one completion thread (completion.py) ends futures. The executor itself is a
thin front: nothing of the scheduler's refers back to it, so an executor that its user drops
is collected like the stdlib's, and its scheduler then finishes the work in flight and
closes its workers.

Where this differs from ProcessPoolExecutor, on purpose:
- A task handed to a worker is running and can no longer be cancelled. On the local
  backend each busy worker is also handed its next task (`prefetch`), so that it goes on
  without waiting for the host, as ProcessPoolExecutor queues EXTRA_QUEUED_CALLS: those
  tasks, too, report running() and cannot be cancelled.
- A dead worker fails only the task it was running (WorkerCrashed), not the whole pool.
- The initializer runs once per sandbox (before the sandbox's first task of this executor);
  if it raises, the executor breaks, as ProcessPoolExecutor's pool does.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import sys
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from . import config, scheduler, serialize, shared
from .backends.base import Backend
from .speculation import Speculation

log = logging.getLogger("lambdafutures")
T = TypeVar("T")

# Lambda's hard limit on a function's timeout.
LAMBDA_MAX_TIMEOUT_S = 900
# How long an event may wait in Lambda's async queue (account or function concurrency
# exhausted) before the worker drops it unrun and the host launches it again. The host's
# deadline for a task that reports nothing counts from there, so this is also how long a
# lost task goes unnoticed: short while tasks in flight fit the function's concurrency.
DEFAULT_QUEUE_EXPIRY_S = 60.0
DEFAULT_OUTPUT_LIMIT = 64 * 1024

_interrupted = False


def _note_interrupt(hook: Callable[..., Any]) -> Callable[..., Any]:
    def excepthook(exc_type, exc, tb):  # noqa: ANN001 - sys.excepthook's signature
        global _interrupted
        if issubclass(exc_type, KeyboardInterrupt):
            _interrupted = True
        hook(exc_type, exc, tb)
    return excepthook


def _at_exit() -> None:
    # Like the standard executors, let submitted work finish before the interpreter exits,
    # unless the program is ending on Ctrl-C: then stop at once, as inside a `with` block.
    for work in list(scheduler.live):
        try:
            if _interrupted:
                raise KeyboardInterrupt
            work.shutdown(wait=True, cancel_futures=False)
        except KeyboardInterrupt:
            log.warning("interrupted: stopping executor %s and its running tasks", work.id)
            work.abandon("interrupted (KeyboardInterrupt) before this task ended")


atexit.register(_at_exit)
sys.excepthook = _note_interrupt(sys.excepthook)


class LambdaExecutor(Executor):
    """Runs calls on AWS Lambda (or in local Lambda-like worker processes).

    Args:
        max_workers: tasks in flight at once; None means the CPU count locally, and on AWS
            the concurrency the function can have (its reserved concurrency, else the
            account's unreserved), at most 1000.
        backend: "local" or "aws"; None means $LAMBDAFUTURES_BACKEND, else the deployment
            config written by `lambdafutures deploy`, else "local".
        timeout: per-task time limit in seconds (the Lambda function timeout on AWS).
        retries: how many times to re-run a task whose worker crashed or timed out. A task
            whose function raised is never retried.
        speculation: opt-in backup attempts for stragglers (see `Speculation`).
        initializer, initargs: as for the stdlib executors: `initializer(*initargs)` runs
            in each sandbox before its first task of this executor.
        queue_expiry: seconds an event may wait in Lambda's queue before it is dropped unrun
            and launched again (AWS only). Default: 60, plus room for the queue to drain
            when max_workers exceeds the function's concurrency.
        output_limit: characters of each task's output (stdout, stderr, logging) kept and
            returned, its tail (`lambdafutures.output_of(future)`); 0 turns capture off.
        echo_output: print each task's output on the host as it completes, each line
            behind "[task N] ".
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
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        queue_expiry: float | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        echo_output: bool = False,
        **backend_options: Any,
    ) -> None:
        # Checked here, by name: a wrong type would otherwise fail deep inside a backend.
        def whole(name: str, value: Any) -> int:
            if isinstance(value, bool) or not hasattr(type(value), "__index__"):
                raise TypeError(f"{name} must be an int, not {type(value).__name__} "
                                f"({value!r})")
            return value.__index__()

        if max_workers is not None:
            max_workers = whole("max_workers", max_workers)
            if max_workers <= 0:
                raise ValueError(f"max_workers must be greater than 0, got {max_workers}")
        if timeout is not None:
            if isinstance(timeout, bool) or not hasattr(type(timeout), "__float__"):
                raise TypeError(f"timeout must be a number of seconds or None, not "
                                f"{type(timeout).__name__} ({timeout!r})")
            timeout = float(timeout)
            if not 0 < timeout < float("inf"):
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        retries = whole("retries", retries)
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        name, deployment = config.resolve_backend(backend)
        if name == "aws" and timeout is not None and timeout > LAMBDA_MAX_TIMEOUT_S:
            raise ValueError(f"timeout {timeout:g} s exceeds Lambda's limit of "
                             f"{LAMBDA_MAX_TIMEOUT_S} s")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if isinstance(output_limit, bool) or not isinstance(output_limit, int) \
                or output_limit < 0:
            raise ValueError("output_limit must be a count of characters, 0 or more")
        if queue_expiry is not None and not queue_expiry > 0:
            raise ValueError("queue_expiry must be a positive number of seconds, or None")
        executor_id = uuid.uuid4().hex[:16]
        self._init = (None if initializer is None
                      else serialize.dumps_initializer(initializer, tuple(initargs)))
        opened = _open_backend(name, max_workers, timeout, executor_id, deployment,
                               backend_options)
        self._max_workers = max_workers or opened.default_max_workers
        limit = opened.concurrency_limit
        if queue_expiry is None:
            queue_expiry = DEFAULT_QUEUE_EXPIRY_S
        if limit is not None and max_workers is not None and max_workers > limit:
            log.warning("max_workers=%d exceeds the %d concurrent executions the function can "
                        "have; the rest wait in Lambda's queue (see queue_expiry)",
                        max_workers, limit)
            if queue_expiry == DEFAULT_QUEUE_EXPIRY_S:
                # Room for the queue to drain: each slot runs max_workers / limit tasks.
                per_task = timeout or opened.sandbox_timeout or LAMBDA_MAX_TIMEOUT_S
                queue_expiry += -(-max_workers // limit) * per_task
        self._ids = itertools.count()
        try:
            self._scheduler = scheduler.Scheduler(
                opened, executor_id, max_workers=self._max_workers, timeout=timeout,
                retries=retries, speculation=speculation,
                queue_expiry=queue_expiry if opened.platform_queue else None,
                output_limit=output_limit, echo_output=echo_output)
        except BaseException:
            opened.close()
            raise
        # Shuts the scheduler down when this executor is collected (its threads refer to the
        # scheduler only); the interpreter's exit is handled by _at_exit instead.
        weakref.finalize(self, self._scheduler.shutdown, False, False).atexit = False
        log.info("executor %s started: backend %s, max_workers %d, timeout %s, retries %d",
                 executor_id, name, self._max_workers, timeout, retries)

    @property
    def max_workers(self) -> int:
        return self._max_workers

    @property
    def backend(self) -> str:
        return self._scheduler.backend.name

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """As Executor.submit. A large array or bytes object (1 MiB or more) that the call
        reaches, as an argument or as a global or closure variable of `fn`, is pickled and
        stored once per executor however many tasks use it (see `share`)."""
        return self._submit(fn, [(args, kwargs)], batch=False)

    def share(self, obj: T) -> shared.Shared[T]:
        """Put `obj` once and return a small handle to pass to tasks in its place, as
        Dask's `scatter` or Ray's `put`: as an argument (or inside one), or as a global or
        closure variable of the submitted function. Each task receives the object itself,
        its own copy unpickled on the worker, so a task that changes it changes nothing
        that another task sees. The object is pickled now (a SerializationError is raised
        here), kept in host memory once while the handle lives, stored once before the
        first task that uses it starts, and cached in warm sandboxes. The handle holds the
        object as it is now: later changes to `obj` are not seen.

            data = ex.share(load_big_table())
            futures = [ex.submit(fit, data, seed) for seed in range(1000)]
        """
        self._scheduler.check_open()
        return shared.share(obj)

    def _submit(self, fn: Callable[..., Any], calls: list[tuple[tuple, dict]],
                batch: bool) -> Future:
        self._scheduler.check_open()
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        payload = serialize.dumps_call(fn, calls, batch, self._init, self._scheduler.blobs)
        future: Future = Future()
        self._scheduler.submit(self._scheduler.new_task(next(self._ids), future, payload,
                                                        len(calls), batch))
        return future

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

    # -- shutting down ------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._scheduler.shutdown(wait, cancel_futures)

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._scheduler.abandon("interrupted (KeyboardInterrupt) before this task ended")
            return False
        self.shutdown(wait=True)
        return False


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
