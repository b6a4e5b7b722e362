"""The local backend: the worker code in local processes, no AWS account or server needed.

The object store is a temporary directory (in memory when /dev/shm is roomy; removed at
shutdown) and completions come back through the worker pool's sockets, which the executor's
completion thread reads itself (`receive` polls the pool), so a completion reaches its
future without a thread hop. When the pool sees a worker die or run out of time, it writes
the failure completion that Lambda's failure destination would carry on AWS.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
from typing import Any

from lambdafutures_handler import protocol
from lambdafutures_handler.transport import FileStore

from ..base import Backend, take_batch
from .pool import WorkerPool

_KILL_GRACE_S = 2.0


class LocalCompletionQueue:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.pool: WorkerPool | None = None  # read by `receive`, when set

    def put(self, message: dict[str, Any]) -> None:
        self._queue.put(message)

    def report_failure(self, event: dict[str, Any], kind: str, message: str) -> None:
        self._queue.put(protocol.failure_completion(event, kind, message))

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
    root = _store_root(store_dir)
    store = FileStore(root)
    completions = LocalCompletionQueue()
    # The worker reports a timeout itself at `timeout`; killing the process a little later
    # is the backstop for a call that holds the GIL so the worker's watchdog cannot run.
    sandbox_timeout = None if timeout is None else timeout + _KILL_GRACE_S
    pool = WorkerPool(max_workers, timeout=sandbox_timeout, on_frame=completions.put,
                      on_failure=completions.report_failure, blas_threads=blas_threads,
                      env=worker_env, thread=False, depth=2, claims_dir=root)
    completions.pool = pool
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
        deadline_margin=5.0,
        sandbox_timeout=sandbox_timeout,
        default_max_workers=default_max_workers(),
        closers=[lambda: shutil.rmtree(root, ignore_errors=True), pool.close],
        # Each busy worker holds the next event too, so it goes on without waiting for the
        # host; that task stays cancellable until the worker takes it.
        prefetch=max_workers,
    )


# Free space that makes /dev/shm the default home of task objects.
_SHM_MIN_FREE = 2 * 1024 ** 3


def _store_root(store_dir: str | None) -> str:
    """A new directory for payloads and results too large to travel inline: in `store_dir`
    if given, else in /dev/shm when it is roomy and TMPDIR names no other place, else in
    the temporary directory. An object lives only from its writer to its one reader, and on a
    disk file system creating each file can cost a millisecond; in memory it costs little."""
    if store_dir is None and "TMPDIR" not in os.environ and _roomy("/dev/shm"):
        try:
            return tempfile.mkdtemp(prefix="lambdafutures-", dir="/dev/shm")
        except OSError:
            pass  # not usable after all: the temporary directory below
    return tempfile.mkdtemp(prefix="lambdafutures-", dir=store_dir)


def _roomy(path: str) -> bool:
    try:
        space = os.statvfs(path)
    except (OSError, AttributeError):  # no such directory, or no statvfs (Windows)
        return False
    return os.access(path, os.W_OK) and space.f_bavail * space.f_frsize >= _SHM_MIN_FREE


def default_max_workers() -> int:
    return os.cpu_count() or 1
