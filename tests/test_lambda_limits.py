"""The executor against Lambda's limits (the endpoint's harsh setting): it never blames the
user for Lambda's queue, and never runs a task twice unless asked to.

A stack of its own, in a region no other module uses: a function whose reserved concurrency
is 2, so that everything beyond two tasks at once waits in Lambda's async queue (throttle
backoff 100x faster than Lambda's).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter

import pytest

pytest.importorskip("awslambdaric", reason="the harsh sandboxes run AWS's runtime client")

REGION = "eu-south-2"
RESERVED = 2


@pytest.fixture(scope="module")
def limited_stack(moto_server, tmp_path_factory):
    from lambdafutures.testing.stack import start_stack

    saved = dict(os.environ)
    stack = start_stack(moto_url=moto_server, name=f"lf-limits-{os.getpid()}", region=REGION,
                        harsh=True, account_concurrency=10, reserved_concurrency=RESERVED,
                        function_timeout=30, time_scale=0.01, cpu_quota=False,
                        config_dir=str(tmp_path_factory.mktemp("limits-config")))
    yield stack
    stack.stop()
    os.environ.clear()
    os.environ.update(saved)


def one_second(marker_dir, i):
    """Record this run (one file per run), then take a second."""
    with open(os.path.join(marker_dir, f"{i}-{os.getpid()}-{time.time():.6f}"), "w"):
        pass
    time.sleep(1.0)
    return i * i


def _runs(marker_dir) -> Counter:
    return Counter(int(name.split("-")[0]) for name in os.listdir(marker_dir))


@pytest.mark.parametrize("max_workers", [None, 36])
def test_queued_tasks_all_end_with_their_result_and_run_once(limited_stack, tmp_path, caplog,
                                                              max_workers):
    """The issue's scenario: concurrency 2, 36 tasks of 1 s, timeout=2. By default the
    executor keeps 2 in flight and says so; asked for 36, it warns, and the 34 beyond the
    limit wait in Lambda's queue without that time counting against their timeout."""
    from lambdafutures import LambdaExecutor

    caplog.set_level(logging.INFO, logger="lambdafutures")
    with LambdaExecutor(max_workers=max_workers, backend="aws", timeout=2) as executor:
        assert executor.max_workers == (RESERVED if max_workers is None else max_workers)
        futures = [executor.submit(one_second, str(tmp_path), i) for i in range(36)]
        results = [f.result(timeout=300) for f in futures]
    assert results == [i * i for i in range(36)]
    assert _runs(tmp_path) == Counter(range(36))  # each body ran exactly once
    said = caplog.text
    if max_workers is None:
        assert f"max_workers={RESERVED} (the concurrency available" in said
    else:
        assert f"max_workers=36 exceeds the {RESERVED} concurrent executions" in said


def test_events_past_their_expiry_are_not_run_and_are_launched_again(limited_stack, tmp_path):
    """With a short queue_expiry, events that waited too long in Lambda's queue are dropped
    unrun by the worker and launched again: each task still runs once, or ends typed."""
    from lambdafutures import InvocationFailed, LambdaExecutor

    with LambdaExecutor(max_workers=8, backend="aws", timeout=5, queue_expiry=0.5) as executor:
        futures = [executor.submit(one_second, str(tmp_path), i) for i in range(8)]
        outcomes = []
        for i, future in enumerate(futures):
            try:
                outcomes.append(future.result(timeout=300) == i * i)
            except InvocationFailed as exc:
                assert "expiry" in str(exc)
                outcomes.append(None)
    runs = _runs(tmp_path)
    for i, outcome in enumerate(outcomes):
        assert runs[i] == (1 if outcome else 0), (i, outcome, runs)
    assert any(outcomes)
