"""Large inputs shipped once: content-addressed blobs, and `LambdaExecutor.share` handles.

A task whose function captures a big array (a global, a closure variable, a default) or
that gets one as an argument would otherwise carry its own copy in every payload: pickled at
every submit, held by every pending task, uploaded for every task. Instead, while a payload
is pickled, each large object is pickled alone and named in the payload by the SHA-256 of
that pickle (a persistent id, ("lf-blob", digest)); the executor's `BlobRegistry` keeps one
copy of those bytes however many tasks name them, until the scheduler has stored them, once,
under `protocol.blob_key(executor, digest)`, just before the first task that needs them is
invoked (on an invoker thread where the backend has them). Workers fetch a blob by digest,
check its hash, keep its bytes while the sandbox serves this executor, and unpickle a fresh
object for each task (lambdafutures_handler/blobs.py). A stored blob that no unfinished
task needs is kept for later payloads within a bound, then deleted (`BlobRegistry`); the
rest go with the executor's other objects at shutdown.

Which objects: those that are large by their type alone, checked cheaply: numpy arrays
(exactly `numpy.ndarray`, not of dtype object) of at least `BLOB_THRESHOLD` bytes, `bytes`
and `bytearray` of at least that length, and `Shared` handles whatever their size. Anything
else travels in the payload as before. A large object hidden inside another (a DataFrame's
arrays, a list of arrays) is found too: the check runs on every object the pickler meets.

The cost stays off small payloads: a payload is first pickled plainly, into an output that
stops at the first write of `BLOB_THRESHOLD` bytes or more (the pickler writes a large bytes
or buffer object in one piece) or at a handle; only such a payload is pickled again with the
per-object check (which makes pickling a list of a million floats about 4x slower). Naming
an object by content means reading it at each submit: a 40 MB array is hashed again at every
submit that captures it (about 25 ms here), because it may have changed in place since; a
`Shared` handle is hashed once, when it is made.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import threading
from typing import Any, Generic, TypeVar

from lambdafutures_handler import blobs as wire

from .blob_registry import BlobRegistry
from .errors import SerializationError

# Smaller objects stay in the payload: a blob costs an object store request on each side
# (tens of milliseconds on S3, about what 1 MiB takes to transfer there) and a persistent id
# per task; and a payload under the inline limit (256 KiB) travels in the event itself.
BLOB_THRESHOLD = 1024 * 1024

T = TypeVar("T")


class Shared(Generic[T]):
    """A handle to an object put once with `LambdaExecutor.share(obj)`.

    Pass it to tasks in place of the object, as an argument, inside an argument, or as a
    global or closure variable of the submitted function: each task receives the object
    itself (its own copy, unpickled on the worker), while the host pickles, keeps and
    uploads it once. The handle holds the object as it was when shared (later changes to
    the original are not seen) and keeps its pickled bytes in host memory while it lives.
    It travels only to tasks: pickling it anywhere else raises TypeError.
    """

    __slots__ = ("digest", "nbytes", "type_name", "_data", "__weakref__")

    def __init__(self, digest: str, data: bytes, type_name: str) -> None:
        self.digest = digest        # SHA-256 of the pickled bytes: the blob's name
        self.nbytes = len(data)     # size of the pickled bytes
        self.type_name = type_name  # of the shared object
        self._data = data

    def __repr__(self) -> str:
        return (f"<Shared {self.type_name}, {self.nbytes / 1e6:.1f} MB pickled, "
                f"sha256 {self.digest[:12]}>")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shared) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __copy__(self) -> Shared[T]:
        return self

    def __deepcopy__(self, memo: dict) -> Shared[T]:
        return self

    def __reduce__(self) -> Any:
        if getattr(_naming, "refs", None) is not None:
            raise BlobsNeeded  # a payload's first pickling: pickle it again, naming blobs
        raise TypeError("a lambdafutures Shared handle travels only to tasks (an argument, "
                        "or a global or closure variable of the submitted function); it "
                        "cannot be pickled elsewhere, nor be part of a shared object or of "
                        "the executor's initargs")


def share(obj: T) -> Shared[T]:
    """Pickle `obj` once into a blob and return its handle (registered by the payloads that
    name it, in their executor's registry)."""
    if isinstance(obj, Shared):
        return obj
    kind = type(obj)
    try:
        digest, parts = _encode(obj)
    except Exception as exc:
        raise SerializationError(f"cannot share the {kind.__qualname__} object: "
                                 f"{type(exc).__name__}: {exc}") from exc
    data = b"".join(parts)
    name = kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}")
    return Shared(digest, data, name)


# -- naming blobs while a payload is pickled ---------------------------------------------------

class BlobsNeeded(Exception):
    """A payload's first, plain pickling met a large object or a handle."""


class SmallOutput(io.BytesIO):
    """Where a payload is first pickled: it stops at the first large write, before copying it.
    (CPython's pickler writes a bytes or buffer object of 64 KiB or more in one piece.)"""

    def write(self, data: Any) -> int:
        if memoryview(data).nbytes >= BLOB_THRESHOLD:
            raise BlobsNeeded
        return super().write(data)


# The types `PayloadBlobs.reference` looks at; numpy's array type joins once numpy is loaded.
_KINDS: set[type] = {bytes, bytearray, Shared}
_TAG = wire.PERSISTENT_ID_TAG
# In the bytes of a pickle that names a blob (a false match only stops a pickle's reuse).
BLOB_TAG = _TAG.encode()
_naming = threading.local()


class naming:  # noqa: N801 - used as a function: `with naming(refs):`
    """Pickle with `refs` in this thread: `_dumps` then names blobs (serialize.py). A class,
    not a generator: it runs at every submit."""

    __slots__ = ("refs", "saved")

    def __init__(self, refs: PayloadBlobs | None) -> None:
        self.refs = refs

    def __enter__(self) -> None:
        self.saved = getattr(_naming, "refs", None)
        _naming.refs = self.refs

    def __exit__(self, *exc_info: Any) -> None:
        _naming.refs = self.saved


def current() -> PayloadBlobs | None:
    return getattr(_naming, "refs", None)


class PayloadBlobs:
    """The blobs one payload names, registered in the executor's registry as they are met.
    Without a registry (dry), it only names them: for a search that pickles parts of a call
    which failed to pickle."""

    def __init__(self, registry: BlobRegistry | None) -> None:
        self.registry = registry
        self.digests: dict[str, None] = {}  # in order, once each
        self._memo: dict[int, tuple[Any, tuple[str, str] | None]] = {}
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            _KINDS.add(numpy.ndarray)

    def reference(self, obj: Any) -> tuple[str, str] | None:
        """The persistent id naming `obj`, or None to pickle it in place."""
        kind = type(obj)
        if kind is Shared:
            if self.registry is not None and obj.digest not in self.digests:
                self.registry.reference(obj.digest, obj.nbytes, lambda: obj._data)
                self.digests[obj.digest] = None
            return (_TAG, obj.digest)
        if kind is bytes or kind is bytearray:
            if len(obj) < BLOB_THRESHOLD:
                return None
        elif obj.nbytes < BLOB_THRESHOLD or obj.dtype.hasobject:  # numpy.ndarray
            return None
        known = self._memo.get(id(obj))
        if known is not None:
            return known[1]
        if self.registry is None:
            pid = (_TAG, "0" * 64)
        else:
            digest, parts = _encode(_OutOfBand(kind, obj) if kind is not _ndarray() else obj)
            if digest not in self.digests:  # each payload counts a blob once
                size = sum(memoryview(part).nbytes for part in parts)
                self.registry.reference(digest, size, lambda: b"".join(parts))
                self.digests[digest] = None
            pid = (_TAG, digest)
        self._memo[id(obj)] = (obj, pid)  # keeps `obj`, so that its id stays its own
        return pid


def blob_pickler(base: type) -> type:
    """`base` (a cloudpickle Pickler) naming blobs by persistent id, for `current()`'s refs."""

    class BlobPickler(base):
        def __init__(self, file: Any, refs: PayloadBlobs) -> None:
            super().__init__(file)
            self._refs = refs

        def persistent_id(self, obj: Any) -> Any:
            # Called for every object pickled: a set lookup for all but the few candidates.
            if type(obj) not in _KINDS:
                return None
            return self._refs.reference(obj)

    return BlobPickler


def _ndarray() -> type | None:
    numpy = sys.modules.get("numpy")
    return None if numpy is None else numpy.ndarray


class _OutOfBand:
    """bytes or bytearray pickled with its data out of band: hashed and joined in place."""

    def __init__(self, kind: type, data: bytes | bytearray) -> None:
        self.kind = kind
        self.data = data

    def __reduce__(self) -> Any:
        return self.kind, (pickle.PickleBuffer(self.data),)


def _encode(obj: Any) -> tuple[str, list[bytes | memoryview]]:
    """(digest, the blob's bytes in parts): `obj` pickled alone, with protocol 5, its large
    buffers (an array's data) out of band, so that they are hashed where they lie."""
    from .pickler import _Pickler  # pickler imports this module

    buffers: list[pickle.PickleBuffer] = []
    with io.BytesIO() as file:
        _Pickler(file, protocol=5, buffer_callback=buffers.append).dump(obj)
        meta = file.getvalue()
    try:
        raws = [buffer.raw() for buffer in buffers]
    except BufferError:  # a buffer that is not contiguous: pickle it in band instead
        with io.BytesIO() as file:
            _Pickler(file, protocol=5).dump(obj)
            meta, raws = file.getvalue(), []
    head = wire.header(len(meta), [raw.nbytes for raw in raws])
    hasher = hashlib.sha256(head)
    hasher.update(meta)
    for raw in raws:
        hasher.update(raw)
    return hasher.hexdigest(), [head, meta, *raws]
