"""The local backend: the worker code in local processes, no AWS account or server needed.

The object store is a temporary directory (in memory when /dev/shm is roomy; removed at
shutdown) and completions come back through the worker pool's sockets, which the executor's
completion thread reads itself (`receive` polls the pool), so a completion reaches its
future without a thread hop. When the pool sees a worker die or run out of time, it writes
the failure completion that Lambda's failure destination would carry on AWS.

Parts: pool.py (the worker processes and their sockets), processes.py (starting them, and how
many a machine runs), store.py (the store directory, and those of hosts that died);
handler/local_worker.py is the worker's side and handler/frames.py the codec both use.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
from typing import Any

from lambdafutures_handler import protocol
from lambdafutures_handler.transport import FileStore

from ..base import Backend, take_batch
from .pool import WorkerPool
from .processes import PROCESSES_PER_CPU, process_cap
from .store import new_store_root, remove_stale_roots

log = logging.getLogger("lambdafutures")

_KILL_GRACE_S = 2.0
# Worker processes started ahead of need when the backend opens, per CPU: a few, so that the
# first tasks find warm workers; more would compete for the CPUs with the first tasks.
_PRESTART_PER_CPU = 1


class LocalCompletionQueue:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.pool: WorkerPool | None = None  # read by `receive`, when set

    def put(self, message: dict[str, Any]) -> None:
        self._queue.put(message)

    def report_failure(self, event: dict[str, Any], kind: str, message: str) -> None:
        self._queue.put(protocol.make_hint(event, kind, message))

    def receive(self, max_messages: int, wait: float) -> list[dict[str, Any]]:
        if self.pool is not None and self._queue.empty():
            self.pool.poll(wait)  # passes what workers said to `put` / `report_failure`
            wait = 0.0
        return take_batch(self._queue, max_messages, wait)

    def ack(self, messages: list[dict[str, Any]]) -> None:
        """Nothing to do: a local message cannot be delivered twice."""


def open_local_backend(
    *,
    max_workers: int,
    timeout: float | None,
    blas_threads: int | None = 1,
    inline_limit: int | None = None,
    worker_env: dict[str, str] | None = None,
    store_dir: str | None = None,
) -> Backend:
    remove_stale_roots(store_dir)
    root = new_store_root(store_dir)
    store = FileStore(root)
    completions = LocalCompletionQueue()
    # The worker reports a timeout itself at `timeout`; killing the process a little later
    # is the backstop for a call that holds the GIL so the worker's watchdog cannot run.
    sandbox_timeout = None if timeout is None else timeout + _KILL_GRACE_S
    processes = min(max_workers, process_cap())
    if processes < max_workers:
        log.info("local backend: max_workers=%d is more than %d processes per CPU on this "
                 "machine; running %d worker processes (the other tasks in flight wait in "
                 "the pool's queue)", max_workers, PROCESSES_PER_CPU, processes)
    pool = WorkerPool(processes, timeout=sandbox_timeout, on_frame=completions.put,
                      on_failure=completions.report_failure, blas_threads=blas_threads,
                      env=worker_env, thread=False, depth=2,
                      prestart=min(processes, _PRESTART_PER_CPU * (os.cpu_count() or 1)))
    completions.pool = pool
    # A task in flight may wait in the pool's queue for `queued_rounds` tasks to run before
    # it (at most `timeout` each) when there are fewer processes than max_workers; the
    # executor's deadline must leave it that long.
    queued_rounds = -(-max(0, max_workers - processes) // processes)
    deadline_margin = 5.0 + (queued_rounds * sandbox_timeout if sandbox_timeout else 0.0)
    return Backend(
        name="local",
        store=store,
        invoker=pool,
        completions=completions,
        reply_url="local:",
        # Handing an event to a local worker is a socket write that never blocks, so it
        # happens in the thread that frees the slot: no invoker thread, no thread hop.
        invoke_threads=0,
        inline_limit=inline_limit or protocol.inline_limit(),
        deadline_margin=deadline_margin,
        sandbox_timeout=sandbox_timeout,
        default_max_workers=default_max_workers(),
        closers=[lambda: shutil.rmtree(root, ignore_errors=True), pool.close],
        # Each busy worker process also holds the next task, so that it goes on without
        # waiting for the host: a round trip saved per task, which is most of a small
        # task's cost. Like ProcessPoolExecutor's EXTRA_QUEUED_CALLS (process.py), this is a
        # trade-off: the executor counts such a task in flight, so it is running and cannot
        # be cancelled although it may wait for the task before it. More held tasks would
        # keep workers busier and make cancel() succeed less often; none would leave each
        # worker idle for a round trip between tasks.
        prefetch=processes,
        # Events and completions cross the worker's socket pickled (handler/frames.py).
        binary_inline=True,
    )


def default_max_workers() -> int:
    return os.cpu_count() or 1
