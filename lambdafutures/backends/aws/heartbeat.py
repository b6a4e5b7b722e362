"""Liveness of an executor, seen from outside: its completion queue carries a heartbeat tag.

An executor tags its own completion queue `lambdafutures:heartbeat=<unix time>` every
`interval_s` seconds while it is open. `lambdafutures gc` reads the tag: a queue whose last
beat is older than several intervals belongs to an executor that stopped (a killed host, a
closed laptop) and may be removed with its objects; a queue that beats is never touched, however
old it is. Tags, not an attribute, because SQS has no user-defined queue attributes, and
TagQueue neither changes the queue's behaviour nor counts as a message.

The tag holds the host's clock, and gc compares it with its own: the stale threshold (minutes)
must exceed both the interval and any clock skew between hosts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("lambdafutures")

HEARTBEAT_TAG = "lambdafutures:heartbeat"
DEFAULT_INTERVAL_S = 60.0
# Ten missed beats at the default interval: a slow or briefly throttled host is not dead.
DEFAULT_STALE_AFTER_S = 600.0


class QueueHeartbeat:
    """A daemon thread that tags `queue_url` with the current time every `interval_s`.

    The first beat is sent as soon as the thread starts. A failed beat is logged at DEBUG
    and tried again at the next interval: liveness is a hint for gc, never a reason to fail
    the executor. `stop()` returns promptly (the thread waits on an Event, not a sleep).
    """

    def __init__(self, sqs_client: Any, queue_url: str,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._sqs = sqs_client
        self.queue_url = queue_url
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lambdafutures-heartbeat",
                                        daemon=True)
        self.beats = 0   # successful beats, for tests and debugging

    def start(self) -> QueueHeartbeat:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop beating; waits at most `timeout` for a beat in flight to return."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def beat(self) -> bool:
        """Tag the queue once; True when the tag was written."""
        try:
            self._sqs.tag_queue(QueueUrl=self.queue_url,
                                Tags={HEARTBEAT_TAG: str(int(time.time()))})
        except Exception as exc:  # noqa: BLE001 - retried at the next interval
            log.debug("heartbeat of %s failed (next try in %gs): %s",
                      self.queue_url, self.interval_s, exc)
            return False
        self.beats += 1
        return True

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.beat()
            self._stopped.wait(self.interval_s)


def last_beat(tags: Mapping[str, str] | None) -> float | None:
    """The unix time of the queue's last heartbeat, or None when it has none (an executor
    from before heartbeats, or one that has not beaten yet)."""
    value = (tags or {}).get(HEARTBEAT_TAG)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def is_alive(tags: Mapping[str, str] | None, now: float,
             stale_after_s: float = DEFAULT_STALE_AFTER_S) -> bool:
    """True when the queue's heartbeat is at most `stale_after_s` old. False when it is older
    or missing: for a queue without a heartbeat, callers decide by the queue's age instead."""
    beat = last_beat(tags)
    return beat is not None and now - beat <= stale_after_s
