"""The worker under AWS's real Lambda runtime interface client.

`python -m awslambdaric lambdafutures_handler.worker.handle` runs as a subprocess against the
Runtime API emulator in tests/runtime_api.py, exactly as Lambda's python runtime would run
it: the client imports the handler by its handler string, builds the real LambdaContext from
the invocation headers and environment, calls `handle(event, context)`, and posts the return
value (or the raised exception) back. S3 and SQS are the session's moto server, so the
completions the worker sends can be read off a real queue.

This proves the handler's signature, its use of the context (request id, memory size,
remaining time for the timeout watchdog) and both of its ways of failing: through a
completion for anything that goes wrong in the task, and by raising for an event it cannot
read, which the runtime reports as a function error.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

try:
    import awslambdaric.bootstrap  # noqa: F401 - only whether it imports matters here
except ImportError as exc:  # the wheel only installs on Linux
    pytest.skip(f"awslambdaric cannot be imported: {exc}", allow_module_level=True)

import cloudpickle
from events import call_payload, new_executor_id, signed_event
from runtime_api import RuntimeAPI

from lambdafutures_handler import protocol

HANDLER = "lambdafutures_handler.worker.handle"
MEMORY_MB = 512
FUNCTION_NAME = "lambdafutures-runtime-test"
START_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 15.0


# -- functions the "host" submits (pickled by value: the worker cannot import this file) ------

def add(a, b):
    return a + b


def big_bytes(n):
    return bytes(range(256)) * (n // 256)


def fail(message):
    raise ValueError(message)


def sleep_then_return(seconds):
    time.sleep(seconds)
    return "woke up"


# -- fixtures -------------------------------------------------------------------------------

class AWS:
    """A bucket and a queue in moto, and a reader for the completions on the queue."""

    def __init__(self) -> None:
        import boto3

        self.s3 = boto3.client("s3")
        self.sqs = boto3.client("sqs")
        name = f"lf-runtime-{uuid.uuid4().hex[:8]}"
        self.bucket = name
        self.prefix = "jobs"
        self.s3.create_bucket(Bucket=self.bucket)
        self.store_url = f"s3://{self.bucket}/{self.prefix}"
        self.queue_url = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        self._received: dict[tuple[str, int], list[dict]] = {}

    def _drain(self, wait_s: int) -> None:
        response = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10,
                                            WaitTimeSeconds=wait_s)
        for message in response.get("Messages", ()):
            body = json.loads(message["Body"])
            self._received.setdefault((body["executor"], body["task"]), []).append(body)
            self.sqs.delete_message(QueueUrl=self.queue_url,
                                    ReceiptHandle=message["ReceiptHandle"])

    def completion(self, executor: str, task: int, timeout: float) -> dict | None:
        """The first completion for (executor, task), waiting up to `timeout` s."""
        end = time.monotonic() + timeout
        while True:
            found = self._received.get((executor, task))
            if found:
                return found[0]
            if time.monotonic() >= end:
                return None
            self._drain(1)

    def completions(self, executor: str, task: int) -> list[dict]:
        """Every completion for (executor, task) received so far (after one more poll)."""
        self._drain(0)
        return list(self._received.get((executor, task), ()))


class Runtime:
    """`python -m awslambdaric` against the emulator; restarted if a test ended it."""

    def __init__(self, api: RuntimeAPI, workdir) -> None:
        self.api = api
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.invocations = 0  # events handled by the current process
        self._starts = 0
        self.log_path = None

    def ensure_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self._starts += 1
        self.log_path = self.workdir / f"runtime-{self._starts}.log"
        env = dict(os.environ)  # the moto endpoint and dummy credentials, from the fixture
        for name in ("AWS_EXECUTION_ENV", "AWS_LAMBDA_MAX_CONCURRENCY",
                     "AWS_LAMBDA_INITIALIZATION_TYPE", "_LAMBDA_TELEMETRY_LOG_FD",
                     "LAMBDAFUTURES_INLINE_LIMIT"):
            env.pop(name, None)
        env.update({
            "AWS_LAMBDA_RUNTIME_API": self.api.address,
            "AWS_LAMBDA_FUNCTION_NAME": FUNCTION_NAME,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(MEMORY_MB),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{FUNCTION_NAME}",
            "AWS_LAMBDA_LOG_STREAM_NAME": f"2024/01/01/[$LATEST]{uuid.uuid4().hex}",
            "PYTHONUNBUFFERED": "1",
        })
        polls_before = self.api.next_calls
        with open(self.log_path, "wb") as log:
            # cwd is an empty directory: the handler must import from the installed package.
            self.proc = subprocess.Popen([sys.executable, "-m", "awslambdaric", HANDLER],
                                         cwd=self.workdir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.invocations = 0
        end = time.monotonic() + START_TIMEOUT_S
        while self.api.next_calls <= polls_before:
            if self.proc.poll() is not None:
                pytest.fail(f"the runtime exited with {self.proc.returncode} before polling "
                            f"for an event:\n{self.logs()}")
            if time.monotonic() > end:
                pytest.fail(f"the runtime did not poll for an event in {START_TIMEOUT_S} s:\n"
                            f"{self.logs()}")
            time.sleep(0.02)
        assert not self.api.init_errors, self.logs()

    def invoke(self, event, timeout_s: float = 30.0) -> str:
        self.ensure_running()
        self.invocations += 1
        return self.api.invoke(event, timeout_s=timeout_s)

    def outcome(self, request_id: str, timeout: float = CALL_TIMEOUT_S):
        outcome = self.api.wait_outcome(request_id, timeout)
        assert outcome is not None, f"no outcome for {request_id}:\n{self.logs()}"
        return outcome

    def logs(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return "(no runtime log)"
        return "--- runtime log (tail) ---\n" + text[-4000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def aws(moto_server) -> AWS:
    return AWS()


@pytest.fixture(scope="module")
def runtime(aws, tmp_path_factory):
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    api = RuntimeAPI(function_name=FUNCTION_NAME).start()
    runtime = Runtime(api, tmp_path_factory.mktemp("lambda-runtime"))
    try:
        yield runtime
    finally:
        try:
            runtime.kill()
        finally:
            api.stop()
            cloudpickle.unregister_pickle_by_value(module)


def invoke_event(aws: AWS, executor: str, task: int, fn, *args, **kwargs):
    """A real invoke event with an inline, signed payload; returns (event, key)."""
    return signed_event(aws.store_url, aws.queue_url, executor, task,
                        call_payload(fn, *args, **kwargs))


def new_executor() -> str:
    return new_executor_id()


def check_stats(completion: dict, request_id: str) -> None:
    stats = completion["stats"]
    assert stats["request_id"] == request_id  # context.aws_request_id, from the header
    assert stats["memory_limit_mb"] == MEMORY_MB  # context.memory_limit_in_mb (a string)


# -- tests ----------------------------------------------------------------------------------

def test_call_runs_and_completion_arrives(runtime, aws):
    executor = new_executor()
    event, key = invoke_event(aws, executor, 1, add, 2, b=40)
    first_in_process = runtime.invocations == 0
    request_id = runtime.invoke(event)

    outcome = runtime.outcome(request_id)
    assert outcome.kind == "response", outcome.body
    assert outcome.json() == {"task": 1, "status": "ok"}

    completion = aws.completion(executor, 1, CALL_TIMEOUT_S)
    assert completion is not None, runtime.logs()
    assert completion["status"] == "ok", completion["error"]
    assert (completion["v"], completion["executor"], completion["attempt"]) == (
        protocol.VERSION, executor, 0)
    data = base64.b64decode(completion["result"]["inline"])
    assert protocol.completion_is_signed(key, completion)
    assert protocol.digest(data) == completion["result_sha256"]
    assert cloudpickle.loads(data) == 42
    check_stats(completion, request_id)
    assert completion["stats"]["cold_start"] is first_in_process

    # The sandbox stays warm: a second event goes to the same process.
    event, key = invoke_event(aws, executor, 2, add, 1, 1)
    request_id = runtime.invoke(event)
    assert runtime.outcome(request_id).kind == "response"
    completion = aws.completion(executor, 2, CALL_TIMEOUT_S)
    assert completion is not None and completion["status"] == "ok", runtime.logs()
    assert cloudpickle.loads(base64.b64decode(completion["result"]["inline"])) == 2
    assert completion["stats"]["cold_start"] is False
    assert completion["stats"]["worker_id"] == aws.completions(executor, 1)[0]["stats"][
        "worker_id"]
    check_stats(completion, request_id)


def test_large_result_goes_to_s3(runtime, aws):
    executor = new_executor()
    size = 300 * 1024  # over the 256 KiB inline limit
    event, key = invoke_event(aws, executor, 7, big_bytes, size)
    request_id = runtime.invoke(event)

    assert runtime.outcome(request_id).kind == "response"
    completion = aws.completion(executor, 7, CALL_TIMEOUT_S)
    assert completion is not None, runtime.logs()
    assert completion["status"] == "ok", completion["error"]
    assert completion["result"] == {"stored": True}
    object_key = protocol.result_key(executor, 7, 0)
    data = aws.s3.get_object(Bucket=aws.bucket,
                             Key=f"{aws.prefix}/{object_key}")["Body"].read()
    assert protocol.completion_is_signed(key, completion)
    assert protocol.digest(data) == completion["result_sha256"]
    assert cloudpickle.loads(data) == big_bytes(size)
    check_stats(completion, request_id)


def test_user_exception_is_a_completion_not_a_function_error(runtime, aws):
    executor = new_executor()
    event, key = invoke_event(aws, executor, 3, fail, "boom from the task")
    request_id = runtime.invoke(event)

    # The handler reports the user's error through the completion and returns normally.
    outcome = runtime.outcome(request_id)
    assert outcome.kind == "response", outcome.body
    assert outcome.json() == {"task": 3, "status": "error"}

    completion = aws.completion(executor, 3, CALL_TIMEOUT_S)
    assert completion is not None, runtime.logs()
    assert completion["status"] == "error"
    error = completion["error"]
    assert error["kind"] == protocol.USER
    assert error["type"] == "ValueError"
    assert error["message"] == "boom from the task"
    assert "Traceback (most recent call last)" in error["traceback"]
    assert "in fail" in error["traceback"] and "boom from the task" in error["traceback"]
    # The exception itself travels too, pickled and signed.
    data = base64.b64decode(completion["result"]["inline"])
    assert protocol.completion_is_signed(key, completion)
    assert protocol.digest(data) == completion["result_sha256"]
    exc = cloudpickle.loads(data)
    assert isinstance(exc, ValueError) and exc.args == ("boom from the task",)
    check_stats(completion, request_id)


def test_unreadable_event_is_a_function_error(runtime, aws):
    request_id = runtime.invoke({"v": 99})

    outcome = runtime.outcome(request_id)
    assert outcome.kind == "error", outcome.body
    error = outcome.json()
    assert error["errorType"] == "ProtocolError"
    assert "protocol version 99" in error["errorMessage"]
    assert isinstance(error["stackTrace"], list) and error["stackTrace"]
    assert any("check_event" in line for line in error["stackTrace"])
    # The runtime survives a function error and serves the next event.
    assert runtime.proc.poll() is None, runtime.logs()
    executor = new_executor()
    event, _ = invoke_event(aws, executor, 1, add, 3, 4)
    request_id = runtime.invoke(event)
    assert runtime.outcome(request_id).kind == "response"
    completion = aws.completion(executor, 1, CALL_TIMEOUT_S)
    assert completion is not None and completion["status"] == "ok", runtime.logs()


def test_timeout_watchdog_reports_before_the_deadline(runtime, aws):
    executor = new_executor()
    sleep_s, deadline_s = 5.0, 2.5
    event, _ = invoke_event(aws, executor, 9, sleep_then_return, sleep_s)
    request_id = runtime.invoke(event, timeout_s=deadline_s)
    invocation = runtime.api.wait_delivered(request_id, CALL_TIMEOUT_S)
    assert invocation is not None, runtime.logs()
    started = invocation.delivered_at

    try:
        completion = aws.completion(executor, 9, deadline_s + 4.0)
        arrived = time.time()
        assert completion is not None, f"no timeout completion:\n{runtime.logs()}"
        assert completion["status"] == "error"
        assert completion["error"]["kind"] == protocol.TIMEOUT, completion["error"]
        check_stats(completion, request_id)
        # Reported from get_remaining_time_in_millis(), before Lambda's deadline (so long
        # before the call would have ended). Bounds are loose; only the order matters.
        reported = completion["stats"]["reported_at"]
        assert started < reported < invocation.deadline_ms / 1000.0
        assert arrived < started + sleep_s

        # Afterwards the worker either stops its process or returns without reporting
        # again; either way the task gets exactly one completion.
        end = started + sleep_s + 3.0
        while time.time() < end and runtime.proc.poll() is None \
                and runtime.api.outcome(request_id) is None:
            time.sleep(0.05)
        outcome = runtime.api.outcome(request_id)
        if outcome is not None:
            assert outcome.kind == "response", outcome.body
            assert outcome.json()["status"] == "timeout"
        else:
            assert runtime.proc.poll() is not None, "the runtime neither answered nor exited"
        assert len(aws.completions(executor, 9)) == 1
    finally:
        # Lambda kills a sandbox that ran past its deadline; so do we.
        runtime.kill()


def test_bad_handler_string_is_an_init_error(aws, tmp_path):
    """The emulator's init/error endpoint, and that the handler string above is the one
    that matters: a wrong function name fails at init, before any event."""
    env = dict(os.environ)
    with RuntimeAPI() as api:
        env["AWS_LAMBDA_RUNTIME_API"] = api.address
        proc = subprocess.run(
            [sys.executable, "-m", "awslambdaric", "lambdafutures_handler.worker.nope"],
            check=False, cwd=tmp_path, env=env, capture_output=True,
            timeout=START_TIMEOUT_S)
        assert proc.returncode != 0
        assert len(api.init_errors) == 1, proc.stdout + proc.stderr
        error = api.init_errors[0].json()
        assert error["errorType"] == "Runtime.HandlerNotFound"
        assert "nope" in error["errorMessage"]
        assert api.next_calls == 0
