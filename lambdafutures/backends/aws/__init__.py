"""The AWS backend: payloads and results in S3, async Lambda invokes, completions over SQS.

Everything it needs comes from the deployment config that `lambdafutures deploy` writes,
overridden by options given to LambdaExecutor. Endpoints follow boto3's conventions
(AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 / _SQS / _LAMBDA, profiles) or the `endpoint_urls`
option, so the same code talks to AWS, a moto server or LocalStack.

Each executor makes its own completion queue (`{queue_prefix}{executor id}`) and deletes it
at shutdown; Lambda's failure records (timeouts, crashes, out of memory) arrive on the
deployment's shared failure queue and are turned into failure completions here.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Any

from botocore.config import Config

from lambdafutures_handler import protocol
from lambdafutures_handler.transport import S3Store

from ..base import Backend, take_batch
from .lean import make_invoker, make_sqs

log = logging.getLogger("lambdafutures")

DEFAULT_MAX_WORKERS = 1000
DEFAULT_INVOKE_THREADS = 64
DEFAULT_RECEIVERS = 4
# How long the deleter waits for a fuller batch: far below any visibility timeout.
_DELETE_LINGER_S = 0.2
_REQUIRED = ("function_name", "bucket", "queue_prefix")
_OPTIONS = ("function_name", "bucket", "prefix", "queue_prefix", "failure_queue_url",
            "region", "profile", "timeout")


def open_aws_backend(
    *,
    executor_id: str,
    max_workers: int | None,
    timeout: float | None,
    deployment: dict[str, Any] | None,
    endpoint_urls: dict[str, str] | None = None,
    invoke_threads: int | None = None,
    receivers: int = DEFAULT_RECEIVERS,
    inline_limit: int | None = None,
    long_poll_s: int = 20,
    deadline_margin: float = 30.0,
    session: Any = None,
    invoker: str = "lean",
    receiver: str = "lean",
    **options: Any,
) -> Backend:
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) for the aws backend: {', '.join(sorted(unknown))}")
    settings = {**(deployment or {}), **{k: v for k, v in options.items() if v is not None}}
    missing = [name for name in _REQUIRED if not settings.get(name)]
    if missing:
        raise ValueError(
            f"the aws backend needs {', '.join(missing)}: run `lambdafutures deploy` once, "
            f"or pass them to LambdaExecutor")
    endpoints = {**settings.get("endpoint_urls", {}), **(endpoint_urls or {})}
    if session is None:
        import boto3

        session = boto3.Session(profile_name=settings.get("profile"),
                                region_name=settings.get("region"))
    threads = invoke_threads or min(DEFAULT_INVOKE_THREADS,
                                    max_workers or DEFAULT_MAX_WORKERS)

    def client(service: str, connections: int, **config: Any) -> Any:
        # One pooled connection per thread that uses the client, so none waits for another.
        return session.client(service, endpoint_url=endpoints.get(service),
                              config=Config(max_pool_connections=connections, **config))

    s3 = client("s3", threads + receivers + 2, retries={"mode": "standard"})
    sqs = client("sqs", receivers + 3, retries={"mode": "standard"})
    # Invoke retries are ours (tenacity, in invoke.py) so throttling is retried with backoff
    # and counted once; botocore's own retries would multiply the attempts.
    lam = client("lambda", threads, retries={"total_max_attempts": 1})
    # "lean" sends invokes, receives and deletes itself, signed by botocore, at a fraction of
    # boto3's CPU per call (lean.py); "boto3" keeps the plain clients.
    lambda_invoker = make_invoker(invoker, lam, session, settings["function_name"], threads)
    completion_sqs = make_sqs(receiver, sqs, session, receivers + 3)

    store = S3Store(settings["bucket"], f"{settings.get('prefix', 'tasks')}", client=s3)
    completions = SqsCompletionQueue(
        completion_sqs, f"{settings['queue_prefix']}{executor_id}", executor_id,
        failure_queue_url=settings.get("failure_queue_url"), receivers=receivers,
        long_poll_s=long_poll_s)

    def delete_objects() -> None:
        store.delete_prefix(f"{executor_id}/")

    sandbox_timeout = settings.get("timeout")
    return Backend(
        name="aws",
        store=store,
        invoker=lambda_invoker,
        completions=completions,
        reply_url=completions.queue_url,
        invoke_threads=threads,
        inline_limit=inline_limit or protocol.inline_limit(),
        deadline_margin=deadline_margin,
        sandbox_timeout=float(sandbox_timeout) if sandbox_timeout else None,
        default_max_workers=DEFAULT_MAX_WORKERS,
        closers=[getattr(lambda_invoker, "close", lambda: None),
                 getattr(completion_sqs, "close", lambda: None), completions.close,
                 delete_objects],
    )


class SqsCompletionQueue:
    """Completions from the executor's own SQS queue, plus its tasks' Lambda failure records.

    Receiver threads long-poll in parallel (10 messages a call) into a local queue, so a burst
    of completions is drained at the rate of several connections; `ack` hands receipts to a
    deleter thread that removes them in batches of 10.
    """

    def __init__(self, sqs: Any, queue_name: str, executor_id: str, *,
                 failure_queue_url: str | None, receivers: int, long_poll_s: int) -> None:
        self._sqs = sqs
        self._executor_id = executor_id
        self._queue_prefix = queue_name[:-len(executor_id)]
        self._long_poll_s = long_poll_s
        self.queue_url = sqs.create_queue(
            QueueName=queue_name,
            Attributes={"SqsManagedSseEnabled": "true", "MessageRetentionPeriod": "86400"},
        )["QueueUrl"]
        self._failure_queue_url = failure_queue_url
        self._received: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._threads = [
            threading.Thread(target=self._receive_loop, args=(self.queue_url, False),
                             name=f"lambdafutures-receiver-{n}", daemon=True)
            for n in range(receivers)
        ]
        if failure_queue_url:
            self._threads.append(threading.Thread(
                target=self._receive_loop, args=(failure_queue_url, True),
                name="lambdafutures-failure-receiver", daemon=True))
        self._deleter = threading.Thread(target=self._delete_loop, name="lambdafutures-acker",
                                         daemon=True)
        for thread in [*self._threads, self._deleter]:
            thread.start()
        self._error: BaseException | None = None

    # -- the completion thread's side ---------------------------------------------------------

    def receive(self, max_messages: int, wait: float) -> list[dict[str, Any]]:
        if self._error is not None:
            raise self._error
        return take_batch(self._received, max_messages, wait)

    def ack(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            receipt = message.get("_receipt")
            if receipt is not None:
                self._acks.put(receipt)

    def close(self) -> None:
        self._closed.set()
        self._acks.put(None)
        self._deleter.join()
        try:
            self._sqs.delete_queue(QueueUrl=self.queue_url)
        except Exception:  # noqa: BLE001 - `lambdafutures gc` removes what is left
            log.warning("could not delete completion queue %s", self.queue_url, exc_info=True)

    # -- threads ------------------------------------------------------------------------------

    def _receive_loop(self, queue_url: str, failures: bool) -> None:
        while not self._closed.is_set():
            try:
                response = self._sqs.receive_message(
                    QueueUrl=queue_url, MaxNumberOfMessages=10,
                    WaitTimeSeconds=self._long_poll_s,
                    MessageAttributeNames=[], AttributeNames=[])
            except Exception as exc:  # noqa: BLE001 - ends the executor, not silently
                if self._closed.is_set():
                    return
                if _is_throttle_or_transient(exc):
                    log.warning("receiving completions: %s; retrying", exc)
                    self._closed.wait(1.0)
                    continue
                log.error("cannot receive completions from %s: %s", queue_url, exc)
                self._error = exc
                return
            closed = self._closed.is_set()
            for raw in response.get("Messages", ()):
                message = (self._route_failure(queue_url, raw, closed) if failures
                           else self._parse(raw))
                if message is None:
                    continue
                message["_receipt"] = (queue_url, raw["ReceiptHandle"])
                self._received.put(message)
            if closed:
                return

    @staticmethod
    def _parse(raw: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return json.loads(raw["Body"])
        except (ValueError, KeyError):
            log.warning("dropping a message that is not JSON")
            return None

    def _route_failure(self, queue_url: str, raw: dict[str, Any],
                       closed: bool) -> dict[str, Any] | None:
        """A Lambda failure record from the deployment's shared failure queue: this
        executor's own becomes a failure completion; another executor's is forwarded, as a
        failure completion, to that executor's own completion queue and deleted here.

        Left in the shared queue, another executor's record would sit invisible for the
        queue's visibility timeout after every executor that saw it, delaying its owner's
        crash and timeout reports by as much; forwarding delivers it in one hop."""
        body = self._parse(raw)
        event = body.get("requestPayload") if isinstance(body, dict) else None
        if not isinstance(event, dict):
            self._delete_batch(queue_url, [raw["ReceiptHandle"]])
            return None
        completion = protocol.failure_completion(event, *failure_from_record(body))
        if event.get("executor") == self._executor_id:
            if closed:  # a late record of a task that has ended
                self._delete_batch(queue_url, [raw["ReceiptHandle"]])
                return None
            return completion
        reply = event.get("reply")
        if isinstance(reply, str) and self._is_sibling_queue(reply):
            try:
                self._sqs.send_message(QueueUrl=reply, MessageBody=json.dumps(completion))
            except Exception as exc:  # noqa: BLE001 - a gone executor needs no report
                if "NonExistentQueue" not in str(exc) and "QueueDoesNotExist" not in str(exc):
                    log.debug("could not forward a failure record to %s: %s", reply, exc)
                    return None  # it stays in the failure queue and is tried again later
        self._delete_batch(queue_url, [raw["ReceiptHandle"]])
        return None

    def _is_sibling_queue(self, url: str) -> bool:
        """True for another executor's completion queue of this deployment; a record naming
        any other address is not forwarded anywhere."""
        base, _, name = url.rpartition("/")
        own_base, _, own_name = self.queue_url.rpartition("/")
        return base == own_base and name.startswith(self._queue_prefix)

    def _delete_loop(self) -> None:
        while True:
            receipts = [self._acks.get()]
            # Deletes are off the latency path, and a call of ten costs about what a call of
            # one does: at a low completion rate, wait a little for a fuller batch.
            linger_until = time.monotonic() + _DELETE_LINGER_S
            while receipts[-1] is not None and len(receipts) < 10:
                try:
                    receipts.append(self._acks.get(
                        timeout=max(0.0, linger_until - time.monotonic())))
                except queue.Empty:
                    break
            while True:  # take whatever else is waiting: fewer, fuller batches
                try:
                    receipts.append(self._acks.get_nowait())
                except queue.Empty:
                    break
            by_queue: dict[str, list[str]] = defaultdict(list)
            for receipt in receipts:
                if receipt is not None:
                    by_queue[receipt[0]].append(receipt[1])
            for queue_url, handles in by_queue.items():
                for start in range(0, len(handles), 10):  # DeleteMessageBatch takes 10
                    self._delete_batch(queue_url, handles[start:start + 10])
            if None in receipts:
                return

    def _delete_batch(self, queue_url: str, handles: list[str]) -> None:
        entries = [{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(handles)]
        try:
            response = self._sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        except Exception:  # noqa: BLE001 - an undeleted message is redelivered and deduped
            log.warning("could not delete %d completion messages", len(entries), exc_info=True)
            return
        if response.get("Failed"):
            log.debug("%d completion deletes failed; they will be redelivered and ignored",
                      len(response["Failed"]))


def failure_from_record(record: dict[str, Any]) -> tuple[str, str]:
    """The failure kind and message of a Lambda async-invoke failure record."""
    context = record.get("requestContext") or {}
    payload = record.get("responsePayload") or {}
    condition = context.get("condition", "")
    error_type = str(payload.get("errorType", ""))
    error_message = str(payload.get("errorMessage", ""))
    if condition == "EventAgeExceeded":
        return protocol.NOT_RUN, "Lambda dropped the event before running it (EventAgeExceeded)"
    if error_type == "Sandbox.Timedout" or "timed out" in error_message.lower():
        return protocol.TIMEOUT, f"Lambda stopped the task at its time limit: {error_message}"
    described = ": ".join(part for part in (error_type, error_message) if part)
    if error_type.startswith("Runtime.") or not error_type:
        return protocol.CRASH, f"the Lambda worker died: {described or condition}"
    if error_type == "ProtocolError":  # the worker cannot read this executor's events
        return protocol.PROTOCOL, f"the Lambda handler failed: {described}"
    # Anything else the handler raised is the worker's own infrastructure failing (S3 or SQS
    # unreachable, throttled past botocore's retries while sending the completion), not the
    # user's code: a failed attempt that `retries` may run again, as after a crash.
    return protocol.CRASH, f"the Lambda handler failed: {described}"


def _is_throttle_or_transient(exc: BaseException) -> bool:
    from .invoke import is_retryable

    return is_retryable(exc)
