"""Fault injection: every future ends, with its result or a typed error, whatever breaks.

AWS scenarios run through `tests/faults.py FaultProxy`: one proxy between the
host's boto3 and the Lambda endpoint (invokes), one between the host and moto for SQS and
S3 (completion receives and deletes, stored results), and one between the endpoint's worker
processes and moto for SQS and S3 (completion sends, stored results). Worker-side faults
(crashes, timeouts, large results) run on both backends. Each scenario submits a few hundred
tasks and checks:

- ended == submitted and hung == 0: every future is done within HANG_S;
- lost == 0: no future ended with anything but its task's own outcome (its result, its
  user exception, or the typed error its fault calls for);
- results are correct, user exceptions keep their type and are never retried, and
  `retries=N` re-invokes only after TaskTimeout / WorkerCrashed (the attempt numbers);
- late and duplicate completions are ignored (counted from the executor's debug log).

LAMBDAFUTURES_FAULT_TASKS=1000 runs bigger scenarios. The session prints the table of
figures at the end (and writes it to $LAMBDAFUTURES_FAULT_TABLE when that is set).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from concurrent.futures import CancelledError, wait
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from faults import DELAY, DROP, DUPLICATE, ERROR, RESET, THROTTLE, Rule

from lambdafutures import (
    InvocationFailed,
    LambdaExecutor,
    LambdaFuturesError,
    TaskTimeout,
    WorkerCrashed,
    stats_of,
)

pytestmark = pytest.mark.faults

N = int(os.environ.get("LAMBDAFUTURES_FAULT_TASKS", "200"))
HANG_S = 120.0
BIG = 1024 * 1024
SANDBOXES = 4  # worker processes behind the Lambda endpoint
INVOKE, RECEIVE = "Lambda.Invoke", "AmazonSQS.ReceiveMessage"
SEND = "AmazonSQS.SendMessage"
S3_GET, S3_PUT = "GET /*/tasks/*", "PUT /*/tasks/*"


# -- the task (shipped to workers by value) ---------------------------------------------------

def job(i, mode, marker_dir=None, argument=None):
    """i*i, or the fault `mode` asks for: raise, crash, crash once, sleep, a 1 MB result.
    `argument` only makes the payload big enough to travel through the object store."""
    if mode == "raise":
        raise ValueError(f"task {i} raises on purpose")
    if mode == "crash":
        os._exit(17)
    if mode == "crash_once":
        # The first attempt leaves a marker and dies; a retry finds the marker and runs.
        # (Every sandbox of this test harness runs on this machine, so they share marker_dir.)
        try:
            fd = os.open(os.path.join(marker_dir, str(i)), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os._exit(17)
    if mode == "sleep":
        time.sleep(5)
    if mode == "big":
        return bytes([i % 256]) * BIG
    return i * i


def expected_value(i, mode):
    return bytes([i % 256]) * BIG if mode == "big" else i * i


# -- scenarios ----------------------------------------------------------------------------------

def every(n, k, mode, other="ok"):
    return lambda i: mode if i % n == k else other


def with_raisers(plan):
    """5% of tasks raise a ValueError of their own (never to be retried)."""
    return lambda i: "raise" if i % 20 == 7 else plan(i)


@dataclass
class Scenario:
    name: str
    plan: object                      # task index -> mode
    tasks: int = N
    invoke: list = field(default_factory=list)      # rules: host -> Lambda
    host: list = field(default_factory=list)        # rules: host -> SQS, S3
    worker: list = field(default_factory=list)      # rules: workers -> SQS, S3
    retries: int = 1
    timeout: float | None = None
    deadline_margin: float | None = None
    max_workers: int = 8
    # Typed errors (exact types) any task may end with besides its own outcome: TaskTimeout
    # for a dropped completion, WorkerCrashed for a worker that could not send or store its
    # result past botocore's retries, LambdaFuturesError for a result the host could not read.
    tolerated: tuple = ()
    # Where attempt numbers are free (a retry after a dropped completion hits any task).
    any_attempt: bool = False
    worker_faults: str = ""           # what the plan injects, for the table
    argument_bytes: int = 0           # > inline limit: payloads go through the object store
    all_fail: type | None = None      # every task must end with this error (and no retry)


def _plain(i):
    return "ok"


PROXY_SCENARIOS = [
    Scenario("throttled: 429 on 20% of invokes and of completion receives",
             with_raisers(_plain), invoke=[Rule(INVOKE, THROTTLE, probability=0.2)],
             host=[Rule(RECEIVE, THROTTLE, probability=0.2)]),
    Scenario("throttled for good: 429 on every invoke, retries=2", _plain, tasks=16,
             invoke=[Rule(INVOKE, THROTTLE, every=1)], max_workers=16, retries=2,
             tolerated=(InvocationFailed,), all_fail=InvocationFailed),
    Scenario("500s: 10% of invokes and of completion receives", with_raisers(_plain),
             invoke=[Rule(INVOKE, ERROR, probability=0.1)],
             host=[Rule(RECEIVE, ERROR, probability=0.1)]),
    Scenario("connection resets: 5% of invokes (half after forwarding) and of receives",
             with_raisers(_plain),
             invoke=[Rule(INVOKE, RESET, probability=0.025),
                     Rule(INVOKE, RESET, probability=0.025, after=True)],
             host=[Rule(RECEIVE, RESET, probability=0.05)]),
    Scenario("slow responses: +200 ms on 10% of invokes and receives", with_raisers(_plain),
             invoke=[Rule(INVOKE, DELAY, probability=0.1, delay=0.2)],
             host=[Rule(RECEIVE, DELAY, probability=0.1, delay=0.2)]),
    Scenario("duplicated deliveries: every receive, copies in the same response",
             with_raisers(_plain), host=[Rule(RECEIVE, DUPLICATE, every=1)]),
    Scenario("duplicated deliveries: every receive, copies in the next response",
             with_raisers(_plain), host=[Rule(RECEIVE, DUPLICATE, every=1, later=True)]),
    Scenario("dropped completions: 5% of worker sends, retries=0", _plain,
             worker=[Rule(SEND, DROP, probability=0.05)], retries=0, timeout=3,
             deadline_margin=2, max_workers=16, tolerated=(TaskTimeout,)),
    Scenario("dropped completions: 5% of worker sends, retries=1", _plain,
             worker=[Rule(SEND, DROP, probability=0.05)], retries=1, timeout=3,
             deadline_margin=2, max_workers=16, tolerated=(TaskTimeout,),
             any_attempt=True),
    Scenario("worker completion sends: 500 or 429 on 28% (a few fail past botocore's "
             "3 attempts), retries=1", with_raisers(_plain),
             worker=[Rule(SEND, ERROR, probability=0.15), Rule(SEND, THROTTLE, probability=0.15)],
             tolerated=(WorkerCrashed,), any_attempt=True),
    Scenario("S3 500s: 20% of every GET and PUT (300 KB arguments, 1 MB results), retries=1",
             with_raisers(lambda i: "big"), tasks=max(1, N // 2), argument_bytes=300_000,
             host=[Rule(S3_GET, ERROR, probability=0.2), Rule(S3_PUT, ERROR, probability=0.2)],
             worker=[Rule(S3_GET, ERROR, probability=0.2), Rule(S3_PUT, ERROR, probability=0.2)],
             tolerated=(WorkerCrashed, LambdaFuturesError, InvocationFailed), any_attempt=True),
    Scenario("everything at once, retries=2", with_raisers(every(20, 11, "crash_once")),
             invoke=[Rule(INVOKE, THROTTLE, probability=0.1),
                     Rule(INVOKE, ERROR, probability=0.05),
                     Rule(INVOKE, RESET, probability=0.02, after=True),
                     Rule(INVOKE, DELAY, probability=0.05)],
             host=[Rule(RECEIVE, DUPLICATE, every=2, later=True),
                      Rule(RECEIVE, ERROR, probability=0.05),
                      Rule(RECEIVE, RESET, probability=0.02)],
             worker=[Rule(SEND, DROP, probability=0.03), Rule(SEND, ERROR, probability=0.05)],
             retries=2, timeout=3, deadline_margin=2, max_workers=16,
             tolerated=(TaskTimeout, WorkerCrashed), any_attempt=True, worker_faults="crash"),
]

WORKER_SCENARIOS = [
    Scenario("worker crashes: os._exit in 10% of tasks, retries=0",
             with_raisers(every(10, 3, "crash")), retries=0, worker_faults="crash"),
    Scenario("worker crashes: os._exit on the first attempt of 10%, retries=1",
             with_raisers(every(10, 3, "crash_once")), retries=1, worker_faults="crash"),
    Scenario("tasks past their timeout: timeout=2, a few sleep 5 s, retries=1",
             with_raisers(lambda i: "sleep" if i % (N // 4) == 5 else "ok"), retries=1,
             timeout=2, worker_faults="timeout"),
    Scenario("results too large for inline: 1 MB each", with_raisers(lambda i: "big"),
             tasks=max(1, N // 2), retries=0, worker_faults="large result"),
]


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fault_rows(request):
    """Rows of the table, printed at the end of the session."""
    rows = []
    yield rows
    if rows:
        table = markdown_table(rows)
        request.config._lambdafutures_fault_table = table
        path = os.environ.get("LAMBDAFUTURES_FAULT_TABLE")
        if path:
            with open(path, "w") as f:
                f.write(table + "\n")


@pytest.fixture(scope="module")
def fault_stack(aws_stack):
    """The deployed stack, reached through fault proxies: host -> Lambda endpoint, host ->
    SQS and S3, and the endpoint's workers -> SQS and S3 (an endpoint and sandboxes of its
    own, so that workers reach AWS through a proxy)."""
    from faults import FaultProxy

    from lambdafutures.testing.lambda_endpoint import LambdaEndpoint

    worker = FaultProxy(aws_stack.moto_url, seed=3).start()
    endpoint = LambdaEndpoint(aws_stack.moto_url, concurrency=SANDBOXES, worker_env={
        "AWS_ENDPOINT_URL_SQS": worker.url, "AWS_ENDPOINT_URL_S3": worker.url})
    endpoint.start()
    invoke = FaultProxy(endpoint.url, seed=1).start()
    host = FaultProxy(aws_stack.moto_url, seed=2).start()
    yield SimpleNamespace(invoke=invoke, host=host, worker=worker)
    for proxy in (invoke, host, worker):
        proxy.stop()
    endpoint.stop()


class _IgnoredCompletions(logging.Handler):
    """Counts the completions the executor ignored as duplicate or stale."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if record.msg.startswith("dropping a duplicate or stale completion"):
            self.count += 1


@pytest.fixture
def ignored_completions():
    logger = logging.getLogger("lambdafutures")
    handler = _IgnoredCompletions()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- running one scenario -------------------------------------------------------------------------

def run(scenario, backend, executor, marker_dir, ignored, injected):
    """Submit the scenario's tasks, wait for them, and return the row of figures (asserting
    nothing yet)."""
    modes = [scenario.plan(i) for i in range(scenario.tasks)]
    ended_at = []
    argument = b"a" * scenario.argument_bytes if scenario.argument_bytes else None
    start = time.monotonic()
    futures = []
    for i, mode in enumerate(modes):
        future = executor.submit(job, i, mode, marker_dir, argument)
        future.add_done_callback(lambda f: ended_at.append(time.monotonic()))
        futures.append(future)
    done, not_done = wait(futures, timeout=HANG_S)
    seconds = (max(ended_at) - start) if ended_at else float("nan")

    correct = 0
    errors = Counter()
    problems = []  # (task, what is wrong): each is a lost task
    for i, (future, mode) in enumerate(zip(futures, modes, strict=True)):
        if future not in done:
            continue
        problem = check(scenario, i, mode, future, errors)
        if problem is None:
            correct += future.exception() is None
        else:
            problems.append((i, problem))
    faults = dict(injected())
    planned = Counter(m for m in modes if m in ("crash", "crash_once", "sleep", "big"))
    if planned:
        names = {"crash": "crash", "crash_once": "crash", "sleep": "timeout", "big": "1 MB"}
        for mode, count in planned.items():
            faults[names[mode]] = faults.get(names[mode], 0) + count
    expected_ok = sum(m in ("ok", "big", "crash_once") for m in modes)
    rerun = sum(1 for f in done if stats_of(f) is not None and stats_of(f).attempt > 0)
    return SimpleNamespace(
        scenario=scenario.name, backend=backend, submitted=len(futures), ended=len(done),
        hung=len(not_done), lost=len(problems), rerun=rerun, problems=problems, correct=correct,
        expected_ok=expected_ok, errors=errors, faults=faults, ignored=ignored.count,
        seconds=seconds, futures=futures, modes=modes)


def check(scenario, i, mode, future, errors):
    """None if the future ended as task i with `mode` must; else what is wrong. Counts its
    error by type."""
    try:
        exception = future.exception()
    except CancelledError:
        return "cancelled"
    stats = stats_of(future)
    attempt = stats.attempt if stats is not None else None
    if exception is not None:
        errors[type(exception).__name__] += 1
    if exception is not None and type(exception) in scenario.tolerated:
        return None  # e.g. its completion was dropped: the host's deadline ended it, typed
    if mode == "raise":
        if not (type(exception) is ValueError and f"task {i} raises" in str(exception)):
            return f"expected its ValueError, got {exception!r}"
        if attempt != 0 and not scenario.any_attempt:
            return f"a user exception was retried (attempt {attempt})"
        return None
    if mode in ("crash", "sleep"):
        kind = WorkerCrashed if mode == "crash" else TaskTimeout
        if not isinstance(exception, kind):
            return f"expected {kind.__name__}, got {exception!r}"
        if attempt != scenario.retries and not scenario.any_attempt:
            return f"expected {scenario.retries} retries, made {attempt}"
        return None
    if exception is not None:
        return f"expected a result, got {exception!r}"
    if future.result() != expected_value(i, mode):
        return "wrong result"
    wanted = 1 if mode == "crash_once" else 0
    if attempt != wanted and not scenario.any_attempt:
        return f"expected attempt {wanted}, ended at attempt {attempt}"
    return None


def finish(executor, row, fault_rows, scenario):
    """Shut the executor down (without waiting on hung tasks), record and assert the row."""
    executor.shutdown(wait=row.hung == 0, cancel_futures=True)
    fault_rows.append(row)
    print(format_row(row))
    assert row.hung == 0, f"{row.hung} futures not done within {HANG_S:g} s"
    assert row.ended == row.submitted
    for future in row.futures:
        exception = future.exception()
        # Typed: the user's own ValueError, or one of lambdafutures' errors.
        assert exception is None or isinstance(exception, (ValueError, LambdaFuturesError)), \
            repr(exception)
    assert row.lost == 0, f"lost tasks: {row.problems[:10]}"
    tolerated = sum(row.errors[t.__name__] for t in scenario.tolerated)
    # None of the faults in these scenarios is a version mismatch or a broken executor.
    assert not {"RuntimeMismatch", "BrokenExecutor"} & set(row.errors), row.errors
    assert row.correct + tolerated >= row.expected_ok
    assert row.correct <= row.expected_ok
    if not scenario.tolerated:
        assert row.correct == row.expected_ok


# -- the tests ------------------------------------------------------------------------------------

def aws_executor(stack, scenario):
    options = {}
    if scenario.deadline_margin is not None:
        options["deadline_margin"] = scenario.deadline_margin
    # A lost completion is found by the host's deadline, which on AWS counts from the event's
    # expiry in Lambda's queue: the fault stack has no such queue, so a short expiry keeps
    # the scenarios that lose messages within HANG_S.
    return LambdaExecutor(
        max_workers=scenario.max_workers, backend="aws", timeout=scenario.timeout,
        retries=scenario.retries, queue_expiry=5,
        endpoint_urls={"lambda": stack.invoke.url, "sqs": stack.host.url, "s3": stack.host.url},
        **options)


@pytest.mark.parametrize("scenario", PROXY_SCENARIOS, ids=lambda s: s.name.split(":")[0])
def test_proxy_faults(scenario, fault_stack, fault_rows, ignored_completions, tmp_path):
    proxies = {"invoke": fault_stack.invoke, "host": fault_stack.host,
               "worker": fault_stack.worker}
    for name, proxy in proxies.items():
        proxy.reset(getattr(scenario, name))
    executor = aws_executor(fault_stack, scenario)

    def injected():
        total = Counter()
        for proxy in proxies.values():
            total.update(proxy.injected)
        return total

    row = run(scenario, "aws", executor, str(tmp_path), ignored_completions, injected)
    for proxy in proxies.values():
        proxy.reset()
    finish(executor, row, fault_rows, scenario)
    if scenario.all_fail is not None:
        # Bounded retries of the invoke (tenacity), then the typed error; never a re-run.
        assert row.errors[scenario.all_fail.__name__] == row.submitted
        assert row.rerun == 0
    if scenario.worker and scenario.worker[0].fault == DROP and not scenario.invoke:
        drops = row.faults.get(DROP, 0)
        assert drops > 0
        timeouts = row.errors["TaskTimeout"]
        if scenario.retries == 0:
            # Each dropped completion ends its future, typed, at the host's deadline.
            assert timeouts == drops
        else:
            # Each drop either made a retry or, dropped again, ended in TaskTimeout.
            retried = sum(stats_of(f).attempt for f in row.futures)
            assert retried + timeouts == drops


@pytest.mark.parametrize("backend", ["local", "aws"])
@pytest.mark.parametrize("scenario", WORKER_SCENARIOS, ids=lambda s: s.name.split(":")[0])
def test_worker_faults(scenario, backend, request, fault_rows, ignored_completions, tmp_path):
    if backend == "aws":
        stack = request.getfixturevalue("fault_stack")
        for proxy in (stack.invoke, stack.host, stack.worker):
            proxy.reset()
        executor = aws_executor(stack, scenario)
    else:
        executor = LambdaExecutor(max_workers=SANDBOXES, backend="local",
                                  timeout=scenario.timeout, retries=scenario.retries)
    marker_dir = tmp_path / f"markers-{uuid.uuid4().hex[:8]}"
    marker_dir.mkdir()
    row = run(scenario, backend, executor, str(marker_dir), ignored_completions, Counter)
    finish(executor, row, fault_rows, scenario)


def test_a_completion_the_worker_cannot_send_is_a_failed_attempt(fault_stack):
    """SQS refuses the worker's completion past botocore's 3 attempts: the handler raises,
    Lambda posts a failure record, and the task ends WorkerCrashed, or runs again."""
    scenario = Scenario("", _plain, retries=1)
    with aws_executor(fault_stack, scenario) as executor:
        for proxy in (fault_stack.invoke, fault_stack.host):
            proxy.reset()
        fault_stack.worker.reset([Rule(SEND, ERROR, every=1, limit=3)])
        future = executor.submit(job, 3, "ok")
        assert future.result(timeout=60) == 9
        assert stats_of(future).attempt == 1
        assert fault_stack.worker.injected[ERROR] == 3
    scenario.retries = 0
    with aws_executor(fault_stack, scenario) as executor:
        fault_stack.worker.reset([Rule(SEND, ERROR, every=1, limit=3)])
        with pytest.raises(WorkerCrashed, match="SendMessage"):
            executor.submit(job, 3, "ok").result(timeout=60)
        assert executor.submit(job, 4, "ok").result(timeout=60) == 16
    fault_stack.worker.reset()


def test_a_result_the_host_cannot_read_at_first_still_arrives(fault_stack):
    """S3 fails the host's GetObject of a stored result past botocore's 3 attempts: the read
    is retried under its own policy, the future gets its result, and the object is deleted
    only after that. A result that stays unreadable ends only its own future, typed."""
    with aws_executor(fault_stack, Scenario("", _plain, retries=0)) as executor:
        for proxy in (fault_stack.invoke, fault_stack.worker):
            proxy.reset()
        fault_stack.host.reset([Rule(S3_GET, ERROR, every=1, limit=3)])
        future = executor.submit(job, 1, "big")
        assert future.result(timeout=60) == expected_value(1, "big")
        assert fault_stack.host.injected[ERROR] == 3
        fault_stack.host.reset([Rule(S3_GET, ERROR, every=1)])
        future = executor.submit(job, 2, "big")
        with pytest.raises(LambdaFuturesError, match="could not be read"):
            future.result(timeout=60)
        fault_stack.host.reset()
        assert executor.submit(job, 2, "big").result(timeout=60) == expected_value(2, "big")
        assert executor.submit(job, 3, "ok").result(timeout=60) == 9
    fault_stack.host.reset()


def test_failure_records_reach_the_next_executor_at_once(fault_stack):
    """An executor that has shut down still has a long poll on the shared failure queue for
    up to 20 s; the records it receives are handed back, not kept invisible for the queue's
    30 s visibility timeout, so the next executor's crashes are reported without delay."""
    for proxy in (fault_stack.invoke, fault_stack.host, fault_stack.worker):
        proxy.reset()
    scenario = Scenario("", _plain, retries=0)
    for _ in range(2):
        with aws_executor(fault_stack, scenario) as executor:
            start = time.monotonic()
            with pytest.raises(WorkerCrashed):
                executor.submit(job, 0, "crash").result(timeout=60)
            assert time.monotonic() - start < 15


def test_a_cold_sandbox_does_not_spend_the_task_timeout(aws_stack):
    """Fresh sandboxes import boto3 and build their clients (about a second) before the
    task's time limit starts: trivial tasks under a 0.5 s timeout all succeed."""
    from lambdafutures.testing.lambda_endpoint import LambdaEndpoint

    endpoint = LambdaEndpoint(aws_stack.moto_url, concurrency=2)
    endpoint.start()
    try:
        with LambdaExecutor(max_workers=2, backend="aws", timeout=0.5,
                            endpoint_urls={"lambda": endpoint.url}) as executor:
            futures = [executor.submit(job, i, "ok") for i in range(4)]
            assert [f.result(timeout=60) for f in futures] == [0, 1, 4, 9]
            assert sum(stats_of(f).cold_start for f in futures) == 2
    finally:
        endpoint.stop()


def test_failure_records_name_the_failure():
    """A Lambda failure record whose handler raised anything but ProtocolError (S3 or SQS
    failing under the worker) is a failed attempt, retryable, not a version mismatch."""
    from lambdafutures.backends.aws import failure_from_record
    from lambdafutures_handler import protocol

    def kind(error_type):
        return failure_from_record({"requestContext": {"condition": "RetriesExhausted"},
                                    "responsePayload": {"errorType": error_type,
                                                        "errorMessage": "..."}})[0]

    assert kind("ClientError") == protocol.CRASH
    assert kind("ConnectionClosedError") == protocol.CRASH
    assert kind("Runtime.ExitError") == protocol.CRASH
    assert kind("ProtocolError") == protocol.PROTOCOL
    assert kind("Sandbox.Timedout") == protocol.TIMEOUT


# -- the table ------------------------------------------------------------------------------------

HEADER = ("| scenario | backend | tasks | faults injected | futures ended | correct results "
          "| typed errors | re-invoked by `retries` | late/duplicate completions ignored | lost "
          "| hung | s to last end |")


def format_faults(faults):
    return ", ".join(f"{count} {kind}" for kind, count in sorted(faults.items())) or "0"


def format_errors(errors):
    return ", ".join(f"{count} {name}" + (" (user)" if name == "ValueError" else "")
                     for name, count in sorted(errors.items())) or "0"


def format_row(row):
    return (f"| {row.scenario} | {row.backend} | {row.submitted} | {format_faults(row.faults)} "
            f"| {row.ended} | {row.correct} | {format_errors(row.errors)} | {row.rerun} "
            f"| {row.ignored} "
            f"| {row.lost} | {row.hung} | {row.seconds:.1f} |")


def markdown_table(rows):
    divider = "|" + "|".join(" --- " for _ in range(HEADER.count("|") - 1)) + "|"
    return "\n".join([HEADER, divider, *(format_row(row) for row in rows)])
