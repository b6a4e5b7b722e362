"""Per-task statistics, reachable from every completed future with `stats_of(future)`.

Times are wall-clock seconds (`time.time()`), so host and worker stamps are comparable to
within the machines' clock skew.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

# Kept beside the future, never on it: a Future is the stdlib's and stays as it is.
_stats: weakref.WeakKeyDictionary[Future, TaskStats] = weakref.WeakKeyDictionary()
_outputs: weakref.WeakKeyDictionary[Future, str] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass(frozen=True)
class TaskStats:
    task: int
    attempt: int
    calls: int
    host_submit: float
    invoked: float | None
    job_start: float | None
    setup_done: float | None
    job_done: float | None
    result_received: float
    worker_id: str | None
    cold_start: bool | None
    billed_ms: int | None
    memory_limit_mb: int | None
    peak_memory_mb: float | None
    status: str
    # When the worker sent its completion (same clock caveat as above): result_received -
    # sent_at is the completion path's latency (queue, receive, host handling).
    sent_at: float | None = None

    @property
    def queue_time(self) -> float | None:
        """Seconds from submit until the worker started."""
        return None if self.job_start is None else self.job_start - self.host_submit

    @property
    def setup_time(self) -> float | None:
        """Seconds the worker spent loading the payload."""
        if self.job_start is None or self.setup_done is None:
            return None
        return self.setup_done - self.job_start

    @property
    def run_time(self) -> float | None:
        """Seconds the function itself ran."""
        if self.setup_done is None or self.job_done is None:
            return None
        return self.job_done - self.setup_done

    @property
    def total_time(self) -> float:
        """Seconds from submit until the host had the result."""
        return self.result_received - self.host_submit


def stats_of(future: Future) -> TaskStats | None:
    """The TaskStats of a future from a LambdaExecutor, once it is done; else None.

    A cancelled future, one that never started, or one from another executor has none."""
    with _lock:
        entry = _stats.get(future)
    if entry is None or isinstance(entry, TaskStats):
        return entry
    stats = from_message(**entry)  # built when first asked for, not for every task
    with _lock:
        _stats[future] = stats
    return stats


def output_of(future: Future) -> str:
    """What the task printed (stdout and stderr, and its logging records), up to the
    executor's `output_limit` (its tail), once the future is done; "" if nothing."""
    with _lock:
        return _outputs.get(future, "")


def attach(future: Future, stats: TaskStats | dict[str, Any]) -> None:
    """Keep `stats` for `future`: a TaskStats, or the keyword arguments of `from_message`."""
    with _lock:
        _stats[future] = stats


def attach_output(future: Future, output: str) -> None:
    with _lock:
        _outputs[future] = output


def from_message(
    *, task: int, attempt: int, calls: int, host_submit: float, invoked: float | None,
    received: float, status: str, worker: dict[str, Any] | None,
) -> TaskStats:
    worker = worker or {}
    return TaskStats(
        task=task, attempt=attempt, calls=calls, host_submit=host_submit, invoked=invoked,
        job_start=worker.get("job_start"), setup_done=worker.get("setup_done"),
        job_done=worker.get("job_done"), result_received=received,
        worker_id=worker.get("worker_id"), cold_start=worker.get("cold_start"),
        billed_ms=worker.get("billed_ms"), memory_limit_mb=worker.get("memory_limit_mb"),
        peak_memory_mb=worker.get("peak_memory_mb"), status=status,
        sent_at=worker.get("sent_at"),
    )


def collect(futures: Iterable[Future]) -> list[TaskStats]:
    """The stats of those futures that have them."""
    found = (stats_of(future) for future in futures)
    return [stats for stats in found if stats is not None]
