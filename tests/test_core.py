"""The core's promises as the stdlib makes them: executors go away when dropped or shut down,
initializers run once per sandbox, outcomes of dead attempts never end a live one, and each
task's output comes back with it."""

from __future__ import annotations

import gc
import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import BrokenExecutor, Future

import pytest
import tasks

from lambdafutures import LambdaExecutor, output_of
from lambdafutures.backends.base import Backend, take_batch
from lambdafutures.scheduler import Scheduler
from lambdafutures_handler import protocol
from lambdafutures_handler.transport import FileStore


def _executor_threads() -> set[threading.Thread]:
    """Threads an executor starts (not those of the test stack's Lambda endpoint)."""
    return {t for t in threading.enumerate()
            if t.name.startswith("lambdafutures") and "endpoint" not in t.name}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- executors go away ------------------------------------------------------------------------

def test_shutdown_wait_leaves_no_thread_of_the_executor(make_executor):
    before = _executor_threads()
    ex = make_executor(max_workers=2)
    assert ex.submit(tasks.identity, 1).result(timeout=60) == 1
    ex.shutdown(wait=True)
    assert _executor_threads() - before == set()


def test_a_dropped_executor_is_collected_with_its_workers():
    ex = LambdaExecutor(max_workers=2, backend="local")
    pids = {ex.submit(os.getpid).result(timeout=60) for _ in range(4)}
    before_threads = _executor_threads()
    ref = __import__("weakref").ref(ex)
    del ex
    gc.collect()
    assert ref() is None  # nothing of the executor's own keeps it alive
    assert _wait_until(lambda: not any(_alive(pid) for pid in pids), 10), pids
    assert _wait_until(lambda: not (before_threads & _executor_threads()), 10)


# -- initializer -------------------------------------------------------------------------------

def _record_init(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def _read_init_marker():
    import builtins
    return getattr(builtins, "_lf_test_init", None)


def _set_init_marker(value):
    import builtins
    builtins._lf_test_init = value


def test_initializer_runs_once_per_sandbox_before_its_first_task(make_executor, backend,
                                                                 tmp_path):
    ex = make_executor(max_workers=2, initializer=_set_init_marker, initargs=("ready",))
    seen = [ex.submit(_read_init_marker) for _ in range(8)]
    assert [f.result(timeout=60) for f in seen] == ["ready"] * 8
    if backend == "local":  # the host's file system is the workers' here
        path = tmp_path / "inits"
        ex2 = make_executor(max_workers=2, initializer=_record_init, initargs=(str(path),))
        pids = [f.result(timeout=60) for f in [ex2.submit(os.getpid) for _ in range(12)]]
        ex2.shutdown(wait=True)
        lines = path.read_text().split()
        assert sorted(lines) == sorted({str(pid) for pid in pids})


def _failing_initializer():
    raise RuntimeError("no database here")


def test_a_failing_initializer_breaks_the_executor(make_executor):
    ex = make_executor(max_workers=1, initializer=_failing_initializer)
    future = ex.submit(tasks.identity, 1)
    with pytest.raises(BrokenExecutor, match="initializer"):
        future.result(timeout=60)
    with pytest.raises(BrokenExecutor):
        ex.submit(tasks.identity, 2)


# -- task output -------------------------------------------------------------------------------

def _chatty(n):
    import logging
    import sys
    print("out", n)
    print("err", n, file=sys.stderr)
    logging.getLogger("user.code").warning("careful %d", n)
    return n


def test_task_output_comes_back_with_the_future(make_executor, capsys):
    ex = make_executor(max_workers=2, echo_output=True)
    futures = [ex.submit(_chatty, n) for n in range(3)]
    assert [f.result(timeout=60) for f in futures] == [0, 1, 2]
    assert output_of(futures[1]) == "out 1\nerr 1\nWARNING:user.code:careful 1\n"
    printed = capsys.readouterr().out
    assert "[task 2] out 2\n" in printed and "[task 2] WARNING:user.code:careful 2\n" in printed


def _print_lots(n):
    for i in range(n):
        print(f"line {i:06d}")


def test_task_output_keeps_its_tail_within_the_limit(make_executor):
    ex = make_executor(max_workers=1, output_limit=1000)
    future = ex.submit(_print_lots, 10_000)
    future.result(timeout=60)
    text = output_of(future)
    assert text.endswith("line 009999\n") and "earlier characters dropped" in text
    assert len(text) < 1100
    quiet = make_executor(max_workers=1, output_limit=0)
    done = quiet.submit(_chatty, 2)
    done.result(timeout=60)
    assert output_of(done) == ""


# -- outcomes of dead attempts -----------------------------------------------------------------

class _BlockingInvoker:
    """Records each event; blocks the invoke of attempts listed in `block` until released."""

    def __init__(self, block: set[int]) -> None:
        self.events: queue.SimpleQueue[dict] = queue.SimpleQueue()
        self.block = block
        self.release = threading.Event()

    def invoke(self, event: dict) -> None:
        self.events.put(event)
        if event["attempt"] in self.block:
            self.release.wait(30)
            raise ConnectionError("the invoke finally failed")


class _Completions:
    def __init__(self) -> None:
        self.messages: queue.SimpleQueue[dict] = queue.SimpleQueue()
        self.handled: queue.SimpleQueue[dict] = queue.SimpleQueue()

    def receive(self, max_messages: int, wait: float) -> list[dict]:
        return take_batch(self.messages, max_messages, wait)

    def ack(self, messages: list[dict]) -> None:
        for message in messages:  # the completion thread acks what it has dealt with
            self.handled.put(message)


@pytest.fixture
def fake_backend():
    root = tempfile.mkdtemp(prefix="lf-core-")
    invoker = _BlockingInvoker(block={1})
    completions = _Completions()
    backend = Backend(name="fake", store=FileStore(root), invoker=invoker,
                      completions=completions, reply_url="local:", invoke_threads=2,
                      inline_limit=protocol.DEFAULT_INLINE_LIMIT, deadline_margin=0.0,
                      sandbox_timeout=None, default_max_workers=1, closers=[])
    yield backend, invoker, completions
    invoker.release.set()
    shutil.rmtree(root, ignore_errors=True)


def _ok(scheduler: Scheduler, event: dict, value) -> dict:
    import cloudpickle

    data = cloudpickle.dumps(value)
    return protocol.make_completion(event, scheduler.key, status="ok", stats={},
                                    result=protocol.inline_blob(data),
                                    result_sha256=protocol.digest(data))


def test_a_late_outcome_of_a_dead_attempt_cannot_end_the_live_one(fake_backend):
    backend, invoker, completions = fake_backend
    scheduler = Scheduler(backend, "0123456789abcdef", max_workers=1, timeout=0.2,
                          retries=1, speculation=None, queue_expiry=None, output_limit=0,
                          echo_output=False)
    try:
        future: Future = Future()
        scheduler.submit(scheduler.new_task(0, future, b"payload", 1, False))
        first = invoker.events.get(timeout=10)
        # Attempt 0 reports nothing: its deadline passes and attempt 1 starts, whose invoke
        # hangs and will fail.
        second = invoker.events.get(timeout=10)
        assert (first["attempt"], second["attempt"]) == (0, 1)
        # The first attempt's result arrives late: that attempt is dead, so it is dropped.
        late = _ok(scheduler, first, "late")
        completions.messages.put(late)
        assert completions.handled.get(timeout=10) is late
        assert not future.done()
        # The live attempt's invoke fails at last: that, and only that, ends the future.
        invoker.release.set()
        with pytest.raises(Exception, match="could not be invoked"):
            future.result(timeout=10)
    finally:
        scheduler.shutdown(wait=True, cancel_futures=True)


def test_an_expired_event_is_not_run_and_says_so(tmp_path):
    from events import call_payload, new_executor_id, signed_event

    from lambdafutures_handler import handle
    from lambdafutures_handler.transport import set_local_reply

    store = f"file://{tmp_path}"
    replies: list[dict] = []
    set_local_reply(replies.append)
    try:
        marker = tmp_path / "ran"
        event, key = signed_event(store, "local:", new_executor_id(), 1,
                                  call_payload(_record_init, str(marker)))
        event["expires_at"] = time.time() - 1
        protocol.sign_event(key, event)
        handle(event, None)
    finally:
        set_local_reply(None)
    assert not marker.exists()
    (reply,) = replies
    assert reply["error"]["kind"] == protocol.NOT_RUN
    assert protocol.completion_is_signed(key, reply)
