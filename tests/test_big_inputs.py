"""Big inputs ship once (issue 10): identical large content that tasks use (a big global or
closure variable of the submitted function, an argument, a `share()` handle) is stored once
per executor, by digest, and every task still gets its own, correct object. Objects are
counted in the executor's object store: the local backend's directory, or the bucket under
`<prefix>/<executor id>/blobs/` on the AWS stack.

A task reaching the host filesystem (marker files) is a convenience of both test stacks:
their sandboxes are processes on this machine.
"""

from __future__ import annotations

import os
import pickle
import time
from urllib.parse import unquote

import numpy as np
import pytest

import lambdafutures
from lambdafutures import SerializationError, Shared, SignatureMismatch, shared
from lambdafutures_handler import blobs

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024
# Set by the test that uses it: a global the submitted function reads by name.
BIG = None
# How long a held task waits for the test to release it, at most.
HOLD_LIMIT_S = 60


def read_big(index):
    return float(BIG[index])


def reader_of(array):
    def read(index):
        return float(array[index])
    return read


def total(array):
    return int(array.sum())


def bump_first(array):
    array[0] += 1
    return float(array[0])


def first_of_each(mapping):
    return {name: float(value[0]) for name, value in mapping.items()}


def blob_keys(executor) -> list[str]:
    """The keys (relative to the store) of the executor's blobs in its object store."""
    scheduler = executor._scheduler
    store = scheduler.backend.store
    prefix = f"{scheduler.id}/blobs/"
    if hasattr(store, "root"):  # the local backend: one flat directory of escaped keys
        keys = (unquote(name) for name in os.listdir(store.root) if not name.endswith(".tmp"))
        return sorted(key for key in keys if key.startswith(prefix))
    found = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store._key(prefix))
    return sorted(prefix + item["Key"].rsplit("/", 1)[1] for item in found.get("Contents", ()))


def test_a_big_global_or_closure_variable_is_stored_once(make_executor, monkeypatch):
    big = np.random.default_rng(1).random(40 * MiB // 8)  # 40 MiB
    monkeypatch.setattr(f"{__name__}.BIG", big)
    ex = make_executor(max_workers=2)
    futures = [ex.submit(read_big, n) for n in range(20)]
    futures += [ex.submit(reader_of(big), n) for n in range(20, 25)]
    assert [f.result(timeout=120) for f in futures] == [float(big[n]) for n in range(25)]
    # The same content, whether reached as a global or as a closure variable: one object.
    assert len(blob_keys(ex)) == 1


def test_a_big_argument_is_stored_once_and_small_ones_stay_inline(make_executor):
    ex = make_executor(max_workers=2)
    array = np.arange(MiB, dtype=np.int64)  # 8 MiB
    data = os.urandom(3 * MiB)
    futures = [ex.submit(total, array) for _ in range(10)]
    lengths = list(ex.map(len, [data] * 5 + [data[:1000]] * 5))
    assert [f.result(timeout=120) for f in futures] == [int(array.sum())] * 10
    assert lengths == [len(data)] * 5 + [1000] * 5
    assert len(blob_keys(ex)) == 2  # the array and the 3 MiB bytes; not the 1,000 bytes
    assert ex.submit(total, np.arange(1000)).result(timeout=60) == 499500
    assert len(blob_keys(ex)) == 2


def test_blobs_no_task_needs_are_deleted_beyond_a_bound(make_executor, monkeypatch):
    monkeypatch.setattr(shared.BlobRegistry, "KEEP_UNUSED_BYTES", 4 * MiB)
    ex = make_executor(max_workers=1)
    chunks = [os.urandom(2 * MiB) for _ in range(12)]
    # A stream of distinct big arguments does not fill the store (on the local backend,
    # memory): the two most recently used stay, for payloads to come, and one on its way out.
    assert [ex.submit(len, chunk).result(timeout=60) for chunk in chunks] == [2 * MiB] * 12
    assert len(blob_keys(ex)) <= 3
    # One kept serves a payload that names it again: nothing new is stored.
    kept = set(blob_keys(ex))
    assert ex.submit(len, chunks[-1]).result(timeout=60) == 2 * MiB
    assert set(blob_keys(ex)) <= kept


def test_a_shared_object_reaches_each_task_as_its_own_copy(make_executor):
    ex = make_executor(max_workers=1)
    original = np.zeros(2 * MiB // 8)
    handle = ex.share(original)
    assert isinstance(handle, Shared)
    original[0] = 100.0  # shared as it was: later changes on the host are not seen
    # Every task changes its argument; none sees another's change, warm sandbox or not.
    futures = [ex.submit(bump_first, handle) for _ in range(8)]
    assert [f.result(timeout=120) for f in futures] == [1.0] * 8
    # Inside another argument, and as a closure variable, it is the object too.
    assert ex.submit(first_of_each, {"a": handle, "b": handle}).result(timeout=60) == {
        "a": 0.0, "b": 0.0}
    assert ex.submit(reader_of(handle), 0).result(timeout=60) == 0.0
    small = ex.share({"weights": [1, 2, 3]})  # any picklable object, whatever its size
    assert ex.submit(dict, small).result(timeout=60) == {"weights": [1, 2, 3]}
    assert len(blob_keys(ex)) == 2
    with pytest.raises(TypeError, match="travels only to tasks"):
        pickle.dumps(handle)


def test_a_handle_serves_another_executor_and_not_an_initializer(make_executor):
    first = make_executor(max_workers=1)
    handle = first.share(np.ones(MiB // 8))
    first.shutdown()
    second = make_executor(max_workers=1)
    assert second.submit(total, handle).result(timeout=60) == MiB // 8
    with pytest.raises(SerializationError, match="travels only to tasks"):
        make_executor(max_workers=1, initializer=print, initargs=(handle,))
    with pytest.raises(SerializationError, match="cannot share"):
        second.share([handle])


class Trap:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class Gate:
    """Unpickling this marks that the worker has started on the payload, then waits for the
    test's release: the function's pickle holds one, so the worker reads the arguments'
    blob only after the test has had its way with the store."""

    def __init__(self, marker_dir):
        self.marker_dir = marker_dir

    def __reduce__(self):
        return wait_for_release, (self.marker_dir,)


def wait_for_release(marker_dir):
    with open(os.path.join(marker_dir, "unpickling"), "w"):
        pass
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(os.path.join(marker_dir, "release")) and time.monotonic() < deadline:
        time.sleep(0.05)


def gated(marker_dir):
    gate = Gate(str(marker_dir))

    def size(data):
        return gate is None or len(data)
    return size


def test_a_tampered_blob_fails_its_task_without_being_unpickled(make_executor, tmp_path):
    ex = make_executor(max_workers=1)
    future = ex.submit(gated(tmp_path), os.urandom(2 * MiB))
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (tmp_path / "unpickling").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "unpickling").exists(), "the task never started"
    [key] = blob_keys(ex)  # stored before the task was invoked
    trap = tmp_path / "trap"
    ex._scheduler.backend.store.put(key, blobs.pack(pickle.dumps(Trap(str(trap)))))
    (tmp_path / "release").touch()
    error = future.exception(timeout=60)
    assert isinstance(error, SignatureMismatch), repr(error)
    assert "refusing to unpickle" in str(error)
    assert not trap.exists()


def test_shared_is_public():
    assert lambdafutures.Shared is Shared
    assert "Shared" in lambdafutures.__all__


def sandbox_blobs():
    """Runs in a sandbox: its id and the digests of the blobs it keeps."""
    from lambdafutures_handler import blobs as sandbox_cache
    from lambdafutures_handler import worker

    return worker.WORKER_ID, sorted(sandbox_cache._cache)


def test_a_warm_sandbox_keeps_no_blob_of_the_previous_executor(make_executor, backend):
    if backend != "aws":
        pytest.skip("local sandboxes belong to one executor; the AWS stack's serve all")
    data = os.urandom(2 * MiB)
    for tasks in (8, 16, 32):
        a = make_executor(max_workers=4)
        assert [f.result(timeout=60) for f in [a.submit(len, data) for _ in range(tasks)]] \
            == [len(data)] * tasks
        [digest] = [key.rsplit("/", 1)[1] for key in blob_keys(a)]
        seen = [f.result(timeout=60) for f in [a.submit(sandbox_blobs) for _ in range(4)]]
        assert any(digest in kept for _, kept in seen)  # the search works: A's sandboxes keep it
        a.shutdown()
        b = make_executor(max_workers=4)
        found = [f.result(timeout=60) for f in [b.submit(sandbox_blobs) for _ in range(tasks)]]
        b.shutdown()
        assert all(digest not in kept for _, kept in found)
        if {worker for worker, _ in seen} & {worker for worker, _ in found}:
            return
    pytest.fail("no task of B ran in a sandbox that A used")
