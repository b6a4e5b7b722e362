"""The task table: every task not yet ended, the ones waiting for a slot, and the slots.

One lock guards it all. `max_workers` slots bound the tasks in flight (handed to an invoker
and not yet ended); the rest wait in `pending`, in submission order, and can be cancelled.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from concurrent.futures import Future


class Task:
    __slots__ = ("id", "future", "calls", "batch", "payload", "blob", "sig", "attempt",
                 "retries_left", "submitted_at", "invoked_at", "deadline", "other_live",
                 "speculated")

    def __init__(self, task_id: int, future: Future, payload: bytes, calls: int, batch: bool,
                 retries: int) -> None:
        self.id = task_id
        self.future = future
        self.calls = calls
        self.batch = batch
        self.payload: bytes | None = payload  # dropped once `blob` is built
        self.blob: dict[str, str] | None = None
        self.sig = ""
        self.attempt = 0
        self.retries_left = retries
        self.submitted_at = time.time()
        self.invoked_at: float | None = None
        self.deadline: float | None = None
        # While a speculative backup runs, the attempt it backs up is still live too.
        self.other_live: int | None = None
        self.speculated = False

    def is_live(self, attempt: int) -> bool:
        return attempt == self.attempt or attempt == self.other_live


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

    def current(self, task_id: int, attempt: int) -> Task | None:
        """The task a completion is about, or None if it is a duplicate or stale."""
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or not task.is_live(attempt):
                return None
            return task

    def end(self, task: Task) -> Task | None:
        """Forget an ended task and pass its slot on; returns the task to launch next."""
        with self.lock:
            if self.tasks.pop(task.id, None) is None:
                return None
            return self._release()

    def _release(self) -> Task | None:
        while self.pending:
            nxt = self.pending.popleft()
            if not nxt.future.cancelled():
                return nxt
            # CANCELLED -> CANCELLED_AND_NOTIFIED: only then do wait() and as_completed()
            # count it as done (the stdlib executors do this when they dequeue it).
            nxt.future.set_running_or_notify_cancel()
            del self.tasks[nxt.id]
        self.in_flight -= 1
        return None

    def cancel_pending(self) -> list[Task]:
        with self.lock:
            cancelled = list(self.pending)
            self.pending.clear()
            for task in cancelled:
                del self.tasks[task.id]
        return cancelled

    def take_all(self) -> list[Task]:
        """Remove and return every task (the executor is broken or abandoned)."""
        with self.lock:
            tasks = list(self.tasks.values())
            self.tasks.clear()
            self.pending.clear()
            self.in_flight = 0
        return tasks

    def __len__(self) -> int:
        return len(self.tasks)

    # -- host-side deadlines (the backstop when nothing reports a task's end) ------------------

    def set_deadline(self, task: Task, attempt: int, deadline: float) -> None:
        with self.lock:
            task.deadline = deadline
            heapq.heappush(self._deadlines, (deadline, task.id, attempt))

    def expired(self, now: float) -> list[tuple[Task, int]]:
        """The (task, attempt) pairs whose deadline has passed."""
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

