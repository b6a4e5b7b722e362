"""The local backend hands each busy worker its next task too (so the worker goes on without
waiting for the host). As with ProcessPoolExecutor's queued calls, such a task is running:
cancel() fails. A task still waiting on the host can be cancelled and then never runs; no
task runs twice, even when its worker dies."""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from concurrent.futures import CancelledError, wait

import pytest

import lambdafutures


def _mark(directory: str, index: int, delay: float) -> int:
    """Record one run of task `index` (one file per run), then sleep `delay` seconds."""
    with open(os.path.join(directory, f"{index}.{uuid.uuid4().hex}"), "w"):
        pass
    time.sleep(delay)
    return index


def _wait_for(path: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)


def _mark_then_exit_on(directory: str, index: int, go: str) -> None:
    """Record a run, wait until `go` exists, then end the worker process abruptly."""
    _mark(directory, index, 0.0)
    _wait_for(go)
    os._exit(3)


def _runs(directory: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in os.listdir(directory):
        index = int(name.split(".")[0])
        counts[index] = counts.get(index, 0) + 1
    return counts


def _check(futures, directory: str) -> None:
    """Cancelled tasks never ran; every other task ran exactly once and returned its index."""
    done, not_done = wait(futures, timeout=120)
    assert not not_done
    runs = _runs(directory)
    for index, future in enumerate(futures):
        if future.cancelled():
            assert index not in runs, f"task {index} was cancelled but ran"
            with pytest.raises(CancelledError):
                future.result(timeout=0)
        else:
            assert future.result(timeout=0) == index
            assert runs.get(index) == 1, f"task {index} ran {runs.get(index, 0)} times"


def test_a_task_handed_to_a_busy_worker_is_running_and_not_cancellable(tmp_path):
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local") as ex:
        first = ex.submit(_mark, str(tmp_path), 0, 0.5)
        held = ex.submit(_mark, str(tmp_path), 1, 0.0)  # handed to the busy worker
        queued = ex.submit(_mark, str(tmp_path), 2, 0.0)  # waits on the host
        assert held.running() and not held.cancel() and not held.cancelled()
        assert not queued.running() and queued.cancel() and queued.cancelled()
        assert first.result(timeout=30) == 0
        assert held.result(timeout=30) == 1
        # The cancelled task's slot serves new work.
        assert ex.submit(_mark, str(tmp_path), 3, 0.0).result(timeout=30) == 3
    _check([first, held, queued], str(tmp_path))


@pytest.mark.parametrize("seed", range(3))
def test_cancel_races_with_workers_taking_tasks(tmp_path, seed):
    rng = random.Random(seed)
    with lambdafutures.LambdaExecutor(max_workers=2, backend="local") as ex:
        futures = [ex.submit(_mark, str(tmp_path), i, rng.choice([0.0, 0.0, 0.001, 0.01]))
                   for i in range(300)]
        order = list(range(len(futures)))
        rng.shuffle(order)
        answers: dict[int, bool] = {}

        def cancel_some(indices: list[int]) -> None:
            for index in indices:
                answers[index] = futures[index].cancel()
                if rng.random() < 0.1:
                    time.sleep(0.001)

        threads = [threading.Thread(target=cancel_some, args=(order[n:150:2],))
                   for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _check(futures, str(tmp_path))
        for index, cancelled in answers.items():
            assert futures[index].cancelled() == cancelled
        assert ex.submit(_mark, str(tmp_path), 1000, 0.0).result(timeout=30) == 1000


def test_shutdown_cancel_futures_cancels_only_tasks_waiting_on_the_host(tmp_path):
    ex = lambdafutures.LambdaExecutor(max_workers=2, backend="local")
    futures = [ex.submit(_mark, str(tmp_path), i, 0.3 if i < 2 else 0.0) for i in range(8)]
    # Two run and two are held at the busy workers (running too); four wait on the host.
    assert [f.running() for f in futures] == [True] * 4 + [False] * 4
    ex.shutdown(wait=True, cancel_futures=True)
    assert [f.cancelled() for f in futures] == [False] * 4 + [True] * 4
    _check(futures, str(tmp_path))


def test_a_task_held_behind_a_crashing_one_runs_elsewhere_exactly_once(tmp_path):
    runs, go = tmp_path / "runs", str(tmp_path / "go")
    runs.mkdir()
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local") as ex:
        crash = ex.submit(_mark_then_exit_on, str(runs), 0, go)
        held = ex.submit(_mark, str(runs), 1, 0.0)  # waits in the doomed worker's socket
        after = [ex.submit(_mark, str(runs), i, 0.0) for i in range(2, 5)]
        assert held.running()
        with open(go, "w"):
            pass
        with pytest.raises(lambdafutures.WorkerCrashed):
            crash.result(timeout=30)
        assert held.result(timeout=30) == 1
        assert [f.result(timeout=30) for f in after] == [2, 3, 4]
    assert _runs(str(runs)) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}


def _mark_then_exit(directory: str, index: int) -> None:
    _mark(directory, index, 0.0)
    os._exit(3)


def test_a_crash_in_a_held_task_after_it_started_runs_nothing_twice(tmp_path):
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local") as ex:
        first = ex.submit(_mark, str(tmp_path), 0, 0.2)
        crash = ex.submit(_mark_then_exit, str(tmp_path), 1)  # held behind the first one
        after = [ex.submit(_mark, str(tmp_path), i, 0.0) for i in range(2, 6)]
        assert first.result(timeout=30) == 0
        with pytest.raises(lambdafutures.WorkerCrashed):
            crash.result(timeout=30)
        assert [f.result(timeout=30) for f in after] == list(range(2, 6))
    assert _runs(str(tmp_path)) == {i: 1 for i in range(6)}


def test_a_task_held_behind_a_timed_out_one_runs_exactly_once(tmp_path):
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local", timeout=1.0) as ex:
        late = ex.submit(_mark, str(tmp_path), 0, 30.0)
        held = ex.submit(_mark, str(tmp_path), 1, 0.0)
        with pytest.raises(lambdafutures.TaskTimeout):
            late.result(timeout=30)
        assert held.result(timeout=30) == 1
    assert _runs(str(tmp_path)) == {0: 1, 1: 1}


def _echo(data: bytes) -> bytes:
    return data[::-1]


@pytest.mark.parametrize("size", [10_000, 120_000, 180_000])
def test_large_inline_arguments_and_results_pass_busy_workers(size):
    """Events held at busy workers and results sent back meanwhile, both near the inline
    limit: neither side's send waits on the other."""
    blobs = [os.urandom(size) for _ in range(3)]
    with lambdafutures.LambdaExecutor(max_workers=1, backend="local") as ex:
        futures = [ex.submit(_echo, blobs[i % 3]) for i in range(30)]
        assert [f.result(timeout=60) for f in futures] == [blobs[i % 3][::-1]
                                                            for i in range(30)]
