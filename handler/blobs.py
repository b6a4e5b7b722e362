"""Blobs: large objects that a payload names by digest instead of carrying them.

The host (lambdafutures/shared.py) pickles a large object alone (a big array or bytes
captured by a submitted function or passed as an argument, or an object given to
`LambdaExecutor.share`), stores it once per executor under `protocol.blob_key(executor,
digest)`, and writes the persistent id ("lf-blob", digest) in the payload where the object
was, listing the digest in the payload's blob section (`protocol.pack_payload`). The event's
signed payload hash covers that section, and a blob is unpickled only once the SHA-256 of its
bytes equals its digest, so the chain from the executor's key to the object is unbroken.

A blob's bytes:
    b"LFB1" | buffer count n (4 bytes) | length of the pickle (8 bytes) |
    n buffer lengths (8 bytes each) | the pickle (protocol 5) | the n out-of-band buffers
An array's data travels as an out-of-band buffer (pickle protocol 5), so the host hashes it
where it lies, without copying it for each submit.

A warm sandbox keeps the bytes of the blobs it fetched (verified), bounded in size, for the
current executor only (`forget` runs when another executor's event arrives, as for the
functions worker.py keeps); every task unpickles its own object from them, so a task that
changes its argument changes nothing that another task sees.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from . import protocol

MAGIC = b"LFB1"
_HEADER = struct.Struct("!4sIQ")
_LENGTH = struct.Struct("!Q")
PERSISTENT_ID_TAG = "lf-blob"

# The sandbox's blob cache holds at most this much: a quarter of the Lambda function's
# memory, so that a task still has room for its own copy and its work, and at most 512 MiB
# (a local worker process, which has no such limit, is one of several on the machine).
_CACHE_CAP_BYTES = 512 * 1024 * 1024


class BlobMismatch(Exception):
    """A blob's bytes do not hash to the digest the signed payload names: refused unread."""


def header(meta_size: int, buffer_sizes: Sequence[int]) -> bytes:
    """The bytes a blob starts with (see the module docstring)."""
    return _HEADER.pack(MAGIC, len(buffer_sizes), meta_size) + b"".join(
        _LENGTH.pack(size) for size in buffer_sizes)


def pack(meta: bytes, buffers: Iterable[bytes | memoryview] = ()) -> bytes:
    """A whole blob: the pickle `meta` and its out-of-band buffers."""
    buffers = [memoryview(buffer).cast("B") for buffer in buffers]
    return b"".join([header(len(meta), [b.nbytes for b in buffers]), meta, *buffers])


def decode(data: bytes) -> Any:
    """A fresh object from a blob's bytes: its buffers are new, writable copies, owned by the
    object (an array that a task changes in place is that task's alone)."""
    view = memoryview(data)
    if len(data) < _HEADER.size:
        raise protocol.ProtocolError("blob is shorter than its header")
    magic, count, meta_size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise protocol.ProtocolError("blob does not start with the blob magic")
    start = _HEADER.size + count * _LENGTH.size
    if len(data) < start:
        raise protocol.ProtocolError("blob is shorter than its buffer lengths")
    sizes = [_LENGTH.unpack_from(data, _HEADER.size + n * _LENGTH.size)[0]
             for n in range(count)]
    meta = view[start:start + meta_size]
    offset = start + meta_size
    buffers = []
    for size in sizes:
        buffers.append(bytearray(view[offset:offset + size]))
        offset += size
    if offset != len(data):
        raise protocol.ProtocolError("blob's length differs from what its header says")
    return pickle.loads(meta, buffers=buffers)


# -- the sandbox's cache ---------------------------------------------------------------------

_cache: OrderedDict[str, bytes] = OrderedDict()  # digest -> verified bytes, oldest first
_cached_bytes = 0


def cache_limit() -> int:
    memory_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    if memory_mb and memory_mb.isdigit():
        return min(_CACHE_CAP_BYTES, int(memory_mb) * 1024 * 1024 // 4)
    return _CACHE_CAP_BYTES


def forget() -> None:
    """Drop every cached blob (another executor's event arrived: see worker._key_for)."""
    global _cached_bytes
    _cache.clear()
    _cached_bytes = 0


def fetch(store: Any, executor: str, digest: str) -> bytes:
    """The verified bytes of blob `digest` of `executor`: from the cache, else the store."""
    global _cached_bytes
    data = _cache.get(digest)
    if data is not None:
        _cache.move_to_end(digest)
        return data
    try:
        data = store.get(protocol.blob_key(executor, digest))
    except Exception as exc:
        raise LookupError(f"blob {digest} of executor {executor} could not be read from the "
                          f"object store: {type(exc).__name__}: {exc}") from exc
    if protocol.digest(data) != digest:
        raise BlobMismatch(f"blob {digest} in the object store does not match its digest, "
                           f"which the signed payload names; refusing to unpickle it")
    limit = cache_limit()
    if len(data) <= limit:
        while _cache and _cached_bytes + len(data) > limit:
            _cached_bytes -= len(_cache.popitem(last=False)[1])
        _cache[digest] = data
        _cached_bytes += len(data)
    return data


class Resolver:
    """Unpickles the pickles of one payload, resolving its persistent ids to fresh objects.
    Within the payload an object named twice (a global and an argument) is one object, as
    it was on the host."""

    def __init__(self, digests: Sequence[str], store: Any, executor: str) -> None:
        self._digests = frozenset(digests)
        self._store = store
        self._executor = executor
        self._objects: dict[str, Any] = {}

    def loads(self, data: bytes | memoryview) -> Any:
        return _Unpickler(io.BytesIO(data), self).load()

    def resolve(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == PERSISTENT_ID_TAG
                and pid[1] in self._digests):
            raise pickle.UnpicklingError(f"persistent id {pid!r} is not a blob this payload "
                                         f"names")
        digest = pid[1]
        found = self._objects.get(digest, self)
        if found is self:
            found = self._objects[digest] = decode(fetch(self._store, self._executor, digest))
        return found


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, resolver: Resolver) -> None:
        super().__init__(file)
        self._resolver = resolver

    def persistent_load(self, pid: Any) -> Any:
        return self._resolver.resolve(pid)
