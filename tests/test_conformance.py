"""LambdaExecutor keeps the promises of concurrent.futures, on every backend.

Everything here goes through the public API only, and nothing assumes that workers share
the host's memory or filesystem: the same tests run against the "aws" backend.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import threading
import uuid
import weakref
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    CancelledError,
    Future,
    as_completed,
    wait,
)

import numpy as np
import pytest
import tasks

import lambdafutures

# A library thread dying with an exception during a test fails that test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

# -- submit and futures ---------------------------------------------------------------------


def test_submit_returns_a_plain_future(make_executor):
    ex = make_executor()
    future = ex.submit(tasks.square, 7)
    assert type(future) is Future
    assert future.result(timeout=30) == 49
    assert future.done() and not future.cancelled()
    assert future.exception() is None


def test_submit_passes_keywords_named_fn_and_self(make_executor):
    ex = make_executor()
    future = ex.submit(tasks.kwargs_of, fn="f", self="s", other=3)
    assert future.result(timeout=30) == {"fn": "f", "self": "s", "other": 3}


def test_submit_positional_and_keyword_arguments(make_executor):
    ex = make_executor()
    assert ex.submit(tasks.add, 1, 2, 3).result(timeout=30) == 6
    assert ex.submit(pow, 2, 10).result(timeout=30) == 1024
    assert ex.submit(sorted, [3, 1, 2], reverse=True).result(timeout=30) == [3, 2, 1]


def test_submit_non_callable_raises_type_error(make_executor):
    ex = make_executor()
    with pytest.raises(TypeError):
        ex.submit(42)


@pytest.mark.parametrize("max_workers", [0, -3])
def test_max_workers_must_be_positive_on_every_backend(make_executor, max_workers):
    with pytest.raises(ValueError):
        make_executor(max_workers=max_workers)


# -- map ------------------------------------------------------------------------------------


def test_map_keeps_order(make_executor):
    ex = make_executor(max_workers=2)
    # Later items finish first: order must come from the input, not from completion.
    delays = [0.3, 0.2, 0.1, 0.0]
    assert list(ex.map(tasks.sleep_then, delays, range(4))) == [0, 1, 2, 3]
    assert list(ex.map(tasks.square, range(20))) == [x * x for x in range(20)]


@pytest.mark.parametrize("chunksize", [1, 2, 3, 7, 25, 100])
def test_map_chunksize(make_executor, chunksize):
    ex = make_executor(max_workers=2)
    assert list(ex.map(tasks.square, range(25), chunksize=chunksize)) == [
        x * x for x in range(25)]


def test_map_chunksize_must_be_positive(make_executor):
    ex = make_executor()
    with pytest.raises(ValueError):
        ex.map(tasks.square, range(3), chunksize=0)


def test_map_timeout_raises_timeout_error(make_executor):
    ex = make_executor(max_workers=1)
    results = ex.map(tasks.sleep_then, [1.0], timeout=0.1)
    with pytest.raises(TimeoutError):
        list(results)


def test_map_raises_first_exception_at_iteration(make_executor):
    ex = make_executor(max_workers=2)
    results = ex.map(tasks.fail_at, range(6), itertools.repeat(2))  # map() itself does not raise
    assert next(results) == 0
    assert next(results) == 1
    with pytest.raises(ValueError, match="bad item 2"):
        next(results)


def test_map_exception_in_a_chunk(make_executor):
    ex = make_executor(max_workers=2)
    results = ex.map(tasks.fail_at, range(6), itertools.repeat(4), chunksize=3)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 4"):
        list(results)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_over_nothing(make_executor, chunksize):
    ex = make_executor()
    assert list(ex.map(tasks.square, [], chunksize=chunksize)) == []
    assert list(ex.map(tasks.add, [], [1, 2], chunksize=chunksize)) == []


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_several_iterables_of_different_lengths(make_executor, chunksize):
    ex = make_executor()
    results = ex.map(tasks.add, range(5), range(10, 13), [100] * 9, chunksize=chunksize)
    assert list(results) == [110, 112, 114]


@pytest.mark.parametrize("chunksize", [1, 5])
def test_map_long_generator_with_buffersize(make_executor, chunksize):
    ex = make_executor(max_workers=2)
    consumed = []

    def numbers(n):
        for i in range(n):
            consumed.append(i)
            yield i

    results = ex.map(tasks.square, numbers(120), buffersize=8, chunksize=chunksize)
    assert next(results) == 0
    # Only a bounded window of the input is read ahead of the consumer.
    assert len(consumed) <= 8 + 2 * chunksize
    assert list(results) == [x * x for x in range(1, 120)]
    assert consumed == list(range(120))


def test_map_buffersize_consumes_input_lazily(make_executor):
    ex = make_executor(max_workers=2)
    # An endless input works only if map submits a bounded window ahead of the consumer.
    results = ex.map(tasks.square, itertools.count(), buffersize=4)
    assert list(itertools.islice(results, 30)) == [x * x for x in range(30)]
    results.close()


# -- waiting --------------------------------------------------------------------------------


def test_as_completed(make_executor):
    ex = make_executor(max_workers=2)
    futures = [ex.submit(tasks.sleep_then, d, i) for i, d in enumerate([0.4, 0.0, 0.2, 0.1])]
    seen = []
    for future in as_completed(futures, timeout=60):
        assert future.done()
        seen.append(future.result())
    assert sorted(seen) == [0, 1, 2, 3]


def test_as_completed_with_duplicates_and_done_futures(make_executor):
    ex = make_executor()
    first = ex.submit(tasks.identity, 1)
    first.result(timeout=30)
    second = ex.submit(tasks.identity, 2)
    assert {f.result() for f in as_completed([first, second, first], timeout=60)} == {1, 2}


def test_wait_first_completed(make_executor):
    ex = make_executor(max_workers=2)
    futures = [ex.submit(tasks.sleep_then, 1.0, "slow"), ex.submit(tasks.identity, "fast")]
    done, not_done = wait(futures, timeout=60, return_when=FIRST_COMPLETED)
    assert done and all(f.done() for f in done)
    assert done | not_done == set(futures)
    assert not done & not_done


def test_wait_first_exception(make_executor):
    ex = make_executor(max_workers=3)
    slow = [ex.submit(tasks.sleep_then, 1.0, i) for i in range(2)]
    failing = ex.submit(tasks.raise_value_error, "boom")
    done, not_done = wait([*slow, failing], timeout=60, return_when=FIRST_EXCEPTION)
    assert failing in done
    assert isinstance(failing.exception(), ValueError)
    assert done | not_done == {*slow, failing}


def test_wait_first_exception_without_exceptions_waits_for_all(make_executor):
    ex = make_executor(max_workers=2)
    futures = [ex.submit(tasks.square, i) for i in range(4)]
    done, not_done = wait(futures, timeout=60, return_when=FIRST_EXCEPTION)
    assert done == set(futures) and not not_done


def test_wait_all_completed(make_executor):
    ex = make_executor(max_workers=2)
    futures = [ex.submit(tasks.sleep_then, 0.1 * (i % 3), i) for i in range(6)]
    futures.append(ex.submit(tasks.raise_value_error, "x"))
    done, not_done = wait(futures, timeout=60, return_when=ALL_COMPLETED)
    assert done == set(futures) and not not_done
    assert [f.result() for f in futures[:-1]] == list(range(6))


def test_add_done_callback_called_once_with_the_future(make_executor):
    ex = make_executor()
    calls = []
    future = ex.submit(tasks.square, 3)
    future.add_done_callback(calls.append)
    assert future.result(timeout=30) == 9
    # A callback added to a finished future runs at once, in the caller's thread.
    late = []
    future.add_done_callback(late.append)
    ex.shutdown(wait=True)
    assert calls == [future]
    assert late == [future]


def test_add_done_callback_on_failure(make_executor):
    ex = make_executor()
    calls = []
    future = ex.submit(tasks.raise_value_error, "nope")
    future.add_done_callback(calls.append)
    wait([future], timeout=30)
    ex.shutdown(wait=True)
    assert calls == [future]
    assert isinstance(future.exception(), ValueError)


def test_asyncio_wrap_future(make_executor):
    ex = make_executor(max_workers=2)

    async def main():
        wrapped = [asyncio.wrap_future(ex.submit(tasks.square, i)) for i in range(5)]
        values = await asyncio.wait_for(asyncio.gather(*wrapped), 60)
        with pytest.raises(ValueError, match="async boom"):
            await asyncio.wait_for(
                asyncio.wrap_future(ex.submit(tasks.raise_value_error, "async boom")), 60)
        return values

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


def test_asyncio_run_in_executor(make_executor):
    ex = make_executor()

    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(ex, tasks.square, 12), 60)

    assert asyncio.run(main()) == 144


# -- cancel and shutdown ---------------------------------------------------------------------


def test_cancel_a_pending_task(make_executor):
    ex = make_executor(max_workers=1)
    slow = ex.submit(tasks.sleep_then, 1.0, "slow")
    middle = ex.submit(tasks.identity, "middle")
    last = ex.submit(tasks.identity, "last")
    assert last.cancel()
    assert last.cancelled() and last.done()
    with pytest.raises(CancelledError):
        last.result()
    with pytest.raises(CancelledError):
        last.exception()
    assert slow.result(timeout=30) == "slow"
    assert middle.result(timeout=30) == "middle"
    # wait() and as_completed() count a cancelled future as done.
    done, not_done = wait([slow, middle, last], timeout=30)
    assert done == {slow, middle, last} and not not_done
    assert set(as_completed([last, middle], timeout=30)) == {last, middle}
    assert lambdafutures.stats_of(last) is None
    # The freed slot still serves new work.
    assert ex.submit(tasks.square, 5).result(timeout=30) == 25


def test_cancel_a_running_or_finished_task_fails(make_executor):
    ex = make_executor(max_workers=1)
    future = ex.submit(tasks.identity, 1)
    assert future.result(timeout=30) == 1
    assert not future.cancel()
    assert not future.cancelled()


def test_shutdown_wait_ends_every_future(make_executor):
    ex = make_executor(max_workers=2)
    futures = [ex.submit(tasks.sleep_then, 0.05, i) for i in range(10)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == list(range(10))


def test_shutdown_cancel_futures(make_executor, backend):
    ex = make_executor(max_workers=1)
    running = ex.submit(tasks.sleep_then, 1.0, "ran")
    pending = [ex.submit(tasks.identity, i) for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=0) == "ran"
    # As with ProcessPoolExecutor's extra queued call, a task already handed to the busy
    # local worker is running and runs to its end; every other one is cancelled.
    handed = [f for f in pending if not f.cancelled()]
    assert len(handed) <= (1 if backend == "local" else 0)
    assert [f.result(timeout=0) for f in handed] == [pending.index(f) for f in handed]
    for future in pending:
        if future not in handed:
            with pytest.raises(CancelledError):
                future.result(timeout=0)
    done, not_done = wait([running, *pending], timeout=10)
    assert not not_done
    assert len(list(as_completed(pending, timeout=10))) == len(pending)


def test_shutdown_without_wait_still_ends_futures(make_executor):
    ex = make_executor(max_workers=1)
    futures = [ex.submit(tasks.sleep_then, 0.05, i) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=60) for f in futures] == list(range(4))


def test_submit_after_shutdown_raises(make_executor):
    ex = make_executor()
    ex.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        ex.submit(tasks.identity, 1)
    with pytest.raises(RuntimeError):
        list(ex.map(tasks.identity, [1]))
    ex.shutdown(wait=True)  # a second shutdown is harmless


def test_context_manager(make_executor):
    ex = make_executor(max_workers=2)
    with ex as entered:
        assert entered is ex
        futures = [entered.submit(tasks.sleep_then, 0.05, i) for i in range(5)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(5))
    with pytest.raises(RuntimeError):
        ex.submit(tasks.identity, 1)


def test_context_manager_does_not_swallow_exceptions(make_executor):
    ex = make_executor()
    with pytest.raises(KeyError):
        with ex:
            future = ex.submit(tasks.identity, 3)
            raise KeyError("mine")
    assert future.result(timeout=0) == 3


# -- no stale references ---------------------------------------------------------------------


def _dead_after_gc(ref: weakref.ref) -> bool:
    for _ in range(3):
        gc.collect()
        if ref() is None:
            return True
    return False


def test_no_stale_reference_to_a_consumed_result(make_executor):
    ex = make_executor(max_workers=2)
    for i in range(3):
        future = ex.submit(tasks.make_token, i)
        token = future.result(timeout=30)
        assert isinstance(token, tasks.Token) and token.value == i
        ref = weakref.ref(token)
        del token, future
        assert _dead_after_gc(ref), "the executor still holds a consumed result"


@pytest.mark.parametrize("chunksize", [1, 3])
def test_no_stale_reference_in_map(make_executor, chunksize):
    ex = make_executor(max_workers=2)
    for token in ex.map(tasks.make_token, range(4), chunksize=chunksize):
        ref = weakref.ref(token)
        del token
        assert _dead_after_gc(ref), "map still holds a result it already yielded"


# -- payloads ---------------------------------------------------------------------------------


def test_closure_and_lambda(make_executor):
    ex = make_executor()
    offset = 17

    def shifted(x):
        return x + offset

    assert ex.submit(shifted, 3).result(timeout=30) == 20
    assert ex.submit(lambda x, y=2: x * y + offset, 5).result(timeout=30) == 27
    assert list(ex.map(lambda x: -x, range(4))) == [0, -1, -2, -3]
    # A lambda as an argument and one as a result travel too.
    assert ex.submit(lambda f: f(4), lambda v: v * 10).result(timeout=30) == 40
    make_adder = ex.submit(lambda n: (lambda v: v + n), 100).result(timeout=30)
    assert make_adder(1) == 101


def test_each_task_sees_what_its_function_captured_at_submit(make_executor, monkeypatch):
    ex = make_executor(max_workers=1)  # one warm sandbox runs every task below
    x = 1

    def read_x():
        return x

    assert ex.submit(read_x).result(timeout=30) == 1
    x = 2  # a rebound closure cell
    assert ex.submit(read_x).result(timeout=30) == 2

    data = [1]

    def read_data():
        return data[0]

    assert ex.submit(read_data).result(timeout=30) == 1
    data[0] = 2  # a captured object changed in place
    assert ex.submit(read_data).result(timeout=30) == 2

    assert ex.submit(tasks.read_setting).result(timeout=30) == "a"
    monkeypatch.setattr(tasks, "SETTING", "b")  # a module global of a module sent by value
    assert ex.submit(tasks.read_setting).result(timeout=30) == "b"

    # A function that assigns a global starts from the host's value every time.
    assert [ex.submit(tasks.bump_count).result(timeout=30) for _ in range(3)] == [1, 1, 1]
    assert [ex.submit(tasks.append_to, i).result(timeout=30) for i in range(3)] == [
        [0], [1], [2]]

    def version():
        return "v1"

    assert ex.submit(version).result(timeout=30) == "v1"

    def version():  # noqa: F811 - redefined on purpose
        return "v2"

    assert ex.submit(version).result(timeout=30) == "v2"


_USER_MODULE = """
class Box:
    def __init__(self, value):
        self.value = value

def scale_by(factor, x):
    return factor * x

def make_box(value):
    return Box(value)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's own project, importable on the host only (workers do not
    share the host's filesystem); a fresh name, so no earlier test has shipped it."""
    name = f"lf_user_module_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return __import__(name)


def test_partial_of_a_user_module_function(make_executor, user_module):
    ex = make_executor()
    # The first thing this module sends is a partial: its function must travel by value.
    assert ex.submit(functools.partial(user_module.scale_by, 3), 4).result(timeout=30) == 12


def test_instance_of_a_user_module_class_as_argument(make_executor, user_module):
    ex = make_executor()
    box = ex.submit(tasks.identity, user_module.Box(5)).result(timeout=30)
    assert type(box) is user_module.Box and box.value == 5


def test_function_of_a_user_module(make_executor, user_module):
    ex = make_executor()
    box = ex.submit(user_module.make_box, 7).result(timeout=30)
    assert type(box) is user_module.Box and box.value == 7


def test_large_array_argument_and_result(make_executor):
    ex = make_executor()
    array = np.random.default_rng(0).standard_normal(600_000)  # 4.8 MB, over the inline limit
    assert array.nbytes > 4 * 256 * 1024
    result = ex.submit(tasks.scale, array, 2.0).result(timeout=60)
    assert isinstance(result, np.ndarray)
    np.testing.assert_array_equal(result, array * 2.0)


def test_large_array_result_only(make_executor):
    ex = make_executor(max_workers=2)
    futures = [ex.submit(tasks.make_array, 400_000, seed) for seed in range(3)]
    for seed, future in enumerate(futures):
        expected = np.random.default_rng(seed).standard_normal(400_000)
        np.testing.assert_array_equal(future.result(timeout=60), expected)


def test_large_array_through_map_with_chunks(make_executor):
    ex = make_executor(max_workers=2)
    arrays = [np.full(300_000, float(i)) for i in range(4)]
    results = list(ex.map(tasks.scale, arrays, itertools.repeat(3.0), chunksize=2))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, np.full(300_000, 3.0 * i))


# -- user exceptions ---------------------------------------------------------------------------


def test_user_exception_keeps_type_message_and_remote_traceback(make_executor):
    ex = make_executor()
    future = ex.submit(tasks.raise_value_error, "bad value 42")
    with pytest.raises(ValueError, match="bad value 42") as info:
        future.result(timeout=30)
    assert type(info.value) is ValueError
    cause = info.value.__cause__
    assert isinstance(cause, lambdafutures.RemoteTraceback)
    assert "raise_value_error" in cause.text
    assert "raise_value_error" in str(cause)
    assert isinstance(future.exception(), ValueError)


def test_user_exception_class_from_the_test_module(make_executor):
    ex = make_executor()
    future = ex.submit(tasks.raise_custom_error, "custom trouble", 7)
    exception = future.exception(timeout=30)
    assert type(exception) is tasks.CustomError
    assert str(exception) == "custom trouble"
    assert exception.code == 7
    assert isinstance(exception.__cause__, lambdafutures.RemoteTraceback)
    assert "raise_custom_error" in exception.__cause__.text


def test_exception_from_a_lambda(make_executor):
    ex = make_executor()

    def inner_failure(x):
        return {}[x]

    exception = ex.submit(inner_failure, "missing").exception(timeout=30)
    assert type(exception) is KeyError
    assert "inner_failure" in exception.__cause__.text


def test_exception_holding_an_unpicklable_value_keeps_its_type(make_executor):
    # Its class is found on the host: it is rebuilt, without the attribute that cannot travel.
    ex = make_executor()
    future = ex.submit(tasks.raise_unpicklable_error, "cannot travel")
    exception = future.exception(timeout=30)
    assert type(exception) is tasks.UnpicklableError
    assert str(exception) == "cannot travel"
    assert not hasattr(exception, "lock")
    assert "raise_unpicklable_error" in exception.__cause__.text
    assert isinstance(exception.__cause__, lambdafutures.RemoteTraceback)
    # The executor carries on.
    assert ex.submit(tasks.square, 4).result(timeout=30) == 16


def test_exception_whose_init_breaks_unpickling_keeps_its_type(make_executor):
    # Rebuilt without calling __init__, as tblib and loky do: args and attributes kept.
    ex = make_executor()
    exception = ex.submit(tasks.raise_unloadable_error, "half built").exception(timeout=30)
    assert type(exception) is tasks.UnloadableError
    assert exception.args == ("half built",) and exception.detail == "detail"
    assert "raise_unloadable_error" in exception.__cause__.text


# -- stats --------------------------------------------------------------------------------------


def test_stats_of_a_completed_future(make_executor):
    ex = make_executor()
    future = ex.submit(tasks.square, 6)
    assert future.result(timeout=30) == 36
    stats = lambdafutures.stats_of(future)
    assert isinstance(stats, lambdafutures.TaskStats)
    assert stats.status == "ok"
    assert stats.attempt == 0 and stats.calls == 1
    for name in ("host_submit", "job_start", "setup_done", "job_done", "result_received"):
        assert isinstance(getattr(stats, name), float), name
    assert (stats.host_submit <= stats.job_start <= stats.setup_done <= stats.job_done
            <= stats.result_received)
    assert stats.worker_id
    assert isinstance(stats.cold_start, bool)
    assert stats.total_time >= 0


def test_stats_warm_start_and_failures(make_executor):
    ex = make_executor(max_workers=1)
    first = ex.submit(tasks.identity, 1)
    first.result(timeout=30)
    second = ex.submit(tasks.identity, 2)
    second.result(timeout=30)
    a, b = lambdafutures.stats_of(first), lambdafutures.stats_of(second)
    assert isinstance(a.cold_start, bool) and isinstance(b.cold_start, bool)
    if a.worker_id == b.worker_id:  # the same sandbox ran both: the second ran warm
        assert b.cold_start is False
    failed = ex.submit(tasks.raise_value_error, "x")
    wait([failed], timeout=30)
    stats = lambdafutures.stats_of(failed)
    assert stats is not None and stats.status == "error" and stats.attempt == 0


def test_stats_of_a_pending_future_is_none(make_executor):
    ex = make_executor(max_workers=1)
    slow = ex.submit(tasks.sleep_then, 0.5)
    pending = ex.submit(tasks.identity, 1)
    assert lambdafutures.stats_of(pending) is None or pending.done()
    slow.result(timeout=30)
    pending.result(timeout=30)
    assert lambdafutures.stats_of(pending) is not None


def test_remote_traceback_prints_the_remote_frames(make_executor):
    ex = make_executor()
    exception = ex.submit(tasks.raise_value_error, "printed").exception(timeout=30)
    text = str(exception.__cause__)
    assert "raise_value_error" in text
    assert "ValueError: printed" in text


def test_exception_whose_str_fails_still_arrives(make_executor):
    ex = make_executor()
    exception = ex.submit(tasks.raise_bad_str_error).exception(timeout=30)
    assert type(exception) is tasks.BadStrError
    assert exception.args == ("hidden",)
    assert "raise_bad_str_error" in exception.__cause__.text


@pytest.mark.parametrize("size", [100_000, 1_000_000])
def test_exception_with_a_huge_message(make_executor, size):
    # Larger than a queue message (SQS: 256 KiB) on its own, or together with its traceback.
    ex = make_executor()
    message = "m" * (size - 1) + "!"
    exception = ex.submit(tasks.raise_value_error, message).exception(timeout=60)
    assert type(exception) is ValueError
    assert str(exception) == message
    assert "raise_value_error" in exception.__cause__.text
    assert ex.submit(tasks.square, 2).result(timeout=30) == 4


def test_system_exit_in_a_task_is_the_task_s_exception(make_executor):
    # SystemExit raised by the function ends only its future, as a typed error: re-raised
    # as itself, it would end the host's script.
    ex = make_executor()
    exception = ex.submit(tasks.exit_via_sys_exit, 5).exception(timeout=30)
    assert type(exception) is lambdafutures.TaskExited
    assert exception.type_name == "SystemExit" and exception.code == 5
    assert ex.submit(tasks.square, 2).result(timeout=30) == 4


# -- concurrency on the host ---------------------------------------------------------------------


def test_submit_from_many_threads(make_executor):
    ex = make_executor(max_workers=2)
    futures: dict[int, Future] = {}
    lock = threading.Lock()

    def submit_some(start):
        for i in range(start, start + 25):
            future = ex.submit(tasks.square, i)
            with lock:
                futures[i] = future

    threads = [threading.Thread(target=submit_some, args=(n * 25,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(futures) == list(range(100))
    assert all(futures[i].result(timeout=60) == i * i for i in range(100))


def test_submit_from_a_done_callback(make_executor):
    ex = make_executor(max_workers=2)
    follow_ups: list[Future] = []
    submitted = threading.Event()

    def chain(future):
        follow_ups.append(ex.submit(tasks.square, future.result()))
        submitted.set()

    ex.submit(tasks.identity, 6).add_done_callback(chain)
    assert submitted.wait(60)
    assert follow_ups[0].result(timeout=60) == 36


def test_many_small_tasks(make_executor):
    ex = make_executor()
    futures = [ex.submit(tasks.identity, i) for i in range(200)]
    assert [f.result(timeout=60) for f in futures] == list(range(200))
    assert list(ex.map(tasks.identity, range(500), chunksize=50)) == list(range(500))


def test_map_closed_early_leaves_the_executor_usable(make_executor):
    ex = make_executor(max_workers=1)
    results = ex.map(tasks.sleep_then, [0.05] * 20, range(20))
    assert next(results) == 0
    results.close()  # cancels what has not started
    assert ex.submit(tasks.square, 3).result(timeout=60) == 9
    ex.shutdown(wait=True)


def test_bound_methods_and_builtins(make_executor):
    ex = make_executor()
    token = tasks.Token(5)
    assert ex.submit(token.__eq__, tasks.Token(5)).result(timeout=30) is True
    assert ex.submit("-".join, ["a", "b"]).result(timeout=30) == "a-b"
    assert list(ex.map(str.upper, ["x", "y"])) == ["X", "Y"]


def test_cancel_many_while_running(make_executor):
    ex = make_executor(max_workers=2)
    futures = [ex.submit(tasks.sleep_then, 0.01, i) for i in range(60)]
    for future in futures[::2]:
        future.cancel()  # succeeds unless the task already started
    done, not_done = wait(futures, timeout=60)
    assert not not_done
    for i, future in enumerate(futures):
        if future.cancelled():
            assert i % 2 == 0
        else:
            assert future.result() == i
    assert ex.submit(tasks.square, 3).result(timeout=30) == 9


def test_shutdown_no_wait_cancel_futures(make_executor, backend):
    ex = make_executor(max_workers=1)
    running = ex.submit(tasks.sleep_then, 0.5, "ran")
    pending = [ex.submit(tasks.identity, i) for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    # A task already handed to the busy local worker runs (see test_shutdown_cancel_futures).
    assert sum(not f.cancelled() for f in pending) <= (1 if backend == "local" else 0)
    assert running.result(timeout=60) == "ran"
    done, not_done = wait([running, *pending], timeout=10)
    assert not not_done


def test_keyboard_interrupt_in_the_with_block_abandons_the_work(make_executor):
    ex = make_executor(max_workers=1)
    with pytest.raises(KeyboardInterrupt):
        with ex:
            running = ex.submit(tasks.sleep_then, 5, "too slow")
            pending = [ex.submit(tasks.identity, i) for i in range(3)]
            raise KeyboardInterrupt
    # Leaving the block did not wait for the running task: every future has ended.
    assert running.done()
    assert isinstance(running.exception(timeout=0), lambdafutures.BrokenExecutor)
    # Each was cancelled, or (the one handed to the busy local worker) ended broken too.
    assert all(f.cancelled() or isinstance(f.exception(timeout=0), lambdafutures.BrokenExecutor)
               for f in pending)
    done, not_done = wait([running, *pending], timeout=10)
    assert not not_done
    with pytest.raises((RuntimeError, lambdafutures.BrokenExecutor)):
        ex.submit(tasks.identity, 1)
