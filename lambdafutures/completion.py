"""The completion thread: receive, verify, and hand each outcome to the scheduler.

One thread per executor reads the backend's CompletionQueue. Every message is checked on its
own: its shape (`protocol.check_completion`), then its signature under the executor's key.
A message that fails either is dropped with one DEBUG line and acknowledged, so it is never
redelivered and never acted on: no object it names is read or deleted (object keys are the
host's own, from `protocol.result_key`), no retry is started. A hint (what Lambda's failure
destination or the local supervisor saw) may only end an attempt the host considers
running, and only if it carries that attempt's own signed event.

Reading a stored result (an S3 GET) and deleting it happen on a small pool of reader
threads, so one slow call never holds up the futures of other tasks, the deadlines, or the
next launches. The thread holds the scheduler, never the executor: a dropped executor is
collected, and its scheduler winds down (see executor.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import BrokenExecutor
from typing import TYPE_CHECKING, Any

from tenacity import (
    Retrying,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from lambdafutures_handler import protocol

from . import errors, serialize
from .tasks import Failure

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger("lambdafutures")

_RECEIVE_BATCH = 10
_LOOP_WAIT_S = 0.05
_READER_THREADS = 4

# A stored result is read under this policy: a transient S3 error must not lose a result the
# worker produced. A missing object is not transient.
RESULT_READ_RETRY = dict(
    stop=stop_after_attempt(4) | stop_after_delay(20),
    wait=wait_exponential_jitter(max=2, jitter=0.5),
    retry=retry_if_not_exception_type((FileNotFoundError, KeyError)),
    reraise=True,
)

_FAILURES = {
    protocol.TIMEOUT: Failure.RETRYABLE,
    protocol.CRASH: Failure.RETRYABLE,
    protocol.NOT_RUN: Failure.NOT_RUN,
}

# What a hint may lead to. Its kind is unsigned (anyone who saw a failed attempt's record
# can rewrite it), so a hint never causes more than the platform's own report would: a crash
# or a timeout may be retried, as `retries` allows, but "not run" ends the task instead of
# launching it again for free (Lambda says it only past the event's maximum age, hours after
# a worker would have dropped the event itself, which it reports signed).
_HINT_FAILURES = {
    protocol.TIMEOUT: Failure.RETRYABLE,
    protocol.CRASH: Failure.RETRYABLE,
}

_EXCEPTIONS = {
    protocol.TIMEOUT: errors.TaskTimeout,
    protocol.CRASH: errors.WorkerCrashed,
    protocol.SERIALIZATION: errors.SerializationError,
    protocol.MISMATCH: errors.RuntimeMismatch,
    protocol.SIGNATURE: errors.SignatureMismatch,
    protocol.PROTOCOL: errors.RuntimeMismatch,
    protocol.NOT_RUN: errors.InvocationFailed,
    protocol.INITIALIZER: BrokenExecutor,
}


class Outcome:
    """What a future ends with: a value or an exception."""

    __slots__ = ("value", "exception")

    def __init__(self, value: Any = None, exception: BaseException | None = None) -> None:
        self.value = value
        self.exception = exception


def run(scheduler: Scheduler) -> None:
    """The completion thread's body."""
    completions = scheduler.backend.completions
    try:
        while not scheduler.finished():
            messages = completions.receive(_RECEIVE_BATCH, _LOOP_WAIT_S)
            for message in messages:
                try:
                    _handle(scheduler, message)
                except (protocol.ProtocolError, RecursionError) as exc:
                    log.debug("dropping a message: %s", exc)
            if messages:
                completions.ack(messages)
            for task, attempt in scheduler.table.expired(time.monotonic()):
                scheduler.conclude(task, attempt, Failure.RETRYABLE, Outcome(
                    exception=errors.TaskTimeout(
                        f"task {task.id} reported nothing within its time limit plus "
                        f"{scheduler.backend.deadline_margin:g} s")))
            scheduler.speculate()
    except BaseException as exc:  # noqa: BLE001 - becomes BrokenExecutor for everyone
        log.exception("lambdafutures completion thread failed")
        scheduler.break_(f"the completion thread failed: {type(exc).__name__}: {exc}")
    finally:
        scheduler.close()


def _handle(scheduler: Scheduler, message: dict[str, Any]) -> None:
    if "hint" in message:
        _handle_hint(scheduler, message)
        return
    protocol.check_completion(message)
    if message["executor"] != scheduler.id:
        raise protocol.ProtocolError(f"a completion for executor {message['executor']!r}")
    if not protocol.completion_is_signed(scheduler.key, message):
        raise protocol.ProtocolError(
            f"a completion for task {message['task']} whose signature does not verify")
    task_id, attempt = message["task"], message["attempt"]
    task = scheduler.table.live(task_id, attempt)
    if task is None:
        log.debug("dropping a duplicate or stale completion: task %s attempt %s",
                  task_id, attempt)
        if protocol.is_stored(message["result"]):
            scheduler.reader.delete(protocol.result_key(scheduler.id, task_id, attempt))
        return
    error = message["error"]
    if message["status"] == "ok" or error["kind"] == protocol.USER:
        failure = None
    else:
        failure = _FAILURES.get(error["kind"], Failure.FINAL)
    if protocol.is_stored(message["result"]):
        scheduler.conclude(task, attempt, failure, None, message)
    else:
        scheduler.conclude(task, attempt, failure, lambda: decode(message, None), message)
    if failure is Failure.FINAL and error["kind"] == protocol.INITIALIZER:
        # As in the stdlib's pools: a failed initializer makes the executor unusable.
        scheduler.break_(f"a worker's initializer failed: {error['message']}")


def _handle_hint(scheduler: Scheduler, hint: dict[str, Any]) -> None:
    kind, text, event = hint.get("hint"), hint.get("message"), hint.get("event")
    if kind not in protocol.HINT_KINDS or not isinstance(text, str):
        raise protocol.ProtocolError("a malformed failure report")
    try:
        protocol.check_event(event)
    except protocol.ProtocolError as exc:
        raise protocol.ProtocolError(f"a failure report without a valid event: {exc}") from None
    if event["executor"] != scheduler.id:
        raise protocol.ProtocolError(f"a failure report for executor {event['executor']!r}")
    if not protocol.event_is_signed(scheduler.key, event):
        raise protocol.ProtocolError("a failure report whose event this executor did not sign")
    task = scheduler.table.live(event["task"], event["attempt"])
    if task is None:
        log.debug("dropping a failure report of a finished attempt: task %s attempt %s",
                  event["task"], event["attempt"])
        return
    exception = _EXCEPTIONS[kind](text)
    scheduler.conclude(task, event["attempt"], _HINT_FAILURES.get(kind, Failure.FINAL),
                       Outcome(exception=exception))


def decode(message: dict[str, Any], data: bytes | None) -> Outcome:
    """The outcome a verified completion carries; `data` is its stored result's bytes."""
    blob = message["result"]
    if blob is not None and data is None:
        try:
            data = protocol.read_inline(blob)
        except ValueError:
            data = b""
    if data is not None and protocol.digest(data) != message["result_sha256"]:
        return Outcome(exception=errors.SignatureMismatch(
            "the task's result does not match its signed hash; refusing to unpickle it"))
    if message["status"] == "ok":
        try:
            return Outcome(value=serialize.loads_result(data))
        except errors.LambdaFuturesError as exc:
            return Outcome(exception=exc)
    error = message["error"]
    if error["kind"] == protocol.USER:
        return Outcome(exception=_user_exception(error, data))
    exception = _EXCEPTIONS.get(error["kind"], errors.LambdaFuturesError)(
        error["message"] or f"task failed ({error['kind']})")
    if error["traceback"]:
        exception.__cause__ = errors.RemoteTraceback(error["traceback"])
    return Outcome(exception=exception)


def _user_exception(error: dict[str, str], data: bytes | None) -> BaseException:
    from . import remote  # the user's exception rebuilt, or TaskExited / RemoteError

    return remote.user_exception(
        error, None if data is None else (lambda: serialize.loads_result(data)))


class ResultReader:
    """A few threads that read stored results (with retries) and delete task objects."""

    def __init__(self, store: Any, threads: int = _READER_THREADS) -> None:
        self._store = store
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stale: list[str] = []
        self._stale_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"lambdafutures-reader-{n}",
                                          daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def read(self, object_key: str, then: Any) -> None:
        """Read `object_key` and call `then(data, error)` on a reader thread."""
        self._jobs.put((object_key, then))

    def delete(self, object_key: str) -> None:
        with self._stale_lock:
            self._stale.append(object_key)
            flush = len(self._stale) >= 100
        if flush:
            self._jobs.put(None)

    def flush(self) -> None:
        with self._stale_lock:
            keys, self._stale = self._stale, []
        if keys:
            try:
                self._store.delete(keys)
            except Exception:  # noqa: BLE001 - leftovers expire by lifecycle rule / gc
                log.warning("could not delete %d task objects", len(keys), exc_info=True)

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(False)
        for thread in self._threads:
            thread.join()
        self.flush()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is False:
                return
            if job is None:
                self.flush()
                continue
            object_key, then = job
            try:
                data = Retrying(**RESULT_READ_RETRY)(self._store.get, object_key)
            except Exception as exc:  # noqa: BLE001 - this task's failure, not the executor's
                then(None, exc)
            else:
                then(data, None)
            del job, then
