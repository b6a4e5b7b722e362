"""Invoking Lambda asynchronously, with a declared retry policy for throttling and faults.

`Invoke(InvocationType="Event")` queues the event inside Lambda and answers 202. Throttling
(429 TooManyRequestsException), Lambda's 5xx and connection errors are retried with
exponential backoff and full jitter, bounded in attempts and time; anything else (a missing
function, a denied role, an oversized event) fails the task at once as InvocationFailed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)
from urllib3.exceptions import ProtocolError

log = logging.getLogger("lambdafutures")

_RETRYABLE_CODES = {
    "TooManyRequestsException", "ThrottlingException", "Throttling", "RequestLimitExceeded",
    "ServiceException", "EC2ThrottledException", "ResourceConflictException",
    "RequestThrottled", "SlowDown", "InternalError", "ServiceUnavailable",
}
# botocore's ConnectTimeoutError is not an EndpointConnectionError, so it is named too.
_CONNECTION_ERRORS = (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError,
                      ConnectTimeoutError, ProtocolError, ConnectionError)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in _RETRYABLE_CODES or status == 429 or status >= 500
    return False


# Declared once: up to 8 attempts within 60 s, waits growing from 0.1 s to 10 s, jittered
# so a thousand throttled invokers do not come back in lockstep.
INVOKE_RETRY = dict(
    retry=retry_if_exception(is_retryable),
    stop=stop_after_attempt(8) | stop_after_delay(60),
    wait=wait_random_exponential(multiplier=0.1, max=10),
    before_sleep=before_sleep_log(log, logging.DEBUG),
    reraise=True,
)


class LambdaInvoker:
    def __init__(self, client: Any, function_name: str, **retry_overrides: Any) -> None:
        self._client = client
        self._function_name = function_name
        self._retry = {**INVOKE_RETRY, **retry_overrides}

    def invoke(self, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        for attempt in Retrying(**self._retry):
            with attempt:
                response = self._client.invoke(FunctionName=self._function_name,
                                               InvocationType="Event", Payload=body)
                # Read the (empty) body so the connection goes back to the pool for reuse.
                response["Payload"].read()
                response["Payload"].close()
