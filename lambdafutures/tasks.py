"""The task table: the one owner of every task's attempts.

A task is one `submit` (or one chunk of `map`). It is pending (waiting for a slot), then in
flight as one numbered attempt at a time (two while a speculative backup races it), then
ended. Every decision about attempts is taken here, under the table's one lock: whether an
outcome belongs to a live attempt, whether a failed attempt is retried, whether a backup is
started, and when the task ends and passes its slot on. Callers act on the `Decision` they
get back; an outcome for an attempt that is no longer live is dropped.

`max_workers` slots (plus the backend's prefetch) bound the tasks in flight; the rest wait in
`pending`, in submission order, and can be cancelled.
"""

from __future__ import annotations

import enum
import heapq
import threading
import time
from collections import deque
from concurrent.futures import Future


class Task:
    __slots__ = ("id", "future", "calls", "batch", "payload", "blob", "payload_sha256",
                 "attempt", "retries_left", "relaunches_left", "submitted_at", "invoked_at",
                 "other_live", "speculated", "ended")

    def __init__(self, task_id: int, future: Future, payload: bytes, calls: int, batch: bool,
                 retries: int, relaunches: int) -> None:
        self.id = task_id
        self.future = future
        self.calls = calls
        self.batch = batch
        self.payload: bytes | None = payload  # dropped once it is in the store
        self.blob: dict | None = None         # the event's payload reference, once built
        self.payload_sha256 = ""
        self.attempt = 0
        self.retries_left = retries
        # Attempts the platform dropped without running them (expired in Lambda's queue) are
        # launched again without counting as retries: the task never ran.
        self.relaunches_left = relaunches
        self.submitted_at = time.time()
        self.invoked_at: float | None = None
        # While a speculative backup runs, the attempt it backs up is still live too.
        self.other_live: int | None = None
        self.speculated = False
        self.ended = False

    def is_live(self, attempt: int) -> bool:
        return not self.ended and (attempt == self.attempt or attempt == self.other_live)


class Action(enum.Enum):
    DROP = "drop"          # not a live attempt (stale, duplicate), or its twin runs on
    RELAUNCH = "relaunch"  # launch `task.attempt`, a new attempt
    FINISH = "finish"      # end the future with this outcome; the task has left the table


class Failure(enum.Enum):
    """How an attempt that did not produce the user's outcome failed."""
    FINAL = "final"          # ends the task (user exception, serialization, ...)
    RETRYABLE = "retryable"  # crash or timeout: `retries` may run it again
    NOT_RUN = "not_run"      # never ran (expired in the platform's queue)


class Decision:
    __slots__ = ("action", "next_task")

    def __init__(self, action: Action, next_task: Task | None = None) -> None:
        self.action = action
        self.next_task = next_task  # FINISH: the pending task that takes the freed slot


_DROP = Decision(Action.DROP)
_RELAUNCH = Decision(Action.RELAUNCH)


class TaskTable:
    def __init__(self, slots: int) -> None:
        self.lock = threading.Lock()
        self.slots = slots
        self.in_flight = 0
        self.tasks: dict[int, Task] = {}
        self.pending: deque[Task] = deque()
        self._deadlines: list[tuple[float, int, int]] = []

    def add(self, task: Task) -> bool:
        """Enter a new task; True when it has a slot and should be launched now."""
        with self.lock:
            self.tasks[task.id] = task
            if self.in_flight < self.slots:
                self.in_flight += 1
                return True
            self.pending.append(task)
            return False

    def live(self, task_id: int, attempt: int) -> Task | None:
        """The task whose live attempt this is, or None (a duplicate, stale or foreign one)."""
        with self.lock:
            task = self.tasks.get(task_id)
            return task if task is not None and task.is_live(attempt) else None

    def conclude(self, task: Task, attempt: int, failure: Failure | None) -> Decision:
        """An attempt has an outcome (`failure` None: it produced the user's result or
        exception). Decide what follows, under the lock, so that two outcomes of one task
        (a late invoke error and a deadline, twin attempts) cannot both act."""
        with self.lock:
            if not task.is_live(attempt):
                return _DROP
            if failure is not None and failure is not Failure.FINAL:
                if task.other_live is not None:
                    # One of two racing attempts failed; the other may still finish.
                    if attempt == task.other_live:
                        task.other_live = None
                    else:
                        task.attempt, task.other_live = task.other_live, None
                    return _DROP
                if failure is Failure.NOT_RUN and task.relaunches_left > 0:
                    task.relaunches_left -= 1
                    task.attempt += 1
                    return _RELAUNCH
                if failure is Failure.RETRYABLE and task.retries_left > 0:
                    task.retries_left -= 1
                    task.attempt += 1
                    return _RELAUNCH
            return Decision(Action.FINISH, self._end(task))

    def speculate(self, task: Task) -> bool:
        """Start a backup attempt of `task` (it becomes `task.attempt`); False if the task
        ended or already has one."""
        with self.lock:
            if task.ended or task.other_live is not None:
                return False
            task.speculated = True
            task.other_live = task.attempt
            task.attempt += 1
            return True

    def drop_cancelled(self, task: Task) -> Task | None:
        """A task whose future was cancelled before launch leaves; returns the next one."""
        with self.lock:
            return None if task.ended else self._end(task)

    def _end(self, task: Task) -> Task | None:
        task.ended = True
        del self.tasks[task.id]
        while self.pending:
            nxt = self.pending.popleft()
            if not nxt.future.cancelled():
                return nxt
            # CANCELLED -> CANCELLED_AND_NOTIFIED: only then do wait() and as_completed()
            # count it as done (the stdlib executors do this when they dequeue it).
            nxt.future.set_running_or_notify_cancel()
            nxt.ended = True
            del self.tasks[nxt.id]
        self.in_flight -= 1
        return None

    def cancel_pending(self) -> list[Task]:
        with self.lock:
            cancelled = list(self.pending)
            self.pending.clear()
            for task in cancelled:
                task.ended = True
                del self.tasks[task.id]
        return cancelled

    def take_all(self) -> list[Task]:
        """Remove and return every task (the executor is broken or abandoned)."""
        with self.lock:
            tasks = list(self.tasks.values())
            for task in tasks:
                task.ended = True
            self.tasks.clear()
            self.pending.clear()
            self.in_flight = 0
        return tasks

    def __len__(self) -> int:
        return len(self.tasks)

    # -- host-side deadlines (the backstop when nothing reports a task's end) ------------------

    def set_deadline(self, task: Task, attempt: int, deadline: float) -> None:
        with self.lock:
            if task.is_live(attempt):
                heapq.heappush(self._deadlines, (deadline, task.id, attempt))

    def expired(self, now: float) -> list[tuple[Task, int]]:
        """The live (task, attempt) pairs whose deadline has passed."""
        late = []
        with self.lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, task_id, attempt = heapq.heappop(self._deadlines)
                task = self.tasks.get(task_id)
                if task is not None and task.is_live(attempt):
                    late.append((task, attempt))
        return late

    def running(self) -> list[Task]:
        with self.lock:
            return [task for task in self.tasks.values() if task.invoked_at is not None]
