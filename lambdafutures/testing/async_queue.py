"""Lambda's asynchronous-invoke queue, with its concurrency limits, as harsh as Lambda's.

An `Invoke(InvocationType="Event")` is accepted (202) into the queue whatever the load. An
event runs when a concurrency slot is free: a function with reserved concurrency runs at
most that many at once; the others share the account's unreserved concurrency (the account
limit minus every reservation). An event that finds no slot is throttled and goes back to
the queue with Lambda's backoff: 1 s after the first throttle, doubling up to 5 minutes.
A slot that frees meanwhile is not offered to it, which is how queued events come to wait
far longer than the work ahead of them. (Lambda documents no jitter; each delay here is
drawn from 75-100% of the documented one, so that throttled events do not all come back
in the same instant, and never later than Lambda's.) An event older than the function's
MaximumEventAgeInSeconds is dropped to the failure destination (EventAgeExceeded); a
function error is retried MaximumRetryAttempts times (1 then 2 minutes later) before it is
(RetriesExhausted). `time_scale` multiplies Lambda's backoff and retry delays (not the event
age, which is the function's or the endpoint's override), so that tests run in seconds.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from .sandboxes import OK, Outcome

log = logging.getLogger("lambdafutures")

THROTTLE_BACKOFF_FIRST_S = 1.0
THROTTLE_BACKOFF_MAX_S = 300.0
ERROR_RETRY_DELAYS_S = (60.0, 120.0)


@dataclass
class QueueSettings:
    """What the queue needs to know about a function (from moto, cached by the endpoint)."""

    reserved: int | None      # reserved concurrency, None: shares the unreserved pool
    max_event_age_s: float
    max_retries: int


@dataclass(order=True)
class QueuedEvent:
    due: float
    seq: int
    function: str = field(compare=False)
    region: str = field(compare=False)
    body: bytes = field(compare=False)
    accepted_at: float = field(compare=False)  # monotonic
    request_id: str = field(compare=False, default_factory=lambda: str(uuid.uuid4()))
    throttles: int = field(compare=False, default=0)
    invokes: int = field(compare=False, default=0)
    last_outcome: Outcome | None = field(compare=False, default=None)


# run(event, done): start the event on a sandbox; call done(outcome) when it ends.
Runner = Callable[[QueuedEvent, Callable[[Outcome], None]], None]
# drop(event, condition): post the failure record (condition: EventAgeExceeded, ...).
Dropper = Callable[[QueuedEvent, str], None]


class AsyncQueue:
    def __init__(self, *, account_concurrency: int, settings: Callable[[str, str], QueueSettings],
                 reserved_total: Callable[[str], int], run: Runner, drop: Dropper,
                 time_scale: float = 1.0, seed: int | None = 0) -> None:
        self.account_concurrency = account_concurrency
        self._settings = settings
        self._reserved_total = reserved_total
        self._run = run
        self._drop = drop
        self.time_scale = time_scale
        self._random = random.Random(seed)
        self._cond = threading.Condition()
        self._heap: list[QueuedEvent] = []
        self._seq = itertools.count()
        self._running: dict[tuple[str, str], int] = defaultdict(int)  # (region, function)
        self._unreserved_running: dict[str, int] = defaultdict(int)   # region
        self.peak_running: dict[tuple[str, str], int] = defaultdict(int)
        self.throttles = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._dispatch, name="lambda-async-queue",
                                        daemon=True)
        self._thread.start()

    def accept(self, region: str, function: str, body: bytes) -> str:
        """Queue an event; returns its request id."""
        now = time.monotonic()
        event = QueuedEvent(now, next(self._seq), function, region, body, now)
        with self._cond:
            heapq.heappush(self._heap, event)
            self._cond.notify_all()
        return event.request_id

    def running(self, region: str, function: str) -> int:
        with self._cond:
            return self._running[(region, function)]

    def queued(self) -> int:
        with self._cond:
            return len(self._heap)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._heap.clear()
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # -- the dispatcher -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._heap
                                              or self._heap[0].due > time.monotonic()):
                    wait = self._heap[0].due - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._stopping:
                    return
                event = heapq.heappop(self._heap)
            try:
                self._attempt(event)
            except Exception:  # noqa: BLE001 - one bad event must not stop the queue
                log.exception("lambda endpoint: async event %s failed to dispatch",
                              event.request_id)

    def _attempt(self, event: QueuedEvent) -> None:
        settings = self._settings(event.region, event.function)
        now = time.monotonic()
        expires = event.accepted_at + settings.max_event_age_s
        if now >= expires:
            self._drop(event, "EventAgeExceeded")
            return
        if not self._take_slot(event, settings):
            with self._cond:
                self.throttles += 1
            self._back_off(event, now, expires)
            return
        event.invokes += 1  # before it starts: it may end (and _done read this) at once
        try:
            self._run(event, lambda outcome: self._done(event, settings, outcome))
        except Exception:  # noqa: BLE001 - a 5xx of Lambda's own: retried as a throttle is
            log.warning("lambda endpoint: could not start event %s; it goes back to the queue",
                        event.request_id, exc_info=True)
            event.invokes -= 1
            self._give_slot(event, settings)
            self._back_off(event, now, expires)

    def _back_off(self, event: QueuedEvent, now: float, expires: float) -> None:
        event.throttles += 1
        backoff = min(THROTTLE_BACKOFF_FIRST_S * 2 ** (event.throttles - 1),
                      THROTTLE_BACKOFF_MAX_S) * self.time_scale
        backoff *= self._random.uniform(0.75, 1.0)
        self._requeue(event, min(now + backoff, expires))

    def _take_slot(self, event: QueuedEvent, settings: QueueSettings) -> bool:
        key = (event.region, event.function)
        with self._cond:
            if settings.reserved is not None:
                if self._running[key] >= settings.reserved:
                    return False
            else:
                unreserved = self.account_concurrency - self._reserved_total(event.region)
                if self._unreserved_running[event.region] >= unreserved:
                    return False
                self._unreserved_running[event.region] += 1
            self._running[key] += 1
            self.peak_running[key] = max(self.peak_running[key], self._running[key])
            return True

    def _give_slot(self, event: QueuedEvent, settings: QueueSettings) -> None:
        with self._cond:
            self._running[(event.region, event.function)] -= 1
            if settings.reserved is None:
                self._unreserved_running[event.region] -= 1
            self._cond.notify_all()

    def _done(self, event: QueuedEvent, settings: QueueSettings, outcome: Outcome) -> None:
        self._give_slot(event, settings)
        event.last_outcome = outcome
        if outcome.kind == OK:
            return
        if event.invokes <= settings.max_retries:
            delay = ERROR_RETRY_DELAYS_S[min(event.invokes, len(ERROR_RETRY_DELAYS_S)) - 1]
            expires = event.accepted_at + settings.max_event_age_s
            self._requeue(event, min(time.monotonic() + delay * self.time_scale, expires))
            return
        self._drop(event, "RetriesExhausted")

    def _requeue(self, event: QueuedEvent, due: float) -> None:
        event.due = due
        event.seq = next(self._seq)
        with self._cond:
            if not self._stopping:
                heapq.heappush(self._heap, event)
                self._cond.notify_all()
