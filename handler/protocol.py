"""The wire protocol between host and worker, version 3.

This module is the single source of truth for the messages that cross the wire. The host
(`lambdafutures`) and the worker (`lambdafutures_handler`) both import it, and the worker is
zipped into Lambda with it, so it depends on the standard library only.

Invoke event (JSON, host -> worker):
    v, executor, task, attempt, payload, payload_sha256, store, reply, inline_limit, host,
    submitted_at, timeout, expires_at, output_limit, sig
Completion message (JSON, worker -> host):
    v, executor, task, attempt, status ("ok" | "error"), result, result_sha256, error,
    stats, output, sig
Hint (built by the host's own backend code, never read from a queue as such):
    {"hint": kind, "message": text, "event": the invoke event it is about}

`payload` and `result` are {"inline": base64} or {"stored": true}. A stored blob's object key
is never read from a message: both ends compute it from (executor, task[, attempt]) with
`payload_key` / `result_key`, so a message cannot name someone else's object.

Trust. Each executor has a random 32-byte key. It never travels in a message: the host
writes it once to `key_object(executor)` in the object store (S3 under the deployment's
prefix, readable by the function's role; locally a 0700 directory), and a worker reads it
there, once per executor per sandbox. `sig` is an HMAC-SHA256 under that key over a fixed
list of the message's fields, behind a domain label per direction, so an event's signature
can never pass for a completion's; the blob's SHA-256 is one of the signed fields. A message
whose signature does not verify is dropped without acting on anything it says. Lambda's
failure records are unsigned by nature; the host turns them into hints, which may only end
an attempt that the host itself considers running, and only if the record carries that
attempt's own event with a valid signature.

A payload's bytes (see `pack_payload`) hold the function's pickle and the calls' pickle
apart, so that both ends can reuse a function's pickle across tasks. Large objects in them
are named by the SHA-256 of their own pickle and stored once per executor at `blob_key`
(blobs.py); the payload lists those digests, so its signed hash covers them. A result's
bytes are one pickle.
"""

from __future__ import annotations

import base64
import os
import struct
import sys
import time
from typing import Any

# Signing is part of the protocol, kept in a module of its own (what is signed, and how).
from .signing import completion_is_signed as completion_is_signed
from .signing import digest as digest
from .signing import event_is_signed as event_is_signed
from .signing import key_object as key_object
from .signing import new_key as new_key
from .signing import sign_completion, sign_event

VERSION = 3

# Lambda's async-invoke event limit and SQS's message limit were both 256 KiB for years
# (both have since grown to 1 MiB); 256 KiB is safe everywhere, including moto.
DEFAULT_INLINE_LIMIT = 256 * 1024
# base64 grows data by 4/3 and the JSON envelope needs room too.
_ENVELOPE_ROOM = 4 * 1024

# Error kinds carried in a completion's "error" field; the host maps each to an exception.
USER = "user"                    # the user's function raised
TIMEOUT = "timeout"              # the task ran past its time limit
CRASH = "crash"                  # the process running the task died
SERIALIZATION = "serialization"  # a payload or result could not be (un)pickled
MISMATCH = "runtime_mismatch"    # worker's Python / cloudpickle differ from the host's
SIGNATURE = "signature"          # a payload or result failed its HMAC check
PROTOCOL = "protocol"            # an event the worker cannot read
NOT_RUN = "not_run"              # the platform dropped the event without running it
INITIALIZER = "initializer"      # the executor's initializer raised in this sandbox
ERROR_KINDS = (USER, TIMEOUT, CRASH, SERIALIZATION, MISMATCH, SIGNATURE, PROTOCOL, NOT_RUN,
               INITIALIZER)


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


def inline_limit() -> int:
    """Largest blob (in bytes, before base64) sent inline; larger ones go to the store."""
    value = os.environ.get("LAMBDAFUTURES_INLINE_LIMIT")
    return int(value) if value else DEFAULT_INLINE_LIMIT


def fits_inline(size: int, limit: int) -> bool:
    return (size * 4) // 3 + _ENVELOPE_ROOM <= limit


_runtime: dict[str, str] | None = None


def runtime_versions() -> dict[str, str]:
    global _runtime
    if _runtime is None:  # read once: every event carries it, every worker checks it
        import cloudpickle

        _runtime = {
            "python": "%d.%d" % sys.version_info[:2],
            "cloudpickle": cloudpickle.__version__,
        }
    return _runtime  # one dict shared by every event: nothing may change it


# -- blobs ---------------------------------------------------------------------------------

STORED: dict[str, bool] = {"stored": True}


def inline_blob(data: bytes, binary: bool = False) -> dict[str, Any]:
    """An inline blob: base64 text for JSON (Lambda events, SQS), or the bytes themselves
    where the message travels pickled (a local worker's socket), which spares both ends the
    base64 of every argument and result."""
    return {"inline": data if binary else base64.b64encode(data).decode("ascii")}


def is_stored(blob: dict[str, Any] | None) -> bool:
    return bool(blob) and "stored" in blob


def read_inline(blob: dict[str, Any]) -> bytes:
    inline = blob["inline"]
    if isinstance(inline, bytes):
        return inline
    return base64.b64decode(inline, validate=True)


# -- payloads ------------------------------------------------------------------------------
# b"LFP" | flags (1 byte) | length of the function's pickle (4 bytes, big-endian) |
# [with HAS_BLOBS: count (4 bytes) | that many SHA-256 digests (32 bytes each)] |
# [with HAS_INITIALIZER: length of the initializer's pickle (4 bytes) | that pickle] |
# the function's pickle | the pickle of (calls, batch).
_PAYLOAD_MAGIC = b"LFP"
_PAYLOAD_HEADER = struct.Struct("!3sBI")
_LENGTH = struct.Struct("!I")
# The host found nothing that the function captures that could change, or that a call could
# change, so a worker may keep the function it unpickled for later payloads with the very
# same function bytes.
FN_REUSABLE = 1
# The payload carries the executor's pickled (initializer, initargs): a sandbox runs it once,
# before its first task of that executor.
HAS_INITIALIZER = 2
# The pickles name large objects stored apart, once per executor, by the SHA-256 of their
# bytes (persistent ids; see blobs.py): the digests listed are the blobs the payload needs.
HAS_BLOBS = 4
_DIGEST_SIZE = 32


def pack_payload(fn_pickle: bytes, calls_pickle: bytes, flags: int = 0,
                 initializer: bytes | None = None, blobs: list[str] | tuple = ()) -> bytes:
    parts = [b"", fn_pickle, calls_pickle]
    if initializer is not None:
        flags |= HAS_INITIALIZER
        parts[1:1] = [_LENGTH.pack(len(initializer)), initializer]
    if blobs:
        flags |= HAS_BLOBS
        parts[1:1] = [_LENGTH.pack(len(blobs)), *map(bytes.fromhex, blobs)]
    parts[0] = _PAYLOAD_HEADER.pack(_PAYLOAD_MAGIC, flags, len(fn_pickle))
    return b"".join(parts)


class Payload:
    __slots__ = ("fn_pickle", "flags", "initializer", "calls_pickle", "blobs")

    def __init__(self, fn_pickle: bytes | None, flags: int, initializer: bytes | None,
                 calls_pickle: memoryview | bytes, blobs: tuple[str, ...] = ()) -> None:
        self.fn_pickle = fn_pickle
        self.flags = flags
        self.initializer = initializer
        self.calls_pickle = calls_pickle
        self.blobs = blobs  # hex digests


def _payload_blobs(data: bytes, flags: int) -> tuple[tuple[str, ...], int]:
    """(the digests in a payload's blob section, where the section after it starts)."""
    start = _PAYLOAD_HEADER.size
    if not flags & HAS_BLOBS:
        return (), start
    if len(data) < start + _LENGTH.size:
        raise ProtocolError("payload is shorter than its blob count")
    (count,) = _LENGTH.unpack_from(data, start)
    start += _LENGTH.size
    end = start + count * _DIGEST_SIZE
    if len(data) < end:
        raise ProtocolError("payload is shorter than its blob digests")
    return tuple(data[at:at + _DIGEST_SIZE].hex()
                 for at in range(start, end, _DIGEST_SIZE)), end


def payload_blobs(data: bytes) -> tuple[str, ...]:
    """The digests of the blobs a packed payload needs (reads its header only)."""
    if data[:len(_PAYLOAD_MAGIC)] != _PAYLOAD_MAGIC or len(data) < _PAYLOAD_HEADER.size:
        return ()
    flags = data[len(_PAYLOAD_MAGIC)]
    if not flags & HAS_BLOBS:
        return ()  # most payloads: no need to walk the header
    return _payload_blobs(data, flags)[0]


def unpack_payload(data: bytes) -> Payload:
    """The parts of a payload; for one that is a single pickle of (fn, calls, batch), as
    hand-built events may carry, fn_pickle is None and calls_pickle is all of it."""
    if data[:len(_PAYLOAD_MAGIC)] != _PAYLOAD_MAGIC:
        return Payload(None, 0, None, data)
    if len(data) < _PAYLOAD_HEADER.size:
        raise ProtocolError("payload is shorter than its header")
    _, flags, size = _PAYLOAD_HEADER.unpack_from(data)
    blobs, start = _payload_blobs(data, flags)
    view = memoryview(data)
    initializer = None
    if flags & HAS_INITIALIZER:
        if len(data) < start + _LENGTH.size:
            raise ProtocolError("payload is shorter than its initializer's length")
        (init_size,) = _LENGTH.unpack_from(data, start)
        start += _LENGTH.size
        initializer = bytes(view[start:start + init_size])
        start += init_size
    if len(data) < start + size:
        raise ProtocolError("payload is shorter than its function's pickle")
    return Payload(bytes(view[start:start + size]), flags, initializer, view[start + size:],
                   blobs)


def payload_key(executor: str, task: int) -> str:
    return f"{executor}/{task}/payload"


def blob_key(executor: str, digest: str) -> str:
    """Where a blob of the executor lives: named by its content, stored once per executor
    however many tasks use it, deleted with the executor's objects."""
    return f"{executor}/blobs/{digest}"


def result_key(executor: str, task: int, attempt: int) -> str:
    return f"{executor}/{task}/{attempt}/result"


# -- messages ------------------------------------------------------------------------------

def make_event(
    *,
    key: bytes,
    executor: str,
    task: int,
    attempt: int,
    payload: dict[str, Any],
    payload_sha256: str,
    store: str,
    reply: str,
    timeout: float | None,
    submitted_at: float,
    expires_at: float | None,
    limit: int,
    output_limit: int = 0,
) -> dict[str, Any]:
    event = {
        "v": VERSION,
        "executor": executor,
        "task": task,
        "attempt": attempt,
        "payload": payload,
        "payload_sha256": payload_sha256,
        "store": store,
        "reply": reply,
        "inline_limit": limit,
        "host": runtime_versions(),
        "submitted_at": submitted_at,
        "timeout": timeout,
        "expires_at": expires_at,
        "output_limit": output_limit,
    }
    sign_event(key, event)
    return event


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_blob(blob: Any, what: str) -> None:
    if blob is None:
        return
    if not isinstance(blob, dict) or len(blob) != 1 or not (
            blob.get("stored") is True or isinstance(blob.get("inline"), (str, bytes))):
        raise ProtocolError(f"{what} is not a blob reference")


def check_event(event: Any) -> None:
    """Raise ProtocolError unless `event` is an invoke event this worker can read."""
    if not isinstance(event, dict):
        raise ProtocolError(f"invoke event is a {type(event).__name__}, not an object")
    version = event.get("v")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r} sent, this worker speaks {VERSION}")
    if not (isinstance(event.get("executor"), str) and event["executor"].isalnum()):
        raise ProtocolError("invoke event lacks a valid executor id")
    if not (_is_int(event.get("task")) and _is_int(event.get("attempt"))):
        raise ProtocolError("invoke event lacks integer task and attempt numbers")
    for name in ("store", "reply", "payload_sha256", "sig"):
        if not isinstance(event.get(name), str):
            raise ProtocolError(f"invoke event lacks {name}")
    _check_blob(event.get("payload"), "payload")
    if event.get("payload") is None:
        raise ProtocolError("invoke event lacks payload")
    if not isinstance(event.get("host"), dict):
        raise ProtocolError("invoke event lacks host")
    for name in ("timeout", "expires_at"):
        if event.get(name) is not None and not _is_number(event[name]):
            raise ProtocolError(f"invoke event's {name} is not a number")
    if event.get("output_limit") is not None and not _is_int(event["output_limit"]):
        raise ProtocolError("invoke event's output_limit is not a count")


def check_completion(message: Any) -> None:
    """Raise ProtocolError unless `message` has a completion's shape (it says nothing of who
    wrote it: `completion_is_signed` does). Every completion passes here: kept flat."""
    if type(message) is not dict:
        raise ProtocolError(f"completion is a {type(message).__name__}, not an object")
    get = message.get
    if get("v") != VERSION:
        raise ProtocolError(f"completion of protocol version {get('v')!r}")
    task, attempt = get("task"), get("attempt")
    if type(get("executor")) is not str or type(task) is not int or type(attempt) is not int \
            or task < 0 or attempt < 0:
        raise ProtocolError("completion lacks an executor id, or integer task and attempt")
    status, result, error = get("status"), get("result"), get("error")
    if result is not None:
        _check_blob(result, "result")
        if type(get("result_sha256")) is not str:
            raise ProtocolError("completion's result has no hash")
    if status == "ok":
        if result is None:
            raise ProtocolError("ok completion without a result")
    elif status == "error":
        if not (type(error) is dict and type(error.get("kind")) is str
                and type(error.get("type")) is str and type(error.get("message")) is str
                and type(error.get("traceback")) is str and error["kind"] in ERROR_KINDS):
            raise ProtocolError("error completion without a valid error")
    else:
        raise ProtocolError(f"completion status {status!r}")
    output = get("output")
    if type(get("stats")) is not dict or (output is not None and type(output) is not str) \
            or type(get("sig")) is not str:
        raise ProtocolError("completion lacks stats or a signature, or has bad output")


def make_completion(
    event: dict[str, Any],
    key: bytes,
    *,
    status: str,
    stats: dict[str, Any],
    result: dict[str, Any] | None = None,
    result_sha256: str | None = None,
    error: dict[str, str] | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    return sign_completion(key, {
        "v": VERSION,
        "executor": event["executor"],
        "task": event["task"],
        "attempt": event["attempt"],
        "status": status,
        "result": result,
        "result_sha256": result_sha256,
        "error": error,
        "stats": stats,
        "output": output,
    })


def error_info(kind: str, type_name: str, message: str, traceback_text: str = "") -> dict:
    return {"kind": kind, "type": type_name, "message": message, "traceback": traceback_text}


def failure_completion(event: dict[str, Any], key: bytes, kind: str, message: str,
                       stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """A signed completion for an attempt that failed in the worker's own machinery."""
    return make_completion(event, key, status="error",
                           stats=stats or {"reported_at": time.time()},
                           error=error_info(kind, kind, message))


# Kinds a hint may carry: what the platform (Lambda, the local supervisor) can see.
HINT_KINDS = (TIMEOUT, CRASH, NOT_RUN, PROTOCOL)


def make_hint(event: Any, kind: str, message: str) -> dict[str, Any]:
    """What the platform reports about an event it ran (or dropped): unsigned, so the host
    checks `event` against its own signature and the attempt's state before using it."""
    return {"hint": kind, "message": message, "event": event}
