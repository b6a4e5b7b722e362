"""Every future ends, with the error DESIGN.md section 4 promises, and the executor carries on.

Through the public API only, on every backend; nothing here assumes that workers share the
host's memory or filesystem.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import wait

import pytest
import tasks

import lambdafutures
from lambdafutures import SerializationError, TaskTimeout, WorkerCrashed

# A library thread dying with an exception during a test fails that test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


# Executors with a per-task `timeout` use 3 s rather than 1 s: on AWS a fresh sandbox spends
# its first task's time importing boto3 (about 0.5 s on an idle machine), and the follow-up
# tasks these tests run after a timeout or crash land on fresh sandboxes.
TIMEOUT_S = 3


def _still_works(ex) -> None:
    assert ex.submit(tasks.square, 9).result(timeout=60) == 81
    assert list(ex.map(tasks.square, range(5))) == [0, 1, 4, 9, 16]


# -- pickling ---------------------------------------------------------------------------------


def test_unpicklable_argument_raises_at_submit(make_executor):
    ex = make_executor()
    with pytest.raises(SerializationError):
        ex.submit(tasks.identity, threading.Lock())
    with pytest.raises(SerializationError):
        ex.submit(tasks.kwargs_of, lock=threading.Lock())
    _still_works(ex)


def test_unpicklable_function_raises_at_submit(make_executor):
    ex = make_executor()
    lock = threading.Lock()

    def uses_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError, match="uses_lock"):
        ex.submit(uses_lock)
    _still_works(ex)


def test_unpicklable_argument_in_map_raises_at_map(make_executor):
    ex = make_executor()
    with pytest.raises(SerializationError):
        ex.map(tasks.identity, [1, threading.Lock()])
    _still_works(ex)


def test_unpicklable_result(make_executor):
    ex = make_executor()
    future = ex.submit(tasks.return_lock)
    exception = future.exception(timeout=60)
    assert isinstance(exception, SerializationError)
    assert "_thread.lock" in str(exception)  # names the type
    with pytest.raises(SerializationError):
        future.result()
    _still_works(ex)


def test_unpicklable_result_in_a_chunk(make_executor):
    ex = make_executor()
    results = ex.map(lambda x: threading.Lock() if x == 2 else x, range(4), chunksize=4)
    with pytest.raises(SerializationError, match="lock"):
        list(results)
    _still_works(ex)


# -- crashes and timeouts ----------------------------------------------------------------------


def test_worker_crash(make_executor):
    ex = make_executor(max_workers=2)
    future = ex.submit(tasks.exit_with, 3)
    exception = future.exception(timeout=60)
    assert isinstance(exception, WorkerCrashed)
    assert re.search(r"(code|status) 3\b", str(exception)), str(exception)
    _still_works(ex)


def test_worker_crash_spares_the_other_tasks(make_executor):
    ex = make_executor(max_workers=2)
    good = [ex.submit(tasks.sleep_then, 0.05, i) for i in range(4)]
    bad = ex.submit(tasks.exit_with, 7)
    more = [ex.submit(tasks.identity, i) for i in range(4, 8)]
    assert isinstance(bad.exception(timeout=60), WorkerCrashed)
    assert [f.result(timeout=60) for f in good + more] == list(range(8))


def test_worker_killed_by_a_signal(make_executor):
    ex = make_executor(max_workers=2)
    segfault = ex.submit(tasks.kill_self, "SIGSEGV")
    oom_kill = ex.submit(tasks.kill_self, "SIGKILL")
    for future in (segfault, oom_kill):
        exception = future.exception(timeout=60)
        assert isinstance(exception, WorkerCrashed), repr(exception)
        assert re.search(r"(?i)sig|signal", str(exception)), str(exception)
    _still_works(ex)


def test_task_timeout(make_executor):
    ex = make_executor(max_workers=2, timeout=TIMEOUT_S)
    future = ex.submit(tasks.sleep_then, 30, "too late")
    exception = future.exception(timeout=60)
    assert isinstance(exception, TaskTimeout)
    assert isinstance(exception, TimeoutError)
    _still_works(ex)


def test_timeout_must_be_positive(make_executor):
    with pytest.raises(ValueError):
        make_executor(timeout=0)
    with pytest.raises(ValueError):
        make_executor(retries=-1)


def test_every_kind_of_failure_in_one_executor(make_executor):
    ex = make_executor(max_workers=2, timeout=TIMEOUT_S)
    futures = {
        "user": ex.submit(tasks.raise_value_error, "user"),
        "crash": ex.submit(tasks.exit_with, 5),
        "timeout": ex.submit(tasks.sleep_then, 30),
        "result": ex.submit(tasks.return_lock),
        "ok": ex.submit(tasks.identity, "ok"),
    }
    done, not_done = wait(futures.values(), timeout=60)
    assert not not_done
    assert type(futures["user"].exception()) is ValueError
    assert isinstance(futures["crash"].exception(), WorkerCrashed)
    assert isinstance(futures["timeout"].exception(), TaskTimeout)
    assert isinstance(futures["result"].exception(), SerializationError)
    assert futures["ok"].result() == "ok"
    for future in futures.values():
        assert lambdafutures.stats_of(future) is not None
    _still_works(ex)


# -- retries ----------------------------------------------------------------------------------


def test_crash_is_retried(make_executor):
    ex = make_executor(max_workers=1, retries=1)
    # Crashes when started before the deadline (sleeping past it first); the retry starts
    # after it and returns. No state is shared with the host or kept in the worker.
    future = ex.submit(tasks.crash_before, time.time() + 2.0)
    assert future.result(timeout=60) == "survived"
    stats = lambdafutures.stats_of(future)
    assert stats.attempt == 1
    assert stats.status == "ok"
    _still_works(ex)


def test_crash_without_retries_left(make_executor):
    ex = make_executor(max_workers=1, retries=1)
    future = ex.submit(tasks.exit_with, 4)
    assert isinstance(future.exception(timeout=60), WorkerCrashed)
    assert lambdafutures.stats_of(future).attempt == 1
    _still_works(ex)


def test_user_exception_is_not_retried(make_executor):
    ex = make_executor(max_workers=1, retries=2)
    future = ex.submit(tasks.raise_custom_error, "once only", 1)
    exception = future.exception(timeout=60)
    assert type(exception) is tasks.CustomError
    stats = lambdafutures.stats_of(future)
    assert stats.attempt == 0
    assert stats.status == "error"
    _still_works(ex)


def test_unpicklable_result_is_not_retried(make_executor):
    ex = make_executor(max_workers=1, retries=2)
    future = ex.submit(tasks.return_lock)
    assert isinstance(future.exception(timeout=60), SerializationError)
    assert lambdafutures.stats_of(future).attempt == 0


def test_timeout_is_retried(make_executor):
    ex = make_executor(max_workers=1, timeout=TIMEOUT_S, retries=1)
    # The first attempt starts before the deadline (even from a slow cold start) and stalls
    # until its timeout; the retry starts after the deadline and returns.
    future = ex.submit(tasks.stall_before, time.time() + TIMEOUT_S - 0.5)
    assert future.result(timeout=60) == "on time"
    assert lambdafutures.stats_of(future).attempt == 1
    _still_works(ex)


def test_result_that_cannot_be_unpickled_on_the_host(make_executor):
    ex = make_executor()
    exception = ex.submit(tasks.return_unloadable).exception(timeout=60)
    assert isinstance(exception, SerializationError)
    assert "refuses to be unpickled" in str(exception)
    _still_works(ex)


def test_argument_that_cannot_be_unpickled_on_the_worker(make_executor):
    ex = make_executor()
    exception = ex.submit(tasks.identity, tasks.HostOnly()).exception(timeout=60)
    assert isinstance(exception, SerializationError)
    assert "cannot be loaded" in str(exception)
    _still_works(ex)


def test_crash_reports_reach_their_executor_while_others_are_open(make_executor):
    # Executors of one deployment may share where crash reports arrive (on AWS, the
    # function's on-failure queue): each crash must still end its own task as a crash.
    ex = make_executor(max_workers=2)
    others = [make_executor(max_workers=1) for _ in range(3)]
    for other in others:
        assert other.submit(tasks.identity, 1).result(timeout=60) == 1
    crashes = [ex.submit(tasks.exit_with, 3) for _ in range(2)]
    for future in crashes:
        exception = future.exception(timeout=120)
        assert isinstance(exception, WorkerCrashed), repr(exception)
    _still_works(ex)
    for other in others:
        _still_works(other)
