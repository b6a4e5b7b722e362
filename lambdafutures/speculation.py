"""Speculative execution: a second attempt for stragglers, the first completion wins.

A few slow sandboxes (a noisy neighbour, a slow S3 read, a cold start on a busy host) can
hold a whole map hostage. Once most tasks have finished, a task that has been running much
longer than the typical one is invoked again; whichever attempt completes first ends the
future and the other one's completion is ignored, like any stale attempt.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .tasks import Task


@dataclass(frozen=True)
class Speculation:
    """Opt-in policy: `LambdaExecutor(speculation=Speculation(after=0.75, slower_than=3))`.

    Args:
        after: fraction of submitted tasks that must have finished before any backup starts.
        slower_than: a running task gets one backup attempt once it has run this many
            times longer than the median finished task.
        min_finished: finished tasks needed for a meaningful median.
    """

    after: float = 0.75
    slower_than: float = 3.0
    min_finished: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.after <= 1:
            raise ValueError("Speculation.after must be in (0, 1]")
        if self.slower_than <= 1:
            raise ValueError("Speculation.slower_than must be greater than 1")


class StragglerWatch:
    """Keeps the recent run times and picks the tasks that deserve a backup attempt."""

    _CHECK_EVERY_S = 0.25

    def __init__(self, policy: Speculation) -> None:
        self.policy = policy
        self.submitted = 0
        self.finished = 0
        self._durations: deque[float] = deque(maxlen=1000)
        self._next_check = 0.0
        # Submitters, the completion thread and reader threads count here.
        self._lock = threading.Lock()

    def submitted_one(self) -> None:
        with self._lock:
            self.submitted += 1

    def finished_in(self, seconds: float | None) -> None:
        with self._lock:
            self.finished += 1
            if seconds is not None:
                self._durations.append(seconds)

    def stragglers(self, running: Iterable[Task]) -> list[Task]:
        now = time.monotonic()
        if now < self._next_check:
            return []
        self._next_check = now + self._CHECK_EVERY_S
        with self._lock:
            if (self.finished < self.policy.after * self.submitted
                    or len(self._durations) < self.policy.min_finished):
                return []
            limit = self.policy.slower_than * statistics.median(self._durations)
        wall = time.time()
        return [task for task in running
                if task.invoked_at is not None and task.other_live is None
                and not task.speculated and wall - task.invoked_at > limit]
