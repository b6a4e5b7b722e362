"""The AWS backend's retry policies, one per service call, and the budget invokers share.

Every call the backend makes to AWS runs under one of the policies declared here by name:

| policy    | call                               | attempts | within | waits (jittered) |
|-----------|------------------------------------|----------|--------|------------------|
| INVOKE    | Lambda Invoke (async)              | 8        | 60 s   | 0.1 s .. 10 s    |
| RECEIVE   | SQS ReceiveMessage (a receiver)    | 60       | 300 s  | 0.2 s .. 20 s    |
| DELETE    | SQS DeleteMessageBatch (the acker) | 3        | 10 s   | 0.2 s .. 5 s     |
| FORWARD   | SQS SendMessage (a failure record) | 3        | 10 s   | 0.2 s .. 5 s     |
| QUEUE     | SQS CreateQueue / DeleteQueue      | 5        | 30 s   | 0.2 s .. 5 s     |
| CONTROL   | Lambda Get*Concurrency / Settings  | 3        | 10 s   | 0.1 s .. 2 s     |

Only throttling, 5xx and connection errors are retried (`is_retryable`); anything else is
raised at once. The clients these calls go through are built with botocore's own retries
off, so an attempt counted here is one request sent.

Invokes fan out over up to 64 threads, so their retries also draw on one `RetryBudget` per
invoker: a token bucket modelled on botocore's standard-mode retry quota (500 tokens, 5 per
retry, 10 per retry after a connection error or timeout, 1 back per first-try success, the
retry's cost back when a retried call succeeds). Ours holds 100 tokens, so a burst of
failures may retry 20 times at once, and refills by 1 token a second, so an account that
throttles every invoke sees about one retry every 5 s from this host rather than 64 threads
each retrying 7 times. Where botocore fails a call as soon as its quota is empty, a retry
here waits for its tokens (they are reserved, the bucket goes into debt and the wait is how
long the refill takes to pay it) as long as that stays within the call's own 60 s; beyond
it, the call fails with its last error, as when its attempts run out. Partial throttling
does not drain the bucket: retries that end in success give their tokens back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_all,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_when_event_set,
    wait_combine,
    wait_random_exponential,
)
from tenacity.wait import wait_base
from urllib3.exceptions import ProtocolError

log = logging.getLogger("lambdafutures")
T = TypeVar("T")

_RETRYABLE_CODES = {
    "TooManyRequestsException", "ThrottlingException", "Throttling", "RequestLimitExceeded",
    "ServiceException", "EC2ThrottledException", "ResourceConflictException",
    "RequestThrottled", "SlowDown", "InternalError", "ServiceUnavailable",
}
# botocore's ConnectTimeoutError is not an EndpointConnectionError, so it is named too.
_CONNECTION_ERRORS = (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError,
                      ConnectTimeoutError, ProtocolError, ConnectionError)


def is_retryable(exc: BaseException) -> bool:
    """Throttling, a service fault (5xx) or a connection error: worth another attempt."""
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in _RETRYABLE_CODES or status == 429 or status >= 500
    return False


class RetryBudget:
    """A token bucket shared by the threads of one invoker (see the module's docstring).

    Thread-safe. `clock` is for tests; it must be monotonic."""

    def __init__(self, capacity: float = 100, retry_cost: float = 5,
                 connection_error_cost: float = 10, success_refund: float = 1,
                 refill_per_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.retry_cost = retry_cost
        self.connection_error_cost = connection_error_cost
        self.success_refund = success_refund
        self.refill_per_s = refill_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(capacity)
        self._stamp = clock()

    @property
    def tokens(self) -> float:
        """Tokens left now (negative while retries wait for the refill)."""
        with self._lock:
            return self._refill()

    def cost_of(self, exc: BaseException | None) -> float:
        if isinstance(exc, _CONNECTION_ERRORS):
            return self.connection_error_cost
        return self.retry_cost

    def reserve(self, cost: float, within_s: float) -> float | None:
        """Take `cost` tokens for one retry: the seconds to wait before it (0 if the bucket
        had them), or None (nothing taken) if the refill cannot pay for it in `within_s`."""
        with self._lock:
            left = self._refill() - cost
            if left >= 0:
                self._tokens = left
                return 0.0
            if self.refill_per_s <= 0 or -left / self.refill_per_s > within_s:
                return None
            self._tokens = left
            return -left / self.refill_per_s

    def refund(self, tokens: float) -> None:
        """Give back tokens: a call succeeded, or a reserved retry was never sent."""
        if tokens <= 0:
            return
        # Nearly every call succeeds at once with the bucket full: skip the lock then (a
        # stale read only delays a refund that the clock would bring anyway).
        if tokens == self.success_refund and self._tokens >= self.capacity:
            return
        with self._lock:
            self._tokens = min(self.capacity, self._refill() + tokens)

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.refill_per_s)
        self._stamp = now
        return self._tokens


@dataclass
class _Ticket:
    """One call's dealings with the budget: tokens reserved for the next attempt, and the
    cost of the attempt in flight."""
    reserved: float = 0.0
    in_flight: float = 0.0
    delay: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    """A named, declared retry policy: `call(fn)` runs `fn` under it.

    `sleep` and `clock` are for tests (tenacity's own sleep and the monotonic clock)."""

    name: str
    attempts: int
    within_s: float
    wait: wait_base
    retry: Callable[[BaseException], bool] = is_retryable
    sleep: Callable[[float], Any] = field(default=time.sleep, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def call(self, fn: Callable[[], T], *, budget: RetryBudget | None = None,
             until: threading.Event | None = None) -> T:
        """`fn()`, retried under this policy. With `budget`, each retry is paid from it;
        with `until`, setting that event ends the waits and the retries (the last error is
        raised).

        Setting up a tenacity loop costs about as much CPU as signing a request, and nearly
        every call succeeds at once: so the first attempt runs bare, and only after it fails
        does tenacity take over, with that failure as its own first attempt."""
        started = self.clock()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - judged by the policy, as tenacity would
            failure: Exception | None = exc
        else:
            if budget is not None:
                budget.refund(budget.success_refund)
            return result
        return self._retry(fn, failure, started, budget, until)

    def _retry(self, fn: Callable[[], T], failure: Exception | None, started: float,
               budget: RetryBudget | None, until: threading.Event | None) -> T:
        deadline = started + self.within_s
        ticket = _Ticket()

        def budget_admits(state: RetryCallState) -> bool:
            if budget is None:
                return True
            exc = state.outcome.exception() if state.outcome else None
            cost = budget.cost_of(exc)
            delay = budget.reserve(cost, deadline - self.clock())
            if delay is None:
                log.debug("%s: no retry budget left within %gs; giving up",
                          self.name, self.within_s)
                return False
            ticket.reserved, ticket.delay = cost, delay
            return True

        def out_of_time(state: RetryCallState) -> bool:
            return self.clock() + state.upcoming_sleep >= deadline

        stops: list[Any] = [stop_after_attempt(self.attempts), out_of_time]
        sleep = self.sleep
        if until is not None:
            stops.append(stop_when_event_set(until))
            sleep = until.wait
        retrying = Retrying(
            retry=retry_all(retry_if_exception(self.retry), budget_admits),
            stop=stop_any(*stops),
            wait=wait_combine(self.wait, lambda retry_state: ticket.delay),
            sleep=sleep,
            before_sleep=before_sleep_log(log, logging.DEBUG),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    ticket.in_flight, ticket.reserved = ticket.reserved, 0.0
                    if failure is not None:
                        first, failure = failure, None
                        raise first
                    result = fn()
        except BaseException:
            if budget is not None:
                budget.refund(ticket.reserved)  # reserved for a retry that was not sent
            raise
        if budget is not None:
            # As botocore's quota: a retried call that succeeds returns its last retry's cost.
            budget.refund(ticket.in_flight or budget.success_refund)
        return result  # the loop ends only after an attempt succeeded; else tenacity raised


def _jittered(first_s: float, max_s: float) -> wait_base:
    return wait_random_exponential(multiplier=first_s, max=max_s)


# Declared once, used by name. Jitter keeps many threads from coming back in lockstep.
INVOKE = RetryPolicy("invoke", attempts=8, within_s=60, wait=_jittered(0.1, 10))
RECEIVE = RetryPolicy("receive", attempts=60, within_s=300, wait=_jittered(0.2, 20))
DELETE = RetryPolicy("delete", attempts=3, within_s=10, wait=_jittered(0.2, 5))
FORWARD = RetryPolicy("forward", attempts=3, within_s=10, wait=_jittered(0.2, 5))
QUEUE = RetryPolicy("queue", attempts=5, within_s=30, wait=_jittered(0.2, 5))
CONTROL = RetryPolicy("control", attempts=3, within_s=10, wait=_jittered(0.1, 2))
