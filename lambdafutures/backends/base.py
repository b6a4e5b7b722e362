"""The three narrow interfaces a backend is made of, and the backend bundle itself.

The executor core only ever talks to these; which cloud (or none) sits behind them is the
backend's business.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol


class ObjectStore(Protocol):
    """Blobs too large to travel inline: payloads and results."""

    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, keys: Iterable[str]) -> None: ...


class Invoker(Protocol):
    """Starts one task, fire-and-forget. May block (an HTTP call); may raise."""

    def invoke(self, event: dict[str, Any]) -> None: ...


class CompletionQueue(Protocol):
    """Where workers' completion messages arrive, read by the executor's completion thread.

    `receive` returns up to `max_messages` protocol completion messages (dicts), waiting at
    most `wait` seconds for the first; `ack` tells the queue they were handled."""

    def receive(self, max_messages: int, wait: float) -> list[dict[str, Any]]: ...
    def ack(self, messages: list[dict[str, Any]]) -> None: ...


@dataclass
class Backend:
    name: str
    store: ObjectStore
    invoker: Invoker
    completions: CompletionQueue
    reply_url: str
    # Threads that call `invoker.invoke`; 0 calls it in the thread that frees a slot
    # (the submitter or the completion thread), for an invoke that never blocks.
    invoke_threads: int
    inline_limit: int
    # Host-side backstop on top of the per-task timeout, for a task nothing reports on.
    deadline_margin: float
    # The platform's own limit on a task (the Lambda function timeout), if any.
    sandbox_timeout: float | None
    default_max_workers: int
    closers: list
    # Tasks beyond max_workers that the invoker may hand to busy sandboxes (running, and no
    # longer cancellable, like ProcessPoolExecutor's EXTRA_QUEUED_CALLS).
    prefetch: int = 0
    # The concurrent executions the platform allows this function, if known (AWS: reserved
    # concurrency, else the account's unreserved).
    concurrency_limit: int | None = None
    # True where an accepted invoke may wait in the platform's own queue (Lambda's async
    # queue): events then carry an expiry, and time queued is not counted against a task.
    platform_queue: bool = False
    # True where events and completions travel pickled, not as JSON (a local worker's
    # socket): inline blobs then go as bytes, not base64.
    binary_inline: bool = False

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def take_batch(source: queue.SimpleQueue, max_items: int, wait: float) -> list[Any]:
    """Up to `max_items` from `source`, waiting at most `wait` seconds for the first."""
    try:
        items = [source.get(timeout=wait)]
    except queue.Empty:
        return []
    while len(items) < max_items:
        try:
            items.append(source.get_nowait())
        except queue.Empty:
            break
    return items
