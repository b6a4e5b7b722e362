"""Lean AWS requests for the host's hot paths: Lambda async invokes, SQS receives and deletes.

A boto3 call spends most of its CPU in botocore's machinery (parameter validation, endpoint
rules, event hooks, response parsing) and in http.client/urllib3's header handling: about
0.6-0.8 ms for one `lambda.invoke` here, which caps one host process near a thousand
invokes per second. The three calls the executor makes per task are small, fixed requests,
so this module sends the very same requests itself (over signed_http.py):

- endpoint, region, timeouts and TLS trust come from real boto3 clients and their session
  (so AWS_ENDPOINT_URL_<SERVICE>, `endpoint_urls`, profiles, AWS_CA_BUNDLE all hold);
- credentials come from the session's credential chain, frozen per request, so refreshable
  credentials (SSO, assumed roles, instance metadata) refresh as they do in boto3;
- each request is signed by botocore's own `SigV4Auth`;
- failures become the exceptions boto3 raises, so the declared retry policies (retry.py)
  retry the same cases and error messages read the same.

The invoker retries under `retry.INVOKE`, paid from its `RetryBudget`; the SQS client sends
each request once, as the boto3 client it stands in for is configured to (the completion
queue applies `retry.RECEIVE` / `retry.DELETE` itself). Its receives from a queue can be cut
from another thread (`interrupt_receives`), so a shutdown does not wait out a long poll.

Proxies and client certificates are not handled here: `lean_unsupported` names the reason
and the backend then uses boto3 for that client.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any
from urllib.parse import quote

from .invoke import LambdaInvoker, RetriedInvoker
from .retry import INVOKE, RetryBudget, RetryPolicy
from .signed_http import Interrupted, SignedTransport, client_error, lean_unsupported

__all__ = ["CHOICES", "Interrupted", "LeanLambdaInvoker", "LeanSqsClient", "SignedTransport",
           "client_error", "lean_unsupported", "make_invoker", "make_sqs"]

log = logging.getLogger("lambdafutures")

CHOICES = ("lean", "boto3")


def make_invoker(kind: str, client: Any, session: Any, function_name: str,
                 connections: int) -> Any:
    """The aws backend's invoker: "lean" (`LeanLambdaInvoker`, or boto3 where it cannot stand
    in for the client) or "boto3" (`invoke.LambdaInvoker`)."""
    if _lean_wanted("invoker", kind, client):
        return LeanLambdaInvoker(client, session, function_name, connections=connections)
    return LambdaInvoker(client, function_name)


def make_sqs(kind: str, client: Any, session: Any, connections: int) -> Any:
    """The SQS client of the completion queue: "lean" (`LeanSqsClient`, or boto3 where it
    cannot stand in for the client) or "boto3" (the client itself)."""
    if _lean_wanted("receiver", kind, client):
        return LeanSqsClient(client, session, connections=connections)
    return client


def _lean_wanted(option: str, kind: str, client: Any) -> bool:
    if kind not in CHOICES:
        raise ValueError(f"{option} must be one of {', '.join(CHOICES)}, not {kind!r}")
    if kind == "boto3":
        return False
    reason = lean_unsupported(client)
    if reason:
        log.info("%s: using boto3, %s", option, reason)
    return reason is None


class LeanLambdaInvoker(RetriedInvoker):
    """Async-invokes `function_name` as `client.invoke(InvocationType="Event")` would.

    Args:
        client: a boto3 Lambda client; its endpoint, region and timeouts are used.
        session: the boto3 (or botocore) session whose credential chain signs requests.
        function_name: the function's name or ARN.
        connections: idle keep-alive connections kept (one per invoker thread).
        policy: the retry policy (`retry.INVOKE`; tests shorten its waits).
        budget: the retry budget its threads share (a new `RetryBudget` by default).
    """

    def __init__(self, client: Any, session: Any, function_name: str, *, connections: int = 10,
                 policy: RetryPolicy = INVOKE, budget: RetryBudget | None = None) -> None:
        self.transport = SignedTransport(client, session, "lambda", connections=connections)
        self._path = f"/2015-03-31/functions/{quote(function_name, safe='')}/invocations"
        self._headers = {"X-Amz-Invocation-Type": "Event"}
        super().__init__(policy, budget)

    def _invoke(self, body: bytes) -> None:
        status, headers, data = self.transport.post(self._path, self._headers, body)
        if not 200 <= status < 300:
            raise client_error(status, headers, data, "Invoke")

    def close(self) -> None:
        self.transport.close()


class LeanSqsClient:
    """`receive_message` and `delete_message_batch` sent as SQS's JSON-protocol requests,
    once each (no retries: the caller's policy decides); every other method is the boto3
    client's own. Results have the shape boto3 returns (without ResponseMetadata).

    Receives from each queue go over connections of their own, which
    `interrupt_receives(queue_url)` cuts: a receive from that queue in flight, or started
    later, raises `Interrupted`, while deletes and other queues' receives still go through."""

    def __init__(self, client: Any, session: Any, *, connections: int = 10) -> None:
        self._client = client
        self._session = session
        self._connections = connections
        self.transport = SignedTransport(client, session, "sqs", connections=connections)
        self._receiving: dict[str, SignedTransport] = {}
        self._receiving_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def receive_message(self, **params: Any) -> dict[str, Any]:
        return self._call(self._receiving_from(params.get("QueueUrl", "")), "ReceiveMessage",
                          params)

    def delete_message_batch(self, **params: Any) -> dict[str, Any]:
        return self._call(self.transport, "DeleteMessageBatch", params)

    def interrupt_receives(self, queue_url: str) -> None:
        self._receiving_from(queue_url).interrupt()

    def close(self) -> None:
        with self._receiving_lock:
            receiving = list(self._receiving.values())
        for transport in [*receiving, self.transport]:
            transport.close()

    def _receiving_from(self, queue_url: str) -> SignedTransport:
        transport = self._receiving.get(queue_url)  # a dict read is atomic: no lock
        if transport is None:
            with self._receiving_lock:
                transport = self._receiving.get(queue_url)
                if transport is None:
                    transport = self._receiving[queue_url] = SignedTransport(
                        self._client, self._session, "sqs", connections=self._connections,
                        interruptible=True)
        return transport

    @staticmethod
    def _call(transport: SignedTransport, operation: str,
              params: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(params).encode()
        headers = {"Content-Type": "application/x-amz-json-1.0",
                   "X-Amz-Target": f"AmazonSQS.{operation}", "x-amzn-query-mode": "true"}
        status, response_headers, data = transport.post("/", headers, body)
        if not 200 <= status < 300:
            raise client_error(status, response_headers, data, operation)
        return json.loads(data) if data else {}
