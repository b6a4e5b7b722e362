"""The Lambda endpoint's harsh setting: Lambda's limits, queue, CPU share and environment.

A stack of its own (not the session's `aws_stack`): the session's moto server, a Lambda
endpoint with `harsh=True`, and a deployment in a region no other module uses, so that the
account's reserved-concurrency arithmetic is this module's alone. Throttle backoff runs
100x faster than Lambda's (time_scale 0.01: 10 ms first, 3 s at most).
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
import zipfile

import boto3
import pytest

pytest.importorskip("awslambdaric", reason="the harsh sandboxes run AWS's runtime client")

REGION = "ap-northeast-3"
ACCOUNT_CONCURRENCY = 7
RESERVED = 2


@pytest.fixture(scope="module")
def harsh_stack(moto_server, tmp_path_factory):
    from lambdafutures.testing.stack import start_stack

    saved = dict(os.environ)
    name = f"lf-harsh-{os.getpid()}"
    stack = start_stack(moto_url=moto_server, name=name, region=REGION, harsh=True,
                        account_concurrency=ACCOUNT_CONCURRENCY, reserved_concurrency=RESERVED,
                        function_timeout=30, time_scale=0.01,
                        max_event_age_s={f"{name}-aged": 1.5},
                        config_dir=str(tmp_path_factory.mktemp("harsh-config")))
    yield stack
    stack.stop()
    os.environ.clear()
    os.environ.update(saved)


def lambda_client(stack):
    return boto3.client("lambda", endpoint_url=stack.lambda_url, region_name=REGION)


def set_memory(stack, memory_mb: int) -> None:
    """Change the function's memory as a user would; the endpoint starts new sandboxes."""
    lambda_client(stack).update_function_configuration(
        FunctionName=stack.config["function_name"], MemorySize=memory_mb)
    stack.endpoint.catalog.forget()  # do not wait out the settings cache


# -- tasks (shipped by value) ---------------------------------------------------------------

def leave_marker(marker_dir, i, seconds):
    """Sleep, then record this run as a file named with its index and start/end times."""
    start = time.time()
    time.sleep(seconds)
    path = os.path.join(marker_dir, f"{i}_{os.getpid()}_{start:.6f}_{time.time():.6f}")
    with open(path, "w"):
        pass
    return i


def sandbox_blas():
    from lambdafutures_handler import sandbox

    return sandbox.blas_threads(), os.environ.get("OPENBLAS_NUM_THREADS")


def burn_two_threads(rounds):
    """CPU-bound work on two threads (hashlib releases the GIL): (wall s, CPU s)."""
    import hashlib
    import threading

    data = b"x" * (32 << 20)

    def burn():
        for _ in range(rounds):
            hashlib.sha256(data).digest()

    start, before = time.monotonic(), os.times()
    threads = [threading.Thread(target=burn) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = os.times()
    return time.monotonic() - start, (after.user + after.system) - (before.user + before.system)


def environment_of_sandbox():
    return {name: os.environ.get(name) for name in (
        "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_EXECUTION_ENV",
        "AWS_REGION", "LAMBDA_TASK_ROOT", "TZ", "HOME", "LAMBDAFUTURES_BACKEND")}


def run_nested(x):
    from lambdafutures import LambdaExecutor

    with LambdaExecutor(backend="aws", max_workers=1, timeout=60) as inner:
        return inner.submit(pow, x, 2).result(timeout=60)


# -- tests ----------------------------------------------------------------------------------

def test_invokes_beyond_reserved_concurrency_are_queued_and_all_run_once(harsh_stack, tmp_path):
    from lambdafutures import LambdaExecutor

    n = 8
    # max_workers above the function's concurrency: the invokes beyond it are throttled
    # into Lambda's queue (unless the executor caps them itself), never refused or lost.
    with LambdaExecutor(backend="aws", max_workers=n, timeout=60) as executor:
        results = list(executor.map(leave_marker, [str(tmp_path)] * n, range(n), [0.3] * n))
    assert results == list(range(n))
    runs = sorted(os.listdir(tmp_path))
    assert sorted(int(run.split("_")[0]) for run in runs) == list(range(n)), runs
    spans = [(float(run.split("_")[2]), float(run.split("_")[3])) for run in runs]
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    assert peak <= RESERVED
    key = (REGION, harsh_stack.config["function_name"])
    assert harsh_stack.endpoint.queue.peak_running[key] <= RESERVED


def test_an_event_past_its_maximum_age_goes_to_the_failure_destination(harsh_stack):
    """A function that can run nothing (reserved concurrency 0): Lambda throttles the event
    until its age runs out, then posts an EventAgeExceeded record."""
    region_client = {"region_name": REGION, "endpoint_url": harsh_stack.moto_url}
    iam, sqs = boto3.client("iam", **region_client), boto3.client("sqs", **region_client)
    lam = lambda_client(harsh_stack)
    name = f"{harsh_stack.config['function_name']}-aged"
    role = iam.create_role(RoleName=f"{name}-{uuid.uuid4().hex[:6]}",
                           AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("noop.py", "def handle(event, context):\n    return None\n")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=role,
                        Handler="noop.handle", Code={"ZipFile": code.getvalue()})
    lam.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=0,
                                         DestinationConfig={"OnFailure": {"Destination":
                                                                          queue_arn}})
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=0)

    event = {"probe": "too old", "n": 1}
    response = lam.invoke(FunctionName=name, InvocationType="Event",
                          Payload=json.dumps(event).encode())
    assert response["StatusCode"] == 202

    messages = []
    deadline = time.monotonic() + 20
    while not messages and time.monotonic() < deadline:
        messages = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=2).get("Messages", [])
    assert messages, "no failure record within 20 s"
    record = json.loads(messages[0]["Body"])
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["requestContext"]["approximateInvokeCount"] == 0
    assert record["requestContext"]["functionArn"].endswith(f":function:{name}:$LATEST")
    assert record["requestPayload"] == event
    assert "responsePayload" not in record  # it never ran


def test_a_task_reads_the_blas_threads_set_from_the_memory_size(harsh_stack):
    from lambdafutures import LambdaExecutor

    for memory_mb, expected in ((2048, 1), (3600, min(2, os.cpu_count() or 1))):
        set_memory(harsh_stack, memory_mb)
        with LambdaExecutor(backend="aws", max_workers=1, timeout=60) as executor:
            threads, variable = executor.submit(sandbox_blas).result(timeout=60)
        assert (threads, variable) == (expected, str(expected)), memory_mb


def test_the_sandbox_environment_is_lambdas_not_the_hosts(harsh_stack, monkeypatch):
    from lambdafutures import LambdaExecutor

    monkeypatch.setenv("LAMBDAFUTURES_BACKEND", "aws")  # the host's; must not leak
    set_memory(harsh_stack, 2048)
    with LambdaExecutor(backend="aws", max_workers=1, timeout=60) as executor:
        env = executor.submit(environment_of_sandbox).result(timeout=60)
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == harsh_stack.config["function_name"]
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "2048"
    assert env["AWS_EXECUTION_ENV"].startswith("AWS_Lambda_python3.")
    assert env["AWS_REGION"] == REGION
    assert env["TZ"] == ":UTC" and env["LAMBDA_TASK_ROOT"]
    assert env["HOME"] is None and env["LAMBDAFUTURES_BACKEND"] is None


def test_account_settings_answer_the_configured_limits(harsh_stack):
    settings = lambda_client(harsh_stack).get_account_settings()["AccountLimit"]
    assert settings["ConcurrentExecutions"] == ACCOUNT_CONCURRENCY
    # This region's only reservation is the deployment's (the aged function reserves 0).
    assert settings["UnreservedConcurrentExecutions"] == ACCOUNT_CONCURRENCY - RESERVED


def test_an_executor_inside_a_task_runs_its_tasks_on_the_same_stack(harsh_stack):
    from lambdafutures import LambdaExecutor

    set_memory(harsh_stack, 2048)
    with LambdaExecutor(backend="aws", max_workers=1, timeout=120) as executor:
        assert executor.submit(run_nested, 7).result(timeout=120) == 49


def test_cpu_share_follows_memory_size(harsh_stack):
    """At 1,769 MB a sandbox gets one CPU's worth of time, whatever its threads; at 3,538 MB
    two (when this machine has them to give)."""
    from lambdafutures import LambdaExecutor

    timings = {}
    for memory_mb in (1769, 3538):
        set_memory(harsh_stack, memory_mb)
        with LambdaExecutor(backend="aws", max_workers=1, timeout=60) as executor:
            timings[memory_mb] = executor.submit(burn_two_threads, 24).result(timeout=60)
    wall_1, cpu_1 = timings[1769]
    wall_2, cpu_2 = timings[3538]
    assert cpu_1 / wall_1 <= 1.3, timings  # the quota holds however idle the machine is
    if (os.cpu_count() or 1) < 2 or cpu_2 / wall_2 < 1.5:
        pytest.skip(f"this machine did not give the 3,538 MB sandbox two CPUs: {timings}")
    assert wall_1 / wall_2 >= 1.3, timings


# -- handler/sandbox.py without a stack -----------------------------------------------------

@pytest.mark.parametrize("environ, threads, openblas", [
    ({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048"}, 1, "1"),
    ({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "10240"}, min(5, os.cpu_count() or 1),
     str(min(5, os.cpu_count() or 1))),
    ({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048", "LAMBDAFUTURES_BLAS_THREADS": "3",
      "OMP_NUM_THREADS": "2"}, 3, "3"),
    ({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048", "OMP_NUM_THREADS": "2"}, 2, None),
    ({"LAMBDAFUTURES_BLAS_THREADS": "3"}, None, None),  # a host: left alone
])
def test_blas_threads_follow_memory_unless_the_user_chose(environ, threads, openblas):
    from lambdafutures_handler import sandbox

    environ = dict(environ)
    assert sandbox.configure(environ) == threads
    assert environ.get("OPENBLAS_NUM_THREADS") == openblas


def test_blas_threads_change_in_a_sandbox_where_numpy_is_loaded():
    import subprocess
    import sys

    script = (
        "import ctypes, numpy\n"
        "from lambdafutures_handler import sandbox\n"
        "numpy.ones((2, 2)) @ numpy.ones((2, 2))\n"
        "before = sandbox.blas_threads()\n"
        "assert sandbox.set_blas_threads(2) >= 1\n"
        "lib = ctypes.CDLL(sandbox._loaded_openblas()[0])\n"
        "get = getattr(lib, 'scipy_openblas_get_num_threads64_', None) or "
        "lib.openblas_get_num_threads\n"
        "print(before, get(), sandbox.blas_threads())\n")
    env = {"PATH": os.environ.get("PATH", ""), "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", "2"]
