"""The invocation records Lambda posts to an async invoke's on-failure destination.

Format as documented for destinations ("Capturing records of Lambda asynchronous
invocations"):

    {"version": "1.0", "timestamp": ISO-8601,
     "requestContext": {"requestId", "functionArn": "...:$LATEST",
                        "condition": "RetriesExhausted" | "EventAgeExceeded",
                        "approximateInvokeCount": n},
     "requestPayload": the original event,
     "responseContext": {"statusCode": 200, "executedVersion": "$LATEST",
                         "functionError": "Unhandled"},
     "responsePayload": {"errorType", "errorMessage", ...}}

An event that never ran (dropped for its age while throttled) has nothing to respond with:
its record carries no responseContext or responsePayload, and an approximateInvokeCount
of 0.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any


def failure_record(*, request_id: str, function_arn: str, condition: str, invoke_count: int,
                   request_payload: Any, response_payload: dict[str, Any] | None) -> dict:
    record: dict[str, Any] = {
        "version": "1.0",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "requestContext": {"requestId": request_id, "functionArn": f"{function_arn}:$LATEST",
                           "condition": condition, "approximateInvokeCount": invoke_count},
        "requestPayload": request_payload,
    }
    if response_payload is not None:
        record["responseContext"] = {"statusCode": 200, "executedVersion": "$LATEST",
                                     "functionError": "Unhandled"}
        record["responsePayload"] = response_payload
    return record


def request_payload(body: bytes) -> Any:
    """The event as Lambda copies it into the record: JSON if it is JSON, else the text."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
