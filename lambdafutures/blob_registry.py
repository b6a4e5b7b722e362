"""The host's registry of an executor's blobs (shared.py): which are stored, which payloads
need them, and when a stored one is deleted."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from lambdafutures_handler import protocol

log = logging.getLogger("lambdafutures")


class BlobRegistry:
    """One executor's blobs on the host: what is stored, what each payload needs, and when a
    stored blob goes.

    Each blob has one entry, counting the submitted tasks (not yet done) whose payloads name
    it. Its bytes are held from the first payload that names it until it is stored, by the
    first launch that needs it; later payloads only count it. A blob that no unfinished task
    needs stays stored, for payloads to come (a loop that submits, waits and submits again
    with the same big global), up to `KEEP_UNUSED_BYTES` for all of them; beyond that the
    least recently needed are deleted, by the next launch that stores a blob (on an invoker
    thread, never on the completion thread). Without that bound, a stream of tasks with
    distinct big arguments would fill the store: on the local backend, memory (/dev/shm).

    A blob stored so long ago that the bucket's lifecycle rule may have expired it (a day at
    the soonest) is stored again from the bytes that the next payload naming it brings.
    """

    KEEP_UNUSED_BYTES = 256 * 1024 * 1024
    STORE_AGAIN_AFTER_S = 12 * 3600

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, _Blob] = {}
        # Stored blobs that no unfinished task needs, least recently needed first.
        self._unused: OrderedDict[str, int] = OrderedDict()
        self._unused_bytes = 0
        self._closed = False

    def reference(self, digest: str, size: int, make_data: Callable[[], bytes]) -> None:
        """Count one more payload that names `digest`; `make_data()` gives the blob's bytes
        when the registry does not hold or store them already (called without the lock)."""
        with self._lock:
            if self._count_if_known(digest):
                return
        data = make_data()
        with self._lock:
            if self._count_if_known(digest):
                return
            blob = self._blobs.get(digest)
            if blob is None:
                blob = self._blobs[digest] = _Blob(size)
            self._forget_unused(digest)
            blob.refs += 1
            blob.data = data
            if blob.state is not _DELETING:  # else it is stored again once deleted
                blob.state = _WAITING

    def _count_if_known(self, digest: str) -> bool:
        blob = self._blobs.get(digest)
        if blob is None or blob.state is _DELETING or blob.data is None and (
                blob.state is _STORED and
                time.monotonic() - blob.stored_at >= self.STORE_AGAIN_AFTER_S):
            return False
        blob.refs += 1
        if blob.state is _EVICTED:  # marked for deletion, still in the store: keep it
            blob.state = _STORED
        self._forget_unused(digest)
        return True

    def release(self, digests: Iterable[str]) -> None:
        """The task whose payload named `digests` is done (or was never submitted)."""
        with self._lock:
            for digest in digests:
                blob = self._blobs.get(digest)
                if blob is None or blob.refs == 0:
                    continue  # closed, or released twice
                blob.refs -= 1
                if blob.refs == 0:
                    if blob.state is _WAITING:
                        del self._blobs[digest]  # its tasks ended unlaunched: never stored
                    elif blob.state is _STORED:
                        self._unused[digest] = blob.size
                        self._unused_bytes += blob.size
            # Keep the most recently used one, whatever its size: the next payload may too.
            while self._unused_bytes > self.KEEP_UNUSED_BYTES and len(self._unused) > 1:
                digest, size = self._unused.popitem(last=False)
                self._unused_bytes -= size
                self._blobs[digest].state = _EVICTED

    def _forget_unused(self, digest: str) -> None:
        size = self._unused.pop(digest, None)
        if size is not None:
            self._unused_bytes -= size

    def ensure_stored(self, digests: Iterable[str], store: Any, executor: str) -> None:
        """Return once every blob in `digests` is in `store`. Each is put by one thread, the
        first launch that needs it; the others wait for that put. Deletes the blobs evicted
        since the last call first. Raises what the put raised (the next launch tries again)."""
        self._delete_evicted(store, executor)
        for digest in digests:
            while True:
                with self._lock:
                    blob = self._blobs.get(digest)
                    if blob is None:
                        raise LookupError(f"blob {digest} is unknown to this executor")
                    if blob.state is _STORED or blob.state is _EVICTED:
                        break
                    pending = blob.pending
                    if blob.state is _WAITING:
                        blob.state = _STORING
                        pending = blob.pending = Future()
                        data = blob.data
                        mine = True
                    else:
                        mine = False
                if not mine:
                    pending.exception()  # then look again: stored, or ours to try
                    continue
                try:
                    store.put(protocol.blob_key(executor, digest), data)
                except BaseException as exc:
                    with self._lock:
                        blob.state = _WAITING
                    pending.set_exception(exc)
                    raise
                with self._lock:
                    blob.state, blob.data, blob.stored_at = _STORED, None, time.monotonic()
                    if blob.refs == 0:
                        self._unused[digest] = blob.size
                        self._unused_bytes += blob.size
                pending.set_result(None)
                break

    def _delete_evicted(self, store: Any, executor: str) -> None:
        with self._lock:
            evicted = [digest for digest, blob in self._blobs.items() if blob.state is _EVICTED]
            pending = []
            for digest in evicted:
                blob = self._blobs[digest]
                blob.state = _DELETING
                blob.pending = Future()
                pending.append(blob.pending)
        if not evicted:
            return
        try:
            store.delete([protocol.blob_key(executor, digest) for digest in evicted])
        except Exception:  # noqa: BLE001 - they go with the executor's objects at shutdown
            log.warning("could not delete %d unused blobs", len(evicted), exc_info=True)
        with self._lock:
            for digest in evicted:
                blob = self._blobs[digest]
                if blob.refs:  # named again while it was deleted: store it again
                    blob.state = _WAITING
                else:
                    del self._blobs[digest]
        for done in pending:
            done.set_result(None)

    def close(self) -> None:
        """Drop every blob's bytes: the executor is closed (its objects go with it)."""
        with self._lock:
            self._blobs.clear()
            self._unused.clear()
            self._unused_bytes = 0


# A blob's states: its bytes held, waiting for a launch to store them; being stored;
# stored; stored but unused and to be deleted by the next launch; being deleted.
_WAITING, _STORING, _STORED, _EVICTED, _DELETING = (
    "waiting", "storing", "stored", "evicted", "deleting")


class _Blob:
    __slots__ = ("size", "refs", "state", "data", "pending", "stored_at")

    def __init__(self, size: int) -> None:
        self.size = size
        self.refs = 0
        self.state = _WAITING
        self.data: bytes | None = None
        self.pending: Future | None = None  # ends when storing or deleting it ends
        self.stored_at = 0.0
