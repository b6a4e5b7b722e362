"""The wire protocol between host and worker, version 2.

This module is the single source of truth for the messages that cross the wire. The host
(`lambdafutures`) and the worker (`lambdafutures_handler`) both import it, and the worker is
zipped into Lambda with it, so it depends on the standard library only.

Invoke event (JSON, host -> worker):
    v, executor, task, attempt, payload, store, reply, inline_limit, host, submitted_at,
    timeout, key, sig
Completion message (JSON, worker -> host):
    v, executor, task, attempt, status ("ok" | "error"), result, error, stats, sig

`payload` and `result` are blob references: {"inline": base64} or {"key": object key in
`store`}. `sig` is an HMAC-SHA256 over the blob's bytes under the executor's random `key`,
which travels only inside the invoke event.

A payload's bytes (see `pack_payload`) hold the function's pickle and the calls' pickle
apart, so that both ends can reuse a function's pickle across tasks (version 2; version 1
pickled the function and its calls together). A result's bytes are one pickle.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import sys
import time
from typing import Any

VERSION = 2

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
ERROR_KINDS = (USER, TIMEOUT, CRASH, SERIALIZATION, MISMATCH, SIGNATURE, PROTOCOL, NOT_RUN)


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
    return dict(_runtime)


# -- signing -------------------------------------------------------------------------------

def new_key() -> bytes:
    return os.urandom(32)


def sign(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def verify(key: bytes, data: bytes, signature: str | None) -> bool:
    return bool(signature) and hmac.compare_digest(sign(key, data), signature)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


_last_key: tuple[str, bytes] = ("", b"")


def decode_key(text: str) -> bytes:
    global _last_key
    # A worker sees one executor's key event after event: decode it once.
    if _last_key[0] != text:
        _last_key = (text, base64.b64decode(text))
    return _last_key[1]


# -- blobs ---------------------------------------------------------------------------------

def inline_blob(data: bytes) -> dict[str, str]:
    return {"inline": base64.b64encode(data).decode("ascii")}


def stored_blob(key: str) -> dict[str, str]:
    return {"key": key}


def blob_key(blob: dict[str, str]) -> str | None:
    return blob.get("key")


def read_inline(blob: dict[str, str]) -> bytes:
    return base64.b64decode(blob["inline"])


# -- payloads ------------------------------------------------------------------------------
# b"LFP" | flags (1 byte) | length of the function's pickle (4 bytes, big-endian) |
# the function's pickle | the pickle of (calls, batch).
_PAYLOAD_MAGIC = b"LFP"
_PAYLOAD_HEADER = struct.Struct("!3sBI")
# The host found nothing that the function captures that could change, or that a call could
# change, so a worker may keep the function it unpickled for later payloads with the very
# same function bytes.
FN_REUSABLE = 1


def pack_payload(fn_pickle: bytes, calls_pickle: bytes, flags: int = 0) -> bytes:
    return b"".join((_PAYLOAD_HEADER.pack(_PAYLOAD_MAGIC, flags, len(fn_pickle)), fn_pickle,
                     calls_pickle))


def unpack_payload(data: bytes) -> tuple[bytes | None, int, memoryview | bytes]:
    """(function pickle, flags, pickle of (calls, batch)); for a payload that is one pickle of
    (fn, calls, batch), as hand-built events may carry, (None, 0, data)."""
    if data[:len(_PAYLOAD_MAGIC)] != _PAYLOAD_MAGIC:
        return None, 0, data
    if len(data) < _PAYLOAD_HEADER.size:
        raise ProtocolError("payload is shorter than its header")
    _, flags, size = _PAYLOAD_HEADER.unpack_from(data)
    start = _PAYLOAD_HEADER.size
    if len(data) < start + size:
        raise ProtocolError("payload is shorter than its function's pickle")
    view = memoryview(data)
    return bytes(view[start:start + size]), flags, view[start + size:]


def payload_key(executor: str, task: int) -> str:
    return f"{executor}/{task}/payload"


def result_key(executor: str, task: int, attempt: int) -> str:
    return f"{executor}/{task}/{attempt}/result"


# -- messages ------------------------------------------------------------------------------

def make_event(
    *,
    executor: str,
    task: int,
    attempt: int,
    payload: dict[str, str],
    sig: str,
    store: str,
    reply: str,
    key: bytes,
    timeout: float | None,
    submitted_at: float,
    limit: int,
) -> dict[str, Any]:
    return {
        "v": VERSION,
        "executor": executor,
        "task": task,
        "attempt": attempt,
        "payload": payload,
        "sig": sig,
        "store": store,
        "reply": reply,
        "inline_limit": limit,
        "host": runtime_versions(),
        "submitted_at": submitted_at,
        "timeout": timeout,
        "key": encode_key(key),
    }


def check_event(event: Any) -> None:
    """Raise ProtocolError unless `event` is an invoke event this worker can read."""
    if not isinstance(event, dict):
        raise ProtocolError(f"invoke event is a {type(event).__name__}, not an object")
    version = event.get("v")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r} sent, this worker speaks {VERSION}")
    missing = [name for name in ("executor", "task", "attempt", "payload", "store", "reply",
                                 "key", "host") if name not in event]
    if missing:
        raise ProtocolError(f"invoke event lacks {', '.join(missing)}")


def make_completion(
    event: dict[str, Any],
    *,
    status: str,
    stats: dict[str, Any],
    result: dict[str, str] | None = None,
    sig: str | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "v": VERSION,
        "executor": event["executor"],
        "task": event["task"],
        "attempt": event["attempt"],
        "status": status,
        "result": result,
        "sig": sig,
        "error": error,
        "stats": stats,
    }


def error_info(kind: str, type_name: str, message: str, traceback_text: str = "") -> dict:
    return {"kind": kind, "type": type_name, "message": message, "traceback": traceback_text}


def failure_completion(event: dict[str, Any], kind: str, message: str,
                       stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """A completion written on the worker's behalf by whoever saw it fail (the local
    supervisor, or the host reading Lambda's failure destination)."""
    return make_completion(
        event,
        status="error",
        stats=stats or {"reported_at": time.time()},
        error=error_info(kind, kind, message),
    )
