"""The local backend holds the next event at each busy worker (so the worker goes on without
waiting for the host); those tasks must still behave as not started: cancel() withdraws them,
and a task whose cancel() returned True never runs."""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import CancelledError, wait

import pytest

import lambdafutures


def _mark(directory: str, index: int, delay: float) -> int:
    with open(os.path.join(directory, str(index)), "w"):
        pass
    time.sleep(delay)
    return index


def _check(futures, directory: str) -> None:
    done, not_done = wait(futures, timeout=120)
    assert not not_done
    for index, future in enumerate(futures):
        ran = os.path.exists(os.path.join(directory, str(index)))
        if future.cancelled():
            assert not ran, f"task {index} was cancelled but ran"
            with pytest.raises(CancelledError):
                future.result(timeout=0)
        else:
            assert future.result(timeout=0) == index
            assert ran


def test_a_task_waiting_at_a_busy_worker_can_be_cancelled(tmp_path):
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local") as ex:
        first = ex.submit(_mark, str(tmp_path), 0, 1.0)
        second = ex.submit(_mark, str(tmp_path), 1, 0.0)  # held at the busy worker
        third = ex.submit(_mark, str(tmp_path), 2, 0.0)  # pending on the host
        time.sleep(0.3)
        assert first.running()
        assert second.cancel() and second.cancelled()
        assert third.cancel()
        assert first.result(timeout=30) == 0
        # The slots the cancelled tasks held serve new work.
        assert ex.submit(_mark, str(tmp_path), 3, 0.0).result(timeout=30) == 3
    _check([first, second, third], str(tmp_path))


def test_a_started_task_cannot_be_cancelled(tmp_path):
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local") as ex:
        first = ex.submit(_mark, str(tmp_path), 0, 0.05)
        second = ex.submit(_mark, str(tmp_path), 1, 1.0)
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(tmp_path, "1")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not second.cancel()
        assert second.result(timeout=30) == 1
    _check([first, second], str(tmp_path))


@pytest.mark.parametrize("seed", range(3))
def test_cancel_races_with_workers_taking_tasks(tmp_path, seed):
    rng = random.Random(seed)
    with lambdafutures.LambdaExecutor(max_workers=2, backend="local") as ex:
        futures = [ex.submit(_mark, str(tmp_path), i, rng.choice([0.0, 0.0, 0.001, 0.01]))
                   for i in range(300)]
        order = list(range(len(futures)))
        rng.shuffle(order)

        def cancel_some() -> None:
            for index in order[:150]:
                futures[index].cancel()
                if rng.random() < 0.1:
                    time.sleep(0.001)

        threads = [threading.Thread(target=cancel_some) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _check(futures, str(tmp_path))
        assert ex.submit(_mark, str(tmp_path), 1000, 0.0).result(timeout=30) == 1000


def test_shutdown_cancel_futures_withdraws_held_tasks(tmp_path):
    ex = lambdafutures.LambdaExecutor(max_workers=2, backend="local")
    futures = [ex.submit(_mark, str(tmp_path), i, 0.5 if i < 2 else 0.0) for i in range(8)]
    time.sleep(0.2)
    ex.shutdown(wait=True, cancel_futures=True)
    assert [f.cancelled() for f in futures] == [False] * 2 + [True] * 6
    _check(futures, str(tmp_path))


def test_a_crash_passes_held_tasks_on(tmp_path):
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local") as ex:
        crash = ex.submit(os._exit, 3)
        after = [ex.submit(_mark, str(tmp_path), i, 0.0) for i in range(5)]
        with pytest.raises(lambdafutures.WorkerCrashed):
            crash.result(timeout=30)
        assert [f.result(timeout=30) for f in after] == list(range(5))


def _mark_then_exit(directory: str, index: int) -> None:
    with open(os.path.join(directory, str(index)), "w"):
        pass
    os._exit(3)


def test_a_crash_behind_a_held_task_runs_nothing_twice(tmp_path):
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local") as ex:
        first = ex.submit(_mark, str(tmp_path), 0, 0.2)
        crash = ex.submit(_mark_then_exit, str(tmp_path), 1)  # held behind the first one
        after = [ex.submit(_mark, str(tmp_path), i, 0.0) for i in range(2, 6)]
        assert first.result(timeout=30) == 0
        with pytest.raises(lambdafutures.WorkerCrashed):
            crash.result(timeout=30)
        assert [f.result(timeout=30) for f in after] == list(range(2, 6))
    assert sorted(os.listdir(tmp_path)) == sorted(str(i) for i in range(6))
