"""Completions over SQS: the executor's own queue, plus its tasks' Lambda failure records.

`receive` hands the completion thread two kinds of dict, each with its `_receipt`:
- the body of a message on the executor's own queue, as sent: any JSON object (the core
  checks its shape and signature and drops what fails);
- a hint (`protocol.make_hint`) built here from a Lambda on-failure record about one of this
  executor's events, found on the deployment's shared failure queue or forwarded to the own
  queue by a sibling executor.
Nothing else is ever returned: a body that is not a JSON object, a record whose event is not
an object, a record about another executor on the own queue are deleted at once, with one
DEBUG line each. A record about another executor on the shared queue is forwarded, as is, to
that executor's queue when its `reply` names a sibling queue of this deployment, then deleted.

Receiver threads long-poll in parallel (10 messages a call) into a local queue; `ack` hands
receipts to one deleter thread that removes them in batches of 10. A receiver that fails for
good (retries exhausted, an error that is not retryable, a bug) records the error, and the
next `receive` raises it: futures then end typed, never by deadline.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Any

from lambdafutures_handler import protocol

from ..base import take_batch
from .retry import DELETE, FORWARD, QUEUE, RECEIVE, RetryPolicy

log = logging.getLogger("lambdafutures")

# How long the deleter waits for a fuller batch: far below any visibility timeout.
_DELETE_LINGER_S = 0.2
# Polls that are never cut, so that close() is not held by a long poll: all of them with a
# client whose receives cannot be cut (boto3's), and always those of the shared failure
# queue. A poll cut on our side lives on in SQS until its wait ends, and a record that
# arrives meanwhile would go to it and stay invisible for the queue's visibility timeout,
# delaying a sibling's crash report by as much; a short poll, waited out, forwards it.
_SHORT_POLL_S = 1
# How long close() waits for each thread; they normally end within milliseconds.
_JOIN_TIMEOUT_S = 15.0
_WAKE = object()  # put in the local queue to wake `receive` after a receiver failed


class SqsCompletionQueue:
    """Creates the executor's completion queue `queue_name` and reads it, and the shared
    `failure_queue_url`, until `close()` (which deletes the queue).

    `sqs` is an SQS client with its own retries off (each call here runs under one of
    retry.py's policies); a `LeanSqsClient` lets close() cut the long polls in flight.
    `receive_policy` is `retry.RECEIVE` but for tests."""

    def __init__(self, sqs: Any, queue_name: str, executor_id: str, *,
                 failure_queue_url: str | None, receivers: int, long_poll_s: int,
                 receive_policy: RetryPolicy = RECEIVE) -> None:
        self._sqs = sqs
        self._receive_policy = receive_policy
        self._executor_id = executor_id
        self._queue_prefix = queue_name[:-len(executor_id)]
        self._interrupt = getattr(sqs, "interrupt_receives", None)
        self._long_poll_s = (long_poll_s if self._interrupt is not None
                             else min(long_poll_s, _SHORT_POLL_S))
        self.queue_url: str = QUEUE.call(lambda: sqs.create_queue(
            QueueName=queue_name,
            Attributes={"SqsManagedSseEnabled": "true", "MessageRetentionPeriod": "86400"},
        ))["QueueUrl"]
        self._received: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._error: BaseException | None = None  # set before any thread can fail
        self._receivers = [
            threading.Thread(target=self._receive_loop, args=(self.queue_url, False),
                             name=f"lambdafutures-receiver-{n}", daemon=True)
            for n in range(receivers)
        ]
        if failure_queue_url:
            self._receivers.append(threading.Thread(
                target=self._receive_loop, args=(failure_queue_url, True),
                name="lambdafutures-failure-receiver", daemon=True))
        self._deleter = threading.Thread(target=self._delete_loop, name="lambdafutures-acker",
                                         daemon=True)
        for thread in [*self._receivers, self._deleter]:
            thread.start()

    @property
    def threads(self) -> list[threading.Thread]:
        """The queue's own threads (receivers and deleter), all joined by `close()`."""
        return [*self._receivers, self._deleter]

    # -- the completion thread's side ---------------------------------------------------------

    def receive(self, max_messages: int, wait: float) -> list[dict[str, Any]]:
        """Up to `max_messages` completions and hints, waiting at most `wait` for the first.
        Once a receiver has failed, what was already received is still returned; then its
        error is raised, on this call and every later one."""
        failed = self._error is not None
        batch = take_batch(self._received, max_messages, 0.0 if failed else wait)
        if _WAKE in batch:
            batch = [message for message in batch if message is not _WAKE]
        if not batch and self._error is not None:
            raise self._error
        return batch

    def ack(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            receipt = message.get("_receipt")
            if receipt is not None:
                self._acks.put(receipt)

    def close(self) -> None:
        """Stop receiving, join every thread, delete what was acked, delete the queue."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._interrupt is not None:
            self._interrupt(self.queue_url)  # ends the long polls in flight now
        for thread in self._receivers:
            thread.join(_JOIN_TIMEOUT_S)
        self._acks.put(None)
        self._deleter.join(_JOIN_TIMEOUT_S)
        alive = [thread.name for thread in self.threads if thread.is_alive()]
        if alive:
            log.warning("completion queue threads still running after close: %s", alive)
        try:
            QUEUE.call(lambda: self._sqs.delete_queue(QueueUrl=self.queue_url))
        except Exception:  # noqa: BLE001 - `lambdafutures gc` removes what is left
            log.warning("could not delete completion queue %s", self.queue_url, exc_info=True)

    # -- receivers ----------------------------------------------------------------------------

    def _receive_loop(self, queue_url: str, shared: bool) -> None:
        wait_s = min(self._long_poll_s, _SHORT_POLL_S) if shared else self._long_poll_s
        try:
            while not self._closed.is_set():
                response = self._receive_policy.call(lambda: self._sqs.receive_message(
                    QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s,
                    MessageAttributeNames=[], AttributeNames=[]), until=self._closed)
                for raw in response.get("Messages", ()):
                    self._take(queue_url, raw, shared)
        except BaseException as exc:  # noqa: BLE001 - recorded: `receive` raises it
            if self._closed.is_set():
                return  # cut by close(), or failing while closing: nobody waits for it
            log.error("receiving completions from %s failed: %r", queue_url, exc)
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._received.put(_WAKE)

    def _take(self, queue_url: str, raw: dict[str, Any], shared: bool) -> None:
        receipt = (queue_url, raw["ReceiptHandle"])
        body = _json_object(raw.get("Body"))
        if body is None:
            self._drop(receipt, "a message that is not a JSON object")
            return
        if "requestContext" in body and "requestPayload" in body:
            message = self._from_failure_record(body, raw["Body"], receipt, shared)
        elif shared:
            message = self._drop(receipt, "a message that is not a Lambda failure record")
        elif "hint" in body:  # hints are made here, from records, never read from a queue
            message = self._drop(receipt, "a message shaped as a hint")
        else:
            message = body
        if message is not None:
            message["_receipt"] = receipt
            self._received.put(message)

    def _from_failure_record(self, record: dict[str, Any], text: str,
                             receipt: tuple[str, str], shared: bool) -> dict[str, Any] | None:
        """This executor's record becomes a hint. Another executor's, on the shared queue,
        is forwarded to that executor's own queue and deleted here.

        Left in the shared queue, another executor's record would sit invisible for the
        queue's visibility timeout after every executor that saw it, delaying its owner's
        crash and timeout reports by as much; forwarding delivers it in one hop."""
        event = record.get("requestPayload")
        if not isinstance(event, dict):
            return self._drop(receipt, "a failure record whose event is not an object")
        if event.get("executor") == self._executor_id:
            if self._closed.is_set():  # a late record of a task that has ended
                return self._drop(receipt, "a failure record that came after shutdown")
            return protocol.make_hint(event, *failure_from_record(record))
        if not shared:
            return self._drop(receipt, "a failure record about another executor")
        reply = event.get("reply")
        if (isinstance(reply, str) and reply != self.queue_url
                and self._is_sibling_queue(reply) and not self._forward(reply, text)):
            return None  # it stays in the shared queue and is tried again later
        self._acks.put(receipt)
        return None

    def _forward(self, queue_url: str, text: str) -> bool:
        """Send a record, as is, to a sibling's queue: True when it is there or needs no
        delivery (that executor and its queue are gone)."""
        try:
            FORWARD.call(lambda: self._sqs.send_message(QueueUrl=queue_url, MessageBody=text))
        except Exception as exc:  # noqa: BLE001 - the owner also reads the shared queue
            if "NonExistentQueue" in str(exc) or "QueueDoesNotExist" in str(exc):
                return True
            log.debug("could not forward a failure record to %s: %s", queue_url, exc)
            return False
        return True

    def _is_sibling_queue(self, url: str) -> bool:
        """True for another executor's completion queue of this deployment; a record naming
        any other address is not forwarded anywhere."""
        base, _, name = url.rpartition("/")
        own_base, _, _ = self.queue_url.rpartition("/")
        return base == own_base and name.startswith(self._queue_prefix)

    def _drop(self, receipt: tuple[str, str], what: str) -> None:
        log.debug("deleting %s from %s", what, receipt[0])
        self._acks.put(receipt)
        return None

    # -- the deleter --------------------------------------------------------------------------

    def _delete_loop(self) -> None:
        try:
            while self._delete_some():
                pass
        except BaseException as exc:  # noqa: BLE001 - recorded: `receive` raises it
            log.error("deleting completions failed: %r", exc)
            self._fail(exc)

    def _delete_some(self) -> bool:
        """Delete the next batches of acked receipts; False once close() asked to stop."""
        receipts = [self._acks.get()]
        # Deletes are off the latency path, and a call of ten costs about what a call of one
        # does: at a low completion rate, wait a little for a fuller batch.
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
        return None not in receipts

    def _delete_batch(self, queue_url: str, handles: list[str]) -> None:
        entries = [{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(handles)]
        try:
            response = DELETE.call(lambda: self._sqs.delete_message_batch(
                QueueUrl=queue_url, Entries=entries))
        except Exception as exc:  # noqa: BLE001 - an undeleted message is redelivered, deduped
            log.warning("could not delete %d completion messages: %s", len(entries), exc)
            return
        if response.get("Failed"):
            log.debug("%d completion deletes failed; they will be redelivered and ignored",
                      len(response["Failed"]))


def _json_object(body: Any) -> dict[str, Any] | None:
    if not isinstance(body, str):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # nesting past the parser's limit raises the latter
        return None
    return value if isinstance(value, dict) else None


def failure_from_record(record: dict[str, Any]) -> tuple[str, str]:
    """The failure kind and message of a Lambda async-invoke failure record."""
    context = _dict(record.get("requestContext"))
    payload = _dict(record.get("responsePayload"))
    condition = str(context.get("condition", ""))
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


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
