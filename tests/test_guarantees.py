"""What a user relies on beyond concurrent.futures: local modules reach workers, bad input is
refused at the call that caused it, and nothing foreign is ever unpickled."""

from __future__ import annotations

import base64
import json
import os
import sys
import textwrap
import time
import uuid
from concurrent.futures import Future, as_completed

import cloudpickle
import numpy as np
import pytest
from events import call_payload, new_executor_id, signed_event

import lambdafutures
from lambdafutures import LambdaExecutor
from lambdafutures_handler import protocol
from lambdafutures_handler.transport import open_store

# -- local modules ship by value ----------------------------------------------------------------


@pytest.fixture
def sibling_module(tmp_path, monkeypatch):
    """A module that lives next to the user's script, installed nowhere."""
    name = f"sibling_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import importlib.util

        SCALE = 3

        def scaled(x):
            return SCALE * x

        def importable_here(name):
            return importlib.util.find_spec(name) is not None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module
    sys.modules.pop(name, None)


def test_a_function_from_an_uninstalled_module_runs_on_the_worker(make_executor,
                                                                    sibling_module):
    executor = make_executor(max_workers=2)
    assert list(executor.map(sibling_module.scaled, [1, 2, 3])) == [3, 6, 9]
    # It went by value: the worker itself cannot import the module.
    name = sibling_module.__name__
    assert executor.submit(sibling_module.importable_here, name).result() is False


def test_installed_packages_go_by_reference(make_executor):
    # numpy is installed on every worker; shipping it by value would be slow and wrong.
    executor = make_executor(max_workers=1)
    assert executor.submit(np.add, 2, 3).result() == 5
    assert len(cloudpickle.dumps(np.add)) < 200


# -- bad input --------------------------------------------------------------------------------


def returns_a_future():
    future = Future()
    future.set_result(1)
    return future


def test_a_function_returning_a_future_gets_a_serialization_error(make_executor):
    executor = make_executor(max_workers=1)
    with pytest.raises(lambdafutures.SerializationError, match="Future"):
        executor.submit(returns_a_future).result(timeout=60)
    assert executor.submit(abs, -4).result(timeout=60) == 4


def test_submit_from_a_done_callback(make_executor):
    executor = make_executor(max_workers=2)
    chained: list[Future] = []
    first = executor.submit(abs, -1)
    first.add_done_callback(lambda f: chained.append(executor.submit(abs, -2 * f.result())))
    assert first.result(timeout=60) == 1
    deadline = time.monotonic() + 60
    while not chained and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chained[0].result(timeout=60) == 2


def _numbers_then_failure():
    yield 1
    yield 2
    raise RuntimeError("the input generator broke")


def test_map_over_a_generator_that_raises(make_executor):
    executor = make_executor(max_workers=2)
    with pytest.raises(RuntimeError, match="input generator broke"):
        executor.map(abs, _numbers_then_failure())
    # With a buffer the input is read lazily, so the error surfaces while iterating.
    results = executor.map(abs, _numbers_then_failure(), buffersize=1)
    assert next(results) == 1
    with pytest.raises(RuntimeError, match="input generator broke"):
        list(results)
    assert list(executor.map(abs, [-5])) == [5]


def test_map_over_nothing(make_executor):
    assert list(make_executor(max_workers=1).map(abs, [])) == []


def test_an_argument_above_the_inline_limit(make_executor):
    big = np.arange(protocol.DEFAULT_INLINE_LIMIT, dtype=np.int64)  # 2 MiB
    executor = make_executor(max_workers=1)
    assert executor.submit(np.sum, big).result(timeout=60) == big.sum()


def test_a_100_mb_argument_locally():
    huge = np.ones(100 * 1024 * 1024 // 8)
    with LambdaExecutor(max_workers=1, backend="local") as executor:
        assert executor.submit(np.sum, huge).result(timeout=120) == huge.size


def test_timeout_beyond_lambdas_limit_is_refused_at_construction():
    with pytest.raises(ValueError, match="900"):
        LambdaExecutor(backend="aws", timeout=901)


@pytest.mark.parametrize("bad", [0, -1, "x"])
def test_bad_timeouts_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        LambdaExecutor(backend="local", timeout=bad)


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        LambdaExecutor(backend="gcp")


def test_aws_without_a_deployment_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMBDAFUTURES_CONFIG", str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="lambdafutures deploy"):
        LambdaExecutor(backend="aws")


# -- nothing foreign is unpickled ------------------------------------------------------------


class _Trap:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _completion_queue(sqs, stack) -> tuple[str, str]:
    """The live executor's queue URL and its executor id (the queue name's tail)."""
    prefix = stack.config["queue_prefix"]
    urls = sqs.list_queues(QueueNamePrefix=prefix).get("QueueUrls", [])
    assert len(urls) == 1, urls
    return urls[0], urls[0].rsplit("/", 1)[-1][len(prefix):]


@pytest.fixture
def lone_aws_executor(aws_stack):
    """An AWS executor alone on the deployment, so its completion queue can be found."""
    import boto3

    sqs = boto3.client("sqs")
    for url in sqs.list_queues(QueueNamePrefix=aws_stack.config["queue_prefix"]).get(
            "QueueUrls", []):
        pytest.skip(f"another executor's queue is live: {url}")
    with LambdaExecutor(max_workers=1, backend="aws") as executor:
        yield executor, sqs, *_completion_queue(sqs, aws_stack)


def test_a_forged_result_is_dropped_without_unpickling(lone_aws_executor, tmp_path):
    executor, sqs, queue_url, executor_id = lone_aws_executor
    trap = tmp_path / "unpickled"
    future = executor.submit(time.sleep, 3)  # task 0, attempt 0: the forger's target
    forged = cloudpickle.dumps(_Trap(str(trap)))
    message = {
        "v": protocol.VERSION, "executor": executor_id,
        "task": 0, "attempt": 0, "status": "ok",
        "result": {"inline": base64.b64encode(forged).decode()},
        "result_sha256": protocol.digest(forged), "sig": "0" * 64, "error": None,
        "stats": {}, "output": None,
    }
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(message))
    assert future.result(timeout=60) is None  # the task's own result, not the forger's
    assert not trap.exists()


@pytest.fixture
def reply_queue(aws_stack):
    """A bucket and a queue in moto, for driving the Lambda handler by hand."""
    import boto3

    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName=f"handtest-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    store = f"s3://{aws_stack.config['bucket']}/{aws_stack.config.get('prefix', 'tasks')}"

    def completion() -> dict:
        for _ in range(10):
            messages = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2).get("Messages")
            if messages:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=messages[0]["ReceiptHandle"])
                return json.loads(messages[0]["Body"])
        raise AssertionError("no completion arrived")

    yield store, url, completion
    sqs.delete_queue(QueueUrl=url)


def test_the_worker_refuses_a_tampered_payload(reply_queue, tmp_path):
    from lambdafutures_handler import handle

    store, url, completion = reply_queue
    trap = tmp_path / "unpickled"
    executor = new_executor_id()
    honest = call_payload(abs, -1)
    tampered, key = signed_event(store, url, executor, 1, honest,
                                 payload=protocol.inline_blob(cloudpickle.dumps(
                                     _Trap(str(trap)))))
    handle(tampered, None)
    reply = completion()
    assert reply["status"] == "error" and reply["error"]["kind"] == protocol.SIGNATURE
    assert protocol.completion_is_signed(key, reply)
    # An event whose own signature fails gets no reply at all (a signed error would let its
    # sender end a real task): the platform records the handler's error instead.
    for sig in (None, "0" * 64):
        unsigned, _ = signed_event(store, url, executor, 2, honest, sig=sig)
        with pytest.raises(protocol.ProtocolError):
            handle(unsigned, None)
    assert not trap.exists()


def test_the_worker_names_both_runtimes_when_they_differ(reply_queue):
    from lambdafutures_handler import handle

    store, url, completion = reply_queue
    executor = new_executor_id()
    key = protocol.new_key()
    open_store(store).put(protocol.key_object(executor), key)
    event, _ = signed_event(store, url, executor, 1, call_payload(abs, -1), key=key)
    event["host"] = {"python": "3.99", "cloudpickle": "0.0.1"}
    protocol.sign_event(key, event)  # the host's own event, from another runtime
    handle(event, None)
    reply = completion()
    assert reply["error"]["kind"] == protocol.MISMATCH
    mine = "%d.%d" % sys.version_info[:2]
    assert "3.99" in reply["error"]["message"] and mine in reply["error"]["message"]
    assert "0.0.1" in reply["error"]["message"] and cloudpickle.__version__ in \
        reply["error"]["message"]


# -- the process ends cleanly -----------------------------------------------------------------

_SCRIPT_PRELUDE = """
import os, sys, time
from concurrent.futures import as_completed
from lambdafutures import LambdaExecutor
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone: it no longer runs anything.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _run_script(tmp_path, body: str, signal_after: float | None = None):
    import signal
    import subprocess

    script = tmp_path / "user_script.py"
    script.write_text(_SCRIPT_PRELUDE + textwrap.dedent(body))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        # Wait until the script says its tasks run, then press Ctrl-C.
        line = process.stdout.readline()
        assert line.startswith("pids"), line + process.stderr.read()
        pids = [int(p) for p in line.split()[1:]]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        return process.returncode, "pids " + " ".join(map(str, pids)) + "\n" + out, err
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def _worker_pids(output: str) -> list[int]:
    line = next(line for line in output.splitlines() if line.startswith("pids"))
    return [int(p) for p in line.split()[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_shutdown_without_waiting_returns_and_the_process_exits_cleanly(tmp_path):
    code, out, err = _run_script(tmp_path, """
        ex = LambdaExecutor(max_workers=2, backend="local")
        pids = {f.result() for f in [ex.submit(os.getpid) for _ in range(6)]}
        print("pids", *pids, flush=True)
        futures = [ex.submit(time.sleep, 0.5) for _ in range(4)]
        started = time.monotonic()
        ex.shutdown(wait=False)
        print("returned_in", time.monotonic() - started, flush=True)
    """)
    assert code == 0, err
    assert "Traceback" not in err
    returned_in = float(next(line for line in out.splitlines() if line.startswith("returned_in"))
                        .split()[1])
    assert returned_in < 0.5  # it did not wait for the four sleeping tasks
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in _worker_pids(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in _worker_pids(out))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_in_an_as_completed_loop_leaves_nothing_behind(tmp_path):
    code, out, err = _run_script(tmp_path, """
        with LambdaExecutor(max_workers=2, backend="local") as ex:
            pids = {f.result() for f in [ex.submit(os.getpid) for _ in range(6)]}
            futures = [ex.submit(time.sleep, 30) for _ in range(6)]
            time.sleep(0.5)
            print("pids", *pids, flush=True)
            for f in as_completed(futures):
                print(f.result())
    """, signal_after=0.0)
    assert code != 0 and "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in _worker_pids(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in _worker_pids(out))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_outside_a_with_block_stops_at_once_too(tmp_path):
    started = time.monotonic()
    code, out, err = _run_script(tmp_path, """
        ex = LambdaExecutor(max_workers=2, backend="local")
        pids = {f.result() for f in [ex.submit(os.getpid) for _ in range(6)]}
        futures = [ex.submit(time.sleep, 600) for _ in range(6)]
        time.sleep(0.5)
        print("pids", *pids, flush=True)
        for f in as_completed(futures):
            print(f.result())
    """, signal_after=0.0)
    # The exit handler did not wait for the ten-minute tasks, and said why it stopped them.
    assert time.monotonic() - started < 30
    assert code != 0 and "KeyboardInterrupt" in err
    assert "interrupted: stopping executor" in err
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in _worker_pids(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in _worker_pids(out))


def test_an_executor_still_works_after_a_task_gets_its_result_from_the_store(make_executor):
    executor = make_executor(max_workers=2)
    futures = [executor.submit(np.ones, 100_000) for _ in range(4)]
    assert all(f.result(timeout=60).sum() == 100_000 for f in as_completed(futures))
