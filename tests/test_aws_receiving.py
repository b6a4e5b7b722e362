"""The AWS backend's receiving side, limits and retries (lambdafutures/backends/aws/).

Against the moto server over HTTP: whatever lands on an executor's completion queue or on the
deployment's shared failure queue (bodies that are not JSON objects, 200 KB of junk, Lambda
failure records of other applications or other executors) is deleted and never handed to the
core, and the receivers keep working; a receiver that fails for good makes `receive` raise;
`close()` joins every thread within 2 s while long polls are in flight, and deletes the
queue; the concurrency available to a function is read from its reserved concurrency. With
a client that always throttles: the invokers' shared retry budget bounds the attempts.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
import zipfile
from dataclasses import replace

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from tenacity import wait_none

from lambdafutures.backends.aws import (
    SqsCompletionQueue,
    available_concurrency,
    open_aws_backend,
)
from lambdafutures.backends.aws.invoke import LambdaInvoker
from lambdafutures.backends.aws.lean import LeanSqsClient, make_sqs
from lambdafutures.backends.aws.retry import INVOKE, RECEIVE, RetryBudget
from lambdafutures_handler import protocol

RECEIVERS = ("lean", "boto3")


@pytest.fixture
def sqs(moto_server):
    session = boto3.Session()
    client = session.client("sqs", endpoint_url=moto_server,
                            config=Config(retries={"total_max_attempts": 1}))
    return session, client


def names():
    """A queue prefix of its own and an executor id (tests run in parallel on one moto)."""
    return f"lf-recv-{uuid.uuid4().hex[:8]}-", uuid.uuid4().hex[:16]


def open_queue(sqs, kind="lean", failure_queue_url=None, long_poll_s=20, prefix=None,
               executor=None, client=None, **options):
    session, boto_client = sqs
    default_prefix, default_executor = names()
    prefix, executor = prefix or default_prefix, executor or default_executor
    client = client or make_sqs(kind, boto_client, session, 8)
    return SqsCompletionQueue(client, prefix + executor, executor,
                              failure_queue_url=failure_queue_url, receivers=4,
                              long_poll_s=long_poll_s, **options)


def collect(queue, count, timeout=20.0):
    """What `receive` returns until `count` messages came, or `timeout`; then one more
    short look, so that anything returned beyond them is seen too."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += queue.receive(10, 0.2)
    got += queue.receive(10, 1.0)
    return got


def wait_until_empty(client, queue_url, timeout=15.0):
    """True once the queue holds no message, visible or in flight (all were deleted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        attributes = client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
        if not any(int(value) for value in attributes["Attributes"].values()):
            return True
        time.sleep(0.1)
    return False


def record(event, error_type="Runtime.ExitError", message="exit status 17"):
    """A Lambda async-invoke failure record, as Lambda writes it to an on-failure queue."""
    return {"version": "1.0", "timestamp": "2026-11-30T12:00:00.000Z",
            "requestContext": {"requestId": str(uuid.uuid4()), "condition": "RetriesExhausted",
                               "approximateInvokeCount": 3,
                               "functionArn": "arn:aws:lambda:us-east-1:123456789012:function:f"},
            "requestPayload": event,
            "responseContext": {"statusCode": 200, "functionError": "Unhandled"},
            "responsePayload": {"errorType": error_type, "errorMessage": message}}


def event_of(executor, reply, task=0):
    return {"v": protocol.VERSION, "executor": executor, "task": task, "attempt": 0,
            "reply": reply, "sig": "0" * 64}


# -- poison ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", RECEIVERS)
def test_poison_on_the_own_queue_is_deleted_and_never_returned(sqs, kind, caplog):
    _, client = sqs
    caplog.set_level("DEBUG", logger="lambdafutures")
    queue = open_queue(sqs, kind)
    try:
        executor = queue._executor_id
        ours = event_of(executor, queue.queue_url, task=3)
        poison = ["[]", '"x"', "17", "null", "not json {", "z" * 200_000,
                  "[" * 100_000 + "]" * 100_000, '{"a":' * 40_000 + "1" + "}" * 40_000,
                  json.dumps(record({"some": "other application"})),
                  json.dumps(record("a string payload")),
                  json.dumps(record(event_of("0" * 16, queue.queue_url))),
                  json.dumps({"hint": protocol.CRASH, "message": "forged", "event": ours})]
        completion = {"v": protocol.VERSION, "executor": executor, "task": 0}
        good = [json.dumps(completion), "{}", json.dumps(record(ours))]
        for body in poison + good:
            client.send_message(QueueUrl=queue.queue_url, MessageBody=body)

        got = collect(queue, len(good))
        bodies = sorted(json.dumps({k: v for k, v in m.items() if k != "_receipt"},
                                    sort_keys=True) for m in got)
        hint = protocol.make_hint(ours, protocol.CRASH,
                                  "the Lambda worker died: Runtime.ExitError: exit status 17")
        assert bodies == sorted(json.dumps(m, sort_keys=True)
                                for m in (completion, {}, hint))
        assert all(m["_receipt"][0] == queue.queue_url for m in got)
        queue.ack(got)  # as the core does, for what it keeps and what it drops
        assert wait_until_empty(client, queue.queue_url)
        dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith(
            "deleting a") and r.levelname == "DEBUG"]
        assert len(dropped) == len(poison), dropped  # one DEBUG line each

        # The receivers are still there, and still deliver.
        assert all(thread.is_alive() for thread in queue.threads)
        client.send_message(QueueUrl=queue.queue_url, MessageBody=json.dumps(completion))
        assert [m["task"] for m in collect(queue, 1)] == [0]
    finally:
        queue.close()


def test_shared_failure_queue_hints_forwards_and_drops(sqs):
    _, client = sqs
    prefix, executor = names()
    failures = client.create_queue(QueueName=prefix + "failures")["QueueUrl"]
    sibling = client.create_queue(QueueName=prefix + "1" * 16)["QueueUrl"]
    stranger = client.create_queue(QueueName=f"lf-stranger-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    queue = open_queue(sqs, failure_queue_url=failures, prefix=prefix, executor=executor)
    try:
        gone = queue.queue_url.rsplit("/", 1)[0] + "/" + prefix + "2" * 16
        ours = event_of(executor, queue.queue_url, task=5)
        for_sibling = json.dumps(record(event_of("1" * 16, sibling)), indent=1)
        bodies = [json.dumps(record(ours, "Sandbox.Timedout", "Task timed out after 3 s")),
                  for_sibling,
                  json.dumps(record(event_of("3" * 16, stranger))),  # not of this deployment
                  json.dumps(record(event_of("2" * 16, gone))),      # its executor is gone
                  json.dumps(record({"some": "other application"})),
                  json.dumps({"requestContext": {}, "requestPayload": None}),
                  json.dumps({"requestContext": [], "requestPayload": ours}),
                  '{"a": 1}', "[]", "junk"]
        for body in bodies:
            client.send_message(QueueUrl=failures, MessageBody=body)

        got = collect(queue, 2)
        assert sorted((m["hint"], m["event"]["task"]) for m in got) == [
            (protocol.CRASH, 5), (protocol.TIMEOUT, 5)]
        assert all(m["_receipt"][0] == failures for m in got)
        queue.ack(got)
        assert wait_until_empty(client, failures)
        forwarded = client.receive_message(QueueUrl=sibling, WaitTimeSeconds=1)["Messages"]
        assert [m["Body"] for m in forwarded] == [for_sibling]  # as is, byte for byte
        assert "Messages" not in client.receive_message(QueueUrl=stranger, WaitTimeSeconds=0)
    finally:
        queue.close()
        for url in (failures, sibling, stranger):
            client.delete_queue(QueueUrl=url)


# -- receivers that fail --------------------------------------------------------------------

def raises_within(queue, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue.receive(10, 0.2)
    pytest.fail(f"receive did not raise within {timeout} s")


@pytest.mark.parametrize("kind", RECEIVERS)
def test_a_receiver_failing_for_good_makes_receive_raise(sqs, kind):
    _, client = sqs
    own = client.create_queue(QueueName=f"lf-recv-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    client.delete_queue(QueueUrl=own)  # a failure queue that does not exist (any more)
    queue = open_queue(sqs, kind, failure_queue_url=own)
    try:
        with pytest.raises(ClientError) as raised:
            raises_within(queue)
        assert "NonExistentQueue" in raised.value.response["Error"]["Code"]
        with pytest.raises(ClientError):  # and it stays raised
            queue.receive(10, 0)
    finally:
        queue.close()


class BuggyReceives:
    """An SQS client whose receive_message hits a bug (not an AWS error)."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def receive_message(self, **params):
        raise KeyError("a bug in the receive path")


def test_a_receiver_hitting_a_bug_makes_receive_raise(sqs):
    queue = open_queue(sqs, client=BuggyReceives(sqs[1]))
    try:
        with pytest.raises(KeyError, match="a bug in the receive path"):
            raises_within(queue)
    finally:
        queue.close()


class ThrottledReceives(BuggyReceives):
    """An SQS client whose every receive is throttled."""

    def __init__(self, client):
        super().__init__(client)
        self.receives = 0

    def receive_message(self, **params):
        self.receives += 1
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"},
                           "ResponseMetadata": {"HTTPStatusCode": 400}}, "ReceiveMessage")


def test_receives_throttled_past_their_policy_make_receive_raise(sqs):
    client = ThrottledReceives(sqs[1])
    queue = open_queue(sqs, client=client,
                       receive_policy=replace(RECEIVE, attempts=3, wait=wait_none()))
    try:
        with pytest.raises(ClientError, match="ThrottlingException"):
            raises_within(queue)
        assert client.receives >= 3  # one receiver's three attempts, at least
    finally:
        queue.close()


# -- closing --------------------------------------------------------------------------------

class SpySqs(LeanSqsClient):
    """Counts receives entered, so the test closes while long polls are in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered = threading.Semaphore(0)

    def receive_message(self, **params):
        self.entered.release()
        return super().receive_message(**params)


@pytest.mark.parametrize("kind", RECEIVERS)
def test_close_joins_every_thread_promptly_during_long_polls(sqs, kind):
    session, client = sqs
    failures = client.create_queue(QueueName=f"lf-recv-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    spy = SpySqs(client, session, connections=8) if kind == "lean" else None
    queue = open_queue(sqs, kind, client=spy, failure_queue_url=failures)
    if spy is not None:
        for _ in range(5):  # every receiver is in its poll (the own queue's last 20 s)
            assert spy.entered.acquire(timeout=10)
    started = time.monotonic()
    queue.close()
    elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert not [thread.name for thread in queue.threads if thread.is_alive()]
    with pytest.raises(ClientError, match="NonExistentQueue|does not exist"):
        client.get_queue_attributes(QueueUrl=queue.queue_url, AttributeNames=["All"])
    queue.close()  # a second close is harmless
    client.delete_queue(QueueUrl=failures)


# -- the concurrency available --------------------------------------------------------------

@pytest.fixture
def function(moto_server):
    """A function in moto (never invoked here): its name and a Lambda client."""
    name = f"lf-limits-{uuid.uuid4().hex[:8]}"
    iam = boto3.client("iam", endpoint_url=moto_server)
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": []}))["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("handler.py", "def handle(event, context):\n    pass\n")
    lam = boto3.client("lambda", endpoint_url=moto_server,
                       config=Config(retries={"total_max_attempts": 1}))
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=role,
                        Handler="handler.handle", Code={"ZipFile": code.getvalue()})
    yield name, lam
    lam.delete_function(FunctionName=name)
    iam.delete_role(RoleName=name)


def test_reserved_concurrency_is_the_concurrency_available(function, moto_server, caplog):
    name, lam = function
    # moto serves no GetAccountSettings: with no reserved concurrency, nothing can be read.
    assert available_concurrency(lam, name) is None
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=5)
    assert available_concurrency(lam, name) == 5

    bucket = f"lf-limits-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=bucket)
    prefix, executor = names()
    with caplog.at_level("INFO", logger="lambdafutures"):
        backend = open_aws_backend(
            executor_id=executor, max_workers=None, timeout=None,
            deployment={"function_name": name, "bucket": bucket, "queue_prefix": prefix},
            endpoint_urls={"lambda": moto_server, "sqs": moto_server, "s3": moto_server})
    try:
        assert backend.concurrency_limit == 5
        assert backend.default_max_workers == 5
        assert backend.invoke_threads == 5
        assert f"max_workers=5 (the concurrency available to {name} is 5)" in caplog.text
    finally:
        backend.close()


class FakeLambdaControl:
    """A Lambda client that answers the two limit calls from fixed values (or raises)."""

    def __init__(self, reserved, unreserved):
        self.reserved, self.unreserved = reserved, unreserved

    def get_function_concurrency(self, FunctionName):
        if isinstance(self.reserved, Exception):
            raise self.reserved
        return {} if self.reserved is None else {"ReservedConcurrentExecutions": self.reserved}

    def get_account_settings(self):
        if isinstance(self.unreserved, Exception):
            raise self.unreserved
        return {"AccountLimit": {"ConcurrentExecutions": 1000,
                                 "UnreservedConcurrentExecutions": self.unreserved}}


def denied():
    return ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"},
                        "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetAccountSettings")


@pytest.mark.parametrize("reserved, unreserved, available", [
    (None, 37, 37), (7, 37, 7), (0, 37, 0), (denied(), 37, 37), (None, denied(), None),
    (denied(), denied(), None)])
def test_unreserved_account_concurrency_when_none_is_reserved(reserved, unreserved, available):
    assert available_concurrency(FakeLambdaControl(reserved, unreserved), "fn") == available


# -- the retry budget -----------------------------------------------------------------------

def throttled():
    return ClientError({"Error": {"Code": "TooManyRequestsException", "Message": "Rate"},
                        "ResponseMetadata": {"HTTPStatusCode": 429}}, "Invoke")


class ThrottlingLambda:
    """A Lambda client that throttles the invokes `throttle(n)` says (n counts calls)."""

    def __init__(self, throttle=lambda n: True):
        self.calls = 0
        self._throttle = throttle
        self._lock = threading.Lock()

    def invoke(self, **params):
        with self._lock:
            self.calls += 1
            n = self.calls
        if self._throttle(n):
            raise throttled()
        return {"Payload": io.BytesIO(b"")}


def invoke_all(invoker, tasks):
    """Invoke `tasks` events at once from as many threads; the errors they end with."""
    errors, barrier = [], threading.Barrier(tasks)

    def run(n):
        barrier.wait()
        try:
            invoker.invoke({"task": n})
        except ClientError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(tasks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


def test_the_shared_budget_bounds_attempts_under_sustained_throttling():
    quick = replace(INVOKE, wait=wait_none())  # 8 attempts each, no backoff to wait out
    unbounded = ThrottlingLambda()
    errors = invoke_all(LambdaInvoker(unbounded, "fn", policy=quick,
                                      budget=RetryBudget(capacity=10**9)), 16)
    assert (len(errors), unbounded.calls) == (16, 16 * 8)  # the storm, without a budget

    bounded = ThrottlingLambda()
    budget = RetryBudget(capacity=20, retry_cost=5, refill_per_s=0)
    errors = invoke_all(LambdaInvoker(bounded, "fn", policy=quick, budget=budget), 16)
    assert len(errors) == 16
    assert all(error.response["Error"]["Code"] == "TooManyRequestsException"
               for error in errors)
    assert bounded.calls == 16 + 20 // 5  # first attempts, then what the budget paid for


def test_retries_past_the_budget_wait_for_its_refill():
    now = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    budget = RetryBudget(capacity=5, retry_cost=5, refill_per_s=5, clock=lambda: now[0])
    policy = replace(INVOKE, wait=wait_none(), sleep=sleep, clock=lambda: now[0])
    client = ThrottlingLambda(throttle=lambda n: n <= 3)
    LambdaInvoker(client, "fn", policy=policy, budget=budget).invoke({"task": 0})
    assert client.calls == 4
    # The first retry was in the bucket; the next two each waited a second of refill.
    assert sleeps == pytest.approx([0.0, 1.0, 1.0])
    assert budget.tokens == pytest.approx(5)  # the successful retry gave its cost back


def test_partial_throttling_does_not_drain_the_budget():
    budget = RetryBudget(capacity=20, retry_cost=5, refill_per_s=0)
    client = ThrottlingLambda(throttle=lambda n: n % 2 == 1)  # every other call
    invoker = LambdaInvoker(client, "fn", policy=replace(INVOKE, wait=wait_none()),
                            budget=budget)
    for n in range(50):
        invoker.invoke({"task": n})
    assert client.calls == 100
    assert budget.tokens == pytest.approx(20)


# -- through an executor --------------------------------------------------------------------

def executor_queue(make):
    """An executor on the AWS stack and the URL of its completion queue (the one queue of
    the deployment's prefix that its creation added)."""
    from lambdafutures import config

    client = boto3.client("sqs")
    prefix = config.load_deployment()["queue_prefix"]

    def listed():
        return set(client.list_queues(QueueNamePrefix=prefix).get("QueueUrls", []))

    before = listed()
    executor = make()
    (queue_url,) = listed() - before
    return executor, client, queue_url


def test_an_executor_ignores_poison_and_keeps_working(aws_stack):
    from lambdafutures import LambdaExecutor

    executor, client, queue_url = executor_queue(
        lambda: LambdaExecutor(max_workers=4, backend="aws", timeout=30))
    with executor:
        assert executor.submit(pow, 2, 10).result(timeout=60) == 1024
        for body in ["[]", '"x"', "{}", "not json", "z" * 200_000,
                     json.dumps(record({"some": "other application"})),
                     json.dumps({"hint": "crash", "message": "forged", "event": {}}),
                     json.dumps({"v": protocol.VERSION, "task": "0", "error": "boom"})]:
            client.send_message(QueueUrl=queue_url, MessageBody=body)
        assert list(executor.map(pow, range(12), [2] * 12, timeout=60)) == [
            n * n for n in range(12)]
        assert wait_until_empty(client, queue_url)


def test_shutdown_joins_the_executors_threads_promptly(aws_stack):
    from lambdafutures import LambdaExecutor

    before = set(threading.enumerate())
    executor = LambdaExecutor(max_workers=4, backend="aws", timeout=30)
    assert executor.submit(pow, 3, 2).result(timeout=60) == 9
    started = {thread for thread in set(threading.enumerate()) - before
               if thread.name.startswith("lambdafutures-")
               and not thread.name.startswith("lambdafutures-endpoint")}  # the stack's own
    assert {"lambdafutures-receiver-0", "lambdafutures-acker", "lambdafutures-completion",
            "lambdafutures-invoker-0"} <= {thread.name for thread in started}
    began = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - began < 3.0
    assert not [thread.name for thread in started if thread.is_alive()]
