"""The trust model under attack (issue 8), against the moto stack over HTTP.

Each attack uses only what a principal of the deployment has (tests/attacker.py): SQS
receive and send on the deployment's queues, the worker role's S3 GetObject / PutObject
under the prefix, and InvokeFunction. What must hold:
- no secret travels: the executor's key is in no failure record, completion, log line or
  exception;
- nothing from a queue is acted on unless this executor signed it: forged, replayed,
  renamed and malformed messages leave every future with its true result, every task run
  exactly once, nothing unpickled and no other executor's object touched;
- Lambda's failure records (unsigned) only end a live attempt whose own signed event they
  carry;
- a foreign invoke of the function, or poison on the shared failure queue, breaks nothing;
- a warm sandbox keeps nothing of one executor for the next executor's tasks.

A task reaching the host filesystem (marker files) is a convenience of the local stack
only: its sandboxes are processes on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback

import pytest
from attacker import (
    Principal,
    forgeries,
    lambda_record,
    leaks,
    record_event,
    records_about,
    search_sandbox,
    wait_for,
)
from events import call_payload, new_executor_id, signed_event

import lambdafutures
from lambdafutures import LambdaExecutor, TaskTimeout, WorkerCrashed
from lambdafutures_handler import protocol

pytestmark = [
    # A library thread dying with an exception during a test fails that test.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
    pytest.mark.timeout(240),
]

# How long a held task waits for the test to release it, at most.
HOLD_LIMIT_S = 60


@pytest.fixture
def principal(aws_stack):
    attacker = Principal(aws_stack.config)
    yield attacker
    attacker.close()


@pytest.fixture
def open_executor(aws_stack):
    """open_executor(**options) -> a LambdaExecutor on the stack. Left open by a failing
    test, it is abandoned (its futures end at once) rather than waited for."""
    made = []

    def open_(**options):
        options.setdefault("queue_expiry", None)  # deadlines of 60 s, not 11 min
        made.append(LambdaExecutor(backend="aws", **options))
        return made[-1]

    yield open_
    for ex in made:
        ex._scheduler.abandon("the test is over")


@pytest.fixture
def debug_log(caplog):
    caplog.set_level(logging.DEBUG, logger="lambdafutures")
    return caplog


# -- what the tasks do (shipped by value to the sandboxes) ------------------------------------

def identity(x):
    return x


def raise_value_error(text):
    raise ValueError(text)


def _mark(marker_dir, name):
    with open(os.path.join(marker_dir, str(name)), "a") as f:
        f.write("ran\n")


def mark_and_hold(marker_dir, name, value):
    """Mark a run, then wait until the test releases the tasks: they are running (live)
    for as long as the test needs, without a guess at how long that is."""
    _mark(marker_dir, name)
    release = os.path.join(marker_dir, "release")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def release(marker_dir) -> None:
    (marker_dir / "release").touch()


def mark_and_crash(marker_dir, name):
    _mark(marker_dir, name)
    os._exit(3)


def runs(marker_dir, name) -> int:
    try:
        with open(os.path.join(marker_dir, str(name))) as f:
            return f.read().count("ran\n")
    except FileNotFoundError:
        return 0


def texts_of(future) -> dict[str, str]:
    exc = future.exception()
    if exc is None:
        return {}
    return {"str": str(exc), "repr": repr(exc),
            "traceback": "".join(traceback.format_exception(exc))}


def log_text(caplog) -> str:
    return caplog.text + "\n".join(record.getMessage() for record in caplog.records)


def logged(caplog, text: str, timeout: float = 15.0) -> bool:
    return wait_for(lambda: text in caplog.text, timeout)


# -- 1. no secret travels ---------------------------------------------------------------------

def test_the_key_is_in_no_record_log_or_error(open_executor, principal, debug_log):
    failure_queue = principal.failure_queue_url
    seen: dict[str, str | bytes] = {}
    # The executor reads a queue of its own for failures: the records on the deployment's
    # queue are the attacker's to read and forward.
    # Its own deadline far off, so that only a record can end the crashed task.
    ex = open_executor(timeout=2, failure_queue_url=principal.new_queue(), deadline_margin=180)
    executor = ex._scheduler.id
    queue = principal.queue_of(executor)
    key = principal.key_of(executor)
    assert len(key) == 32
    ok = ex.submit(identity, 5)                 # task 0
    raised = ex.submit(raise_value_error, "boom")  # task 1
    slow = ex.submit(time.sleep, 60)            # task 2
    crashed = ex.submit(os._exit, 3)            # task 3
    assert ok.result(timeout=60) == 5
    with pytest.raises(ValueError, match="boom"):
        raised.result(timeout=60)
    with pytest.raises(TaskTimeout):
        slow.result(timeout=60)

    # Lambda's records: the crash, and the sandbox that the timeout ended.
    def both(got):
        return {record_event(m)["task"] for m in records_about(got, executor)} >= {2, 3}
    records = principal.receive_until(failure_queue, both, timeout=60)
    ours = records_about(records, executor)
    assert both(records), [m["Body"][:300] for m in records]
    for n, message in enumerate(records):
        seen[f"failure record {n}"] = message["Body"]
    assert not crashed.done()  # nothing told the executor yet

    # Forwarded as a sibling executor would: the crash ends its live attempt, typed;
    # the record of the timed-out task (ended already) and others' records change nothing.
    for message in records:
        principal.send(queue, message["Body"])
    with pytest.raises(WorkerCrashed):
        crashed.result(timeout=60)
    assert principal.wait_until_empty(queue)
    assert logged(debug_log, "dropping a failure report of a finished attempt: task 2 "
                             "attempt 0")
    assert ok.result() == 5 and isinstance(slow.exception(), TaskTimeout)
    principal.delete(failure_queue, ours)
    principal.release(failure_queue, [m for m in records if m not in ours])
    ex.shutdown()
    for name, future in {"raised": raised, "slow": slow, "crashed": crashed}.items():
        for kind, text in texts_of(future).items():
            seen[f"{name} exception {kind}"] = text
    seen["log"] = log_text(debug_log)
    assert leaks(key, seen) == []


def test_the_worker_sends_no_key_in_any_completion(aws_stack, principal):
    from lambdafutures_handler import handle

    reply = principal.new_queue()
    store = f"s3://{principal.bucket}/{principal.prefix}"
    executor = new_executor_id()

    def event(task, data, **changes):
        made, _ = signed_event(store, reply, executor, task, data, key=key)
        made.update(changes)
        protocol.sign_event(key, made)  # the host's own event, with these fields
        return made

    first, key = signed_event(store, reply, executor, 0, call_payload(abs, -3))
    events = [
        first,
        event(1, call_payload(raise_value_error, "boom")),                # user error
        event(2, b"not a pickle"),                                         # serialization
        event(3, call_payload(bytes, 400_000)),                            # stored result
        event(4, call_payload(abs, -1), host={"python": "3.99", "cloudpickle": "0"}),
        event(5, call_payload(abs, -1), payload_sha256="0" * 64),          # tampered payload
        event(6, call_payload(abs, -1), expires_at=time.time() - 5),       # expired
    ]
    for each in events:
        handle(each, None)
    seen: dict[str, str | bytes] = {f"event {e['task']}": json.dumps(e) for e in events}
    forged = dict(first, sig="0" * 64)
    with pytest.raises(protocol.ProtocolError) as refused:
        handle(forged, None)  # no reply: the platform records the error (and the event)
    seen["refusal"] = "".join(traceback.format_exception(refused.value))

    messages = principal.receive_until(reply, lambda got: len(got) >= len(events))
    replies = [json.loads(m["Body"]) for m in messages]
    assert sorted(r["task"] for r in replies) == list(range(len(events)))
    assert all(protocol.completion_is_signed(key, r) for r in replies)
    kinds = {r["task"]: r["error"]["kind"] if r["error"] else r["status"] for r in replies}
    assert kinds == {0: "ok", 1: protocol.USER, 2: protocol.SERIALIZATION, 3: "ok",
                     4: protocol.MISMATCH, 5: protocol.SIGNATURE, 6: protocol.NOT_RUN}
    for message in messages:
        seen[f"completion {json.loads(message['Body'])['task']}"] = message["Body"]
    seen["stored result"] = principal.get(protocol.result_key(executor, 3, 0))
    assert leaks(key, seen) == []


# -- 2. forged, replayed and malformed completions ------------------------------------------

def test_forged_replayed_and_malformed_completions_change_nothing(
        open_executor, principal, debug_log, tmp_path):
    markers, trap = tmp_path / "runs", tmp_path / "trapped"
    markers.mkdir()
    other = new_executor_id()
    other_object = protocol.result_key(other, 0, 0)
    principal.put(other_object, b"another executor's result")
    ex = open_executor(max_workers=4, retries=1)
    executor = ex._scheduler.id
    queue = principal.queue_of(executor)
    futures = [ex.submit(mark_and_hold, str(markers), n, n * 10) for n in range(4)]
    assert wait_for(lambda: all(runs(markers, n) for n in range(4)), 60)
    key = principal.key_of(executor)  # stands for an eavesdropped genuine message
    bodies, captured = forgeries(executor, key, other, str(trap))
    for body in bodies:
        principal.send(queue, body)
    assert principal.wait_until_empty(queue)
    assert not any(future.done() for future in futures)
    release(markers)
    assert [future.result(timeout=60) for future in futures] == [0, 10, 20, 30]
    principal.send(queue, json.dumps(captured))  # byte for byte, after task 3 ended
    assert principal.wait_until_empty(queue)
    assert logged(debug_log, "dropping a duplicate or stale completion: task 3 attempt 0")
    assert futures[3].result() == 30

    assert [runs(markers, n) for n in range(4)] == [1, 1, 1, 1]
    assert not trap.exists()
    assert principal.exists(other_object)
    log = log_text(debug_log)
    assert "whose signature does not verify" in log
    assert f"a completion for executor '{other}'" in log
    assert ex.submit(identity, 7).result(timeout=60) == 7
    ex.shutdown()
    assert not trap.exists() and principal.exists(other_object)


@pytest.mark.parametrize("where", ["own queue", "shared failure queue"])
def test_deeply_nested_json_is_dropped(open_executor, principal, where):
    """JSON nested past the parser's recursion limit raises RecursionError, not ValueError:
    it must be dropped like any other body that is not a completion. On the shared failure
    queue it would otherwise stop every executor of the deployment."""
    ex = open_executor()
    queue = (principal.queue_of(ex._scheduler.id) if where == "own queue"
             else principal.failure_queue_url)
    try:
        principal.send(queue, "[" * 100_000 + "]" * 100_000)
        principal.send(queue, '{"a":' * 40_000 + "1" + "}" * 40_000)
        principal.wait_until_empty(queue, timeout=15)  # taken, or the executor broke
        assert ex.submit(identity, 3).result(timeout=60) == 3
        assert principal.wait_until_empty(queue)
        ex.shutdown()
    finally:
        if where != "own queue" and not principal.is_empty(queue):
            principal.purge(queue)  # poison left behind would break the next tests


# -- 3. hints ---------------------------------------------------------------------------------

def take_record(principal, executor: str, attempt: int, timeout: float = 60.0) -> str:
    """The body of Lambda's record of `executor`'s attempt `attempt` (of any task), taken
    off the deployment's failure queue; others' records are put back."""
    def found(got):
        return [m for m in records_about(got, executor) if record_event(m)["attempt"] == attempt]

    url = principal.failure_queue_url
    got = principal.receive_until(url, found, timeout)
    mine = found(got)
    principal.release(url, [m for m in got if m not in mine])
    assert len(mine) == 1, f"{len(mine)} records of attempt {attempt} of executor {executor}"
    principal.delete(url, mine)
    return mine[0]["Body"]


def test_failure_records_start_nothing_unless_genuine_and_live(
        open_executor, principal, debug_log, tmp_path):
    markers = tmp_path / "runs"
    markers.mkdir()
    # The executor's failures go to a queue of its own: the records on the deployment's
    # queue reach it only as the attacker forwards them.
    ex = open_executor(retries=1, failure_queue_url=principal.new_queue())
    executor = ex._scheduler.id
    queue = principal.queue_of(executor)
    crashing = ex.submit(mark_and_crash, str(markers), "crash")                 # task 0
    steady = ex.submit(mark_and_hold, str(markers), "steady", "steady")         # task 1

    first = take_record(principal, executor, attempt=0)
    assert json.loads(first)["requestPayload"]["task"] == 0
    assert wait_for(lambda: runs(markers, "steady") == 1, 60)
    # The crashed attempt's real event, renamed to the running task or to a later attempt:
    # its signature fails, so it ends nothing and starts nothing.
    for field, value in (("task", 1), ("attempt", 1)):
        forged = json.loads(first)
        forged["requestPayload"][field] = value
        principal.send(queue, forged)
    assert principal.wait_until_empty(queue)
    assert logged(debug_log, "a failure report whose event this executor did not sign")
    assert not steady.done() and not crashing.done()

    # The genuine records: attempt 0 ends and, with retries=1, attempt 1 runs and crashes.
    principal.send(queue, first)
    second = take_record(principal, executor, attempt=1)
    principal.send(queue, second)
    with pytest.raises(WorkerCrashed):
        crashing.result(timeout=60)
    # Byte for byte again, after the task ended: no attempt is live, so nothing happens.
    for body in (first, second):
        principal.send(queue, body)
    assert principal.wait_until_empty(queue)
    assert logged(debug_log, "dropping a failure report of a finished attempt: task 0 attempt 1")
    assert not steady.done()
    release(markers)
    assert steady.result(timeout=60) == "steady"
    assert ex.submit(identity, 1).result(timeout=60) == 1
    ex.shutdown()
    assert runs(markers, "crash") == 2 and runs(markers, "steady") == 1


def test_a_rewritten_failure_record_cannot_run_a_task_again(
        open_executor, principal, tmp_path):
    """A genuine record, taken off the shared queue and rewritten to say that Lambda never
    ran the event (EventAgeExceeded), must not run again a task that ran: the kind a record
    states is unsigned, so it may end an attempt but not buy it extra runs."""
    markers = tmp_path / "runs"
    markers.mkdir()
    ex = open_executor(retries=0, failure_queue_url=principal.new_queue(),
                       queue_expiry=600)  # relaunches of events Lambda dropped are on
    executor = ex._scheduler.id
    queue = principal.queue_of(executor)
    crashing = ex.submit(mark_and_crash, str(markers), "crash")
    rewritten = json.loads(take_record(principal, executor, attempt=0))
    rewritten["requestContext"].update(condition="EventAgeExceeded", approximateInvokeCount=0)
    for field in ("responseContext", "responsePayload"):
        rewritten.pop(field, None)
    principal.send(queue, rewritten)
    assert principal.wait_until_empty(queue)
    # Had the executor run it again, that attempt's own record would follow: deliver it.
    if not wait_for(crashing.done, 10):
        principal.send(queue, take_record(principal, executor, attempt=1, timeout=20))
    assert wait_for(crashing.done, 20)
    assert runs(markers, "crash") == 1
    ex.shutdown()


# -- 4. a foreign invoke ----------------------------------------------------------------------

def test_a_foreign_invoke_leaves_executors_working(open_executor, principal):
    failure_queue = principal.failure_queue_url
    principal.invoke_async(b'{"hello": 1}')
    got = principal.receive_until(
        failure_queue, lambda got: any(record_event(m) == {"hello": 1} for m in got), 60)
    foreign = [m for m in got if record_event(m) == {"hello": 1}]
    assert foreign, "the foreign invoke left no failure record"
    assert set(json.loads(foreign[0]["Body"])) >= {"requestContext", "requestPayload"}
    principal.release(failure_queue, got)  # there for the executor to meet

    # Default options: it reads the deployment's failure queue itself.
    ex = open_executor(timeout=30, queue_expiry=600)
    principal.invoke_async(b'{"hello": 1}')  # and another while it runs
    for poison in ("[]", "not json", json.dumps(lambda_record("a string payload"))):
        principal.send(failure_queue, poison)
    started = time.monotonic()
    crashed = ex.submit(os._exit, 3)
    with pytest.raises(WorkerCrashed):
        crashed.result(timeout=60)
    assert time.monotonic() - started < 15, "ended by the host's deadline, not the record"
    assert list(ex.map(identity, range(5))) == list(range(5))
    assert principal.wait_until_empty(failure_queue)
    assert ex.submit(identity, 9).result(timeout=60) == 9
    ex.shutdown()


# -- 5. sandbox hygiene -----------------------------------------------------------------------

def closure_over(secret):
    def task(x, also_secret):
        print(f"the secret is {secret}")  # its output, too, must not stay behind
        logging.getLogger("a-user").warning("the secret is %s", also_secret)
        time.sleep(0.3)  # so that the tasks spread over the sandboxes
        return x + len(secret) + len(also_secret)
    return task


def big_closure_over(secret):
    # Big enough to travel as a blob, which warm sandboxes cache (lambdafutures/shared.py).
    big = secret.encode() * (2 * 1024 * 1024 // len(secret))

    def task(x, also_secret):
        time.sleep(0.3)
        return x + len(secret) + len(also_secret) + (also_secret.encode() in big)
    return task


def test_a_warm_sandbox_keeps_nothing_of_the_previous_executor(open_executor):
    secret = f"lf-secret-{new_executor_id()}"
    overlap: set[str] = set()
    for tasks in (8, 16, 32):
        a = open_executor(max_workers=4)
        small, big = closure_over(secret), big_closure_over(secret)
        futures = [a.submit(small if n % 2 else big, n, secret) for n in range(tasks)]
        assert [f.result(timeout=60) for f in futures] == [
            n + 2 * len(secret) + (0 if n % 2 else 1) for n in range(tasks)]
        assert secret in lambdafutures.output_of(futures[1])
        used_by_a = {lambdafutures.stats_of(f).worker_id for f in futures}
        a_id = a._scheduler.id
        # The search works: within A, sandboxes keep A's function and blobs (warm starts).
        controls = [a.submit(search_sandbox, secret[::-1], "-") for _ in range(8)]
        kept = [item for f in controls for item in f.result(timeout=60)[1]]
        assert "worker._functions" in kept and any(item.startswith("a dict") for item in kept)
        a.shutdown()
        b = open_executor(max_workers=4)
        results = [f.result(timeout=60) for f in
                   [b.submit(search_sandbox, secret[::-1], a_id) for _ in range(tasks)]]
        b.shutdown()
        for worker_id, found in results:
            assert found == [], f"sandbox {worker_id} kept {found}"
        overlap = used_by_a & {worker_id for worker_id, _ in results}
        if overlap:
            break
    assert overlap, "no task of B ran in a sandbox that A used"
