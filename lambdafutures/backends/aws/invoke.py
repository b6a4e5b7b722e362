"""Invoking Lambda asynchronously through boto3, under the declared `retry.INVOKE` policy.

`Invoke(InvocationType="Event")` queues the event inside Lambda and answers 202. Throttling
(429 TooManyRequestsException), Lambda's 5xx and connection errors are retried with
exponential backoff and full jitter, bounded in attempts and time, and paid from a retry
budget the invoker's threads share (retry.py); anything else (a missing function, a denied
role, an oversized event) fails the task at once as InvocationFailed.

This is the invoker used where the lean one (lean.py) cannot stand in for boto3 (a proxy, a
client certificate) or when `invoker="boto3"` is asked for.
"""

from __future__ import annotations

import json
from typing import Any

from .retry import INVOKE, RetryBudget, RetryPolicy, is_retryable

__all__ = ["LambdaInvoker", "is_retryable"]


class RetriedInvoker:
    """An invoke under a retry policy and a retry budget shared by the invoker's threads;
    subclasses send one attempt (`_invoke`)."""

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None) -> None:
        self._policy = policy
        self.budget = budget if budget is not None else RetryBudget()

    def invoke(self, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        self._policy.call(lambda: self._invoke(body), budget=self.budget)

    def _invoke(self, body: bytes) -> None:
        raise NotImplementedError


class LambdaInvoker(RetriedInvoker):
    """Async-invokes `function_name` with a boto3 Lambda client whose own retries are off."""

    def __init__(self, client: Any, function_name: str, *, policy: RetryPolicy = INVOKE,
                 budget: RetryBudget | None = None) -> None:
        super().__init__(policy, budget)
        self._client = client
        self._function_name = function_name

    def _invoke(self, body: bytes) -> None:
        response = self._client.invoke(FunctionName=self._function_name,
                                       InvocationType="Event", Payload=body)
        # Read the (empty) body so the connection goes back to the pool for reuse.
        response["Payload"].read()
        response["Payload"].close()
