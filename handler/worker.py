"""The worker: `handle(event, context)` runs one invoke event.

It is the Lambda function's handler (`lambdafutures_handler.worker.handle`) and runs unchanged
in the local backend's worker processes. It loads the payload (inline or from the object
store), refuses payloads that fail their signature or come from another runtime, runs the
call(s), stores the result (inline or in the object store) and sends the completion.

Every path ends in exactly one completion sent to the event's reply address, except an event
too broken to name a reply address: that one raises, and Lambda's failure destination (or
the local supervisor) reports it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import threading
import time
import traceback
import uuid
from typing import Any

import cloudpickle

from . import blobs, exceptions, output, protocol
from .transport import aws_client, open_store, send_reply

WORKER_ID = uuid.uuid4().hex[:12]
_invocations = 0

# The worker reports a timeout itself this long before the sandbox would be killed, so the
# host learns it from a completion instead of waiting for its own deadline.
_TIMEOUT_REPORT_MARGIN_S = 1.0

# A completion must fit in one queue message (SQS: 256 KiB) whatever the user's exception
# says, so its message and traceback text travel clipped; a pickled exception keeps its own.
_MESSAGE_CHARS = 4_000
_TRACEBACK_CHARS = 16_000


def handle(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    global _invocations
    job_start = time.time()
    cold = _invocations == 0
    _invocations += 1
    protocol.check_event(event)
    # A fresh sandbox makes its AWS clients now, before the task's time limit starts:
    # importing boto3 and building a client takes about a second, and a trivial task on a
    # cold sandbox must not be reported as having run past a short timeout.
    store = open_store(event["store"])
    if event["reply"].startswith(("https://", "http://")):
        aws_client("sqs")
    key = _key_for(event["executor"], store)
    if not protocol.event_is_signed(key, event):
        # No reply: whoever sent this cannot be told apart from an attacker, and a signed
        # error would let them end a real task. The platform records the failure.
        raise protocol.ProtocolError("invoke event's signature does not match its "
                                     "executor's key; not running it")

    stats: dict[str, Any] = {
        "job_start": job_start,
        "worker_id": WORKER_ID,
        "cold_start": cold,
        "request_id": getattr(context, "aws_request_id", None),
        "memory_limit_mb": _memory_limit_mb(context),
    }
    expires_at = event.get("expires_at")
    if expires_at is not None and job_start > expires_at:
        # It waited in the platform's queue past the point where the host stopped counting
        # on it: the host runs it again elsewhere, so running it here would run it twice.
        _finish_stats(stats)
        send_reply(event["reply"], protocol.failure_completion(
            event, key, protocol.NOT_RUN,
            f"the event waited {job_start - event['submitted_at']:.1f} s before a sandbox "
            f"took it, past its expiry; not run", stats))
        return {"task": event["task"], "status": "expired"}
    watchdog = _TimeoutWatchdog(event, context, stats, key)
    watchdog.start()
    global _capture
    try:
        # On Lambda the output also goes to the sandbox's stdout (CloudWatch); a local
        # worker's stdout is its host's terminal, where the host echoes it only if asked.
        with output.captured(event.get("output_limit") or 0,
                             tee=event["reply"] != "local:") as _capture:
            completion = _run(event, stats, store, key)
    finally:
        _capture = None
        timed_out = watchdog.cancel()
    if timed_out:
        # The watchdog has reported this task and is ending the process: sending a result
        # now would contradict it, and taking the next event would lose that one.
        threading.Event().wait()
    send_reply(event["reply"], completion)
    return {"task": event["task"], "status": completion["status"]}


def _run(event: dict[str, Any], stats: dict[str, Any], store: Any,
         key: bytes) -> dict[str, Any]:
    global _initialized
    def failed(kind: str, type_name: str, message: str, tb: str = "", result=None, sig=None):
        _finish_stats(stats)
        return protocol.make_completion(
            event, key, status="error", stats=stats, result=result, result_sha256=sig,
            error=protocol.error_info(kind, type_name, _clip(message, _MESSAGE_CHARS),
                                      _clip(tb, _TRACEBACK_CHARS)),
            output=_output_text())

    mine = protocol.runtime_versions()
    theirs = event["host"]
    if (theirs.get("python"), theirs.get("cloudpickle")) != (mine["python"], mine["cloudpickle"]):
        return failed(
            protocol.MISMATCH, "RuntimeMismatch",
            f"host runs Python {theirs.get('python')} with cloudpickle "
            f"{theirs.get('cloudpickle')}, worker runs Python {mine['python']} with "
            f"cloudpickle {mine['cloudpickle']}")

    blob = event["payload"]
    if protocol.is_stored(blob):
        data = store.get(protocol.payload_key(event["executor"], event["task"]))
    else:
        data = protocol.read_inline(blob)
    if protocol.digest(data) != event["payload_sha256"]:
        return failed(protocol.SIGNATURE, "SignatureMismatch",
                      "payload does not match its signed hash; refusing to unpickle it")
    try:
        fn, calls, batch, initializer = _load_payload(data, store, event["executor"])
    except blobs.BlobMismatch as exc:
        return failed(protocol.SIGNATURE, "SignatureMismatch", str(exc))
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported, not raised
        return failed(protocol.SERIALIZATION, type(exc).__name__,
                      f"payload cannot be unpickled on the worker: {exc!r}",
                      traceback.format_exc())
    if initializer is not None:
        try:
            init, initargs = cloudpickle.loads(initializer)
            init(*initargs)
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            return failed(protocol.INITIALIZER, exceptions.qualified_name(type(exc)),
                          f"the executor's initializer failed: {exceptions.describe(exc)}",
                          _clip("".join(traceback.format_exception(type(exc), exc,
                                                                   exc.__traceback__)),
                                _TRACEBACK_CHARS))
        _initialized = True
    stats["setup_done"] = time.time()

    try:
        results = [fn(*args, **kwargs) for args, kwargs in calls]
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything
        stats["job_done"] = time.time()

        tb = _clip(exceptions.format_traceback(exc), _TRACEBACK_CHARS)
        message = _clip(exceptions.describe(exc), _MESSAGE_CHARS)
        pickled = exceptions.pickle_exception(exc)
        result, sig = (None, None)
        if pickled is not None:
            # The texts travel in the same queue message as an inline blob: leave them room.
            room = len(json.dumps(message)) + len(json.dumps(tb))
            result, sig = _store_blob(event, store, pickled, room)
        return failed(protocol.USER, exceptions.qualified_name(type(exc)), message, tb, result,
                      sig)
    stats["job_done"] = time.time()

    value = results if batch else results[0]
    try:
        pickled = cloudpickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - reported to the host as a SerializationError
        return failed(protocol.SERIALIZATION, type(exc).__name__,
                      f"result of type {exceptions.qualified_name(type(value))} cannot be "
                      f"pickled: {exc}", traceback.format_exc())
    result, sha256 = _store_blob(event, store, pickled)
    _finish_stats(stats)
    return protocol.make_completion(event, key, status="ok", stats=stats, result=result,
                                    result_sha256=sha256, output=_output_text())


# The running task's output buffer (one task at a time per sandbox).
_capture: output.TailBuffer | None = None


def _output_text() -> str | None:
    return _capture.text() if _capture is not None else None


# Functions from payloads flagged FN_REUSABLE, by the bytes of their pickle: a warm worker
# skips rebuilding a function it already has, as a warm sandbox keeps its imports. Only the
# current executor's: see `_key_for`.
_functions: dict[bytes, Any] = {}
_FUNCTIONS_KEPT = 64
# The key of the executor whose events this sandbox runs now, read from the object store.
_current_key: tuple[str, bytes] = ("", b"")
# Whether the current executor's initializer has run in this sandbox.
_initialized = False


def _key_for(executor: str, store: Any) -> bytes:
    """The executor's signing key, read once per executor per sandbox. When another
    executor's event arrives, everything kept for the previous one goes: its key, its
    unpickled functions (with their closures and globals) and its blobs' bytes, so one
    executor's task cannot reach another's data through a warm sandbox."""
    global _current_key, _initialized
    if _current_key[0] != executor:
        _functions.clear()
        blobs.forget()
        _initialized = False
        _current_key = ("", b"")
        key = store.get(protocol.key_object(executor))
        if len(key) != 32:
            raise protocol.ProtocolError(f"executor {executor}'s key object is malformed")
        _current_key = (executor, key)
    return _current_key[1]


def _load_payload(data: bytes, store: Any = None,
                  executor: str = "") -> tuple[Any, list, bool, bytes | None]:
    """(function, calls, batch, the initializer's pickle if it has yet to run here)."""
    payload = protocol.unpack_payload(data)
    fn_pickle, flags, rest = payload.fn_pickle, payload.flags, payload.calls_pickle
    if fn_pickle is None:
        return (*cloudpickle.loads(data), None)
    # Large objects that the payload names by digest come from the store (blobs.py), a
    # fresh one for each task. The host never marks such a function pickle reusable.
    loads = (blobs.Resolver(payload.blobs, store, executor).loads if payload.blobs
             else cloudpickle.loads)
    initializer = None if _initialized else payload.initializer
    reusable = flags & protocol.FN_REUSABLE
    fn = _functions.get(fn_pickle) if reusable else None
    # A call that gave its function an attribute changed it: the next task gets a fresh one.
    if fn is None or getattr(fn, "__dict__", None):
        fn = loads(fn_pickle)
        if reusable:
            if len(_functions) >= _FUNCTIONS_KEPT:
                _functions.clear()
            _functions[fn_pickle] = fn
    calls, batch = loads(rest)
    return fn, calls, batch, initializer


def _store_blob(event, store, data: bytes, room: int = 0):
    """(blob reference, SHA-256 of `data`): inline if it fits, else in the store under the
    key both ends compute. The completion's signature covers the hash."""
    # The task's output travels in the same message: leave it room too.
    room += len(json.dumps(_output_text() or ""))
    limit = event.get("inline_limit", protocol.DEFAULT_INLINE_LIMIT) - room
    if protocol.fits_inline(len(data), limit):
        blob = protocol.inline_blob(data, binary=event["reply"] == "local:")
    else:
        store.put(protocol.result_key(event["executor"], event["task"], event["attempt"]), data)
        blob = dict(protocol.STORED)
    return blob, protocol.digest(data)


def _finish_stats(stats: dict[str, Any]) -> None:
    now = time.time()
    stats.setdefault("setup_done", now)
    stats.setdefault("job_done", now)
    stats["sent_at"] = time.time()
    stats["billed_ms"] = int((stats["sent_at"] - stats["job_start"]) * 1000) + 1
    stats["peak_memory_mb"] = _peak_memory_mb()


def _clip(text: str, limit: int) -> str:
    """`text`, or its head and tail around a marker, `limit` characters in all. Both ends
    matter: a traceback's outer frames come first, the exception line last."""
    if len(text) <= limit:
        return text
    mark = f"\n[... clipped from {len(text)} characters ...]\n"
    keep = max(0, limit - len(mark))
    return text[:keep // 2] + mark + text[len(text) - (keep - keep // 2):]


def _peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _memory_limit_mb(context: Any) -> int | None:
    value = getattr(context, "memory_limit_in_mb", None)
    return int(value) if value is not None else None


class _TimeoutWatchdog:
    """Reports TIMEOUT before the task's limit, then ends the process.

    The limit is the executor's per-task `timeout` or, when sooner, just before the sandbox
    itself would be killed (Lambda's remaining time). Reporting first means the host learns
    of the timeout from a completion instead of waiting for its own deadline; exiting after
    means a runaway call stops costing money and cannot report a result later (Lambda
    starts a fresh sandbox for the next event, the local pool a fresh process)."""

    def __init__(self, event: dict[str, Any], context: Any, stats: dict[str, Any],
                 key: bytes) -> None:
        self._key = key
        self._fired = False
        self._finished = False
        self._lock = threading.Lock()
        self._event = event
        self._stats = stats
        self._delay: float | None = None
        limits = []
        if event.get("timeout"):
            limits.append((float(event["timeout"]), float(event["timeout"])))
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        millis = remaining() if remaining is not None else None
        if millis is not None:
            seconds = millis / 1000.0
            limits.append((max(0.0, seconds - min(_TIMEOUT_REPORT_MARGIN_S, seconds / 10)),
                           seconds))
        if limits:
            self._delay, self._limit = min(limits)

    def start(self) -> None:
        if self._delay is not None:
            _watcher.arm(self, time.monotonic() + self._delay)

    def cancel(self) -> bool:
        """Stop watching; True if the watchdog fired first (it then ends the process)."""
        with self._lock:
            self._finished = True
            fired = self._fired
        if self._delay is not None:
            _watcher.disarm(self)
        return fired

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return  # the call ended in time; its own completion goes out
            self._fired = True
        stats = dict(self._stats, reported_at=time.time())
        try:
            send_reply(self._event["reply"], protocol.failure_completion(
                self._event, self._key, protocol.TIMEOUT,
                f"task ran longer than its {self._limit:g} s limit; its worker was stopped",
                stats))
        finally:
            os._exit(124)


class _Watcher:
    """The one thread of a process that watches the running task's time limit: starting a
    thread (a threading.Timer) for every task cost more than a short task itself."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: tuple[float, _TimeoutWatchdog] | None = None
        self._wakes_at = math.inf  # when the waiting thread looks again by itself
        self._thread: threading.Thread | None = None

    def arm(self, watchdog: _TimeoutWatchdog, deadline: float) -> None:
        with self._cond:
            self._armed = (deadline, watchdog)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="lambdafutures-watchdog")
                self._thread.start()
            elif deadline < self._wakes_at:
                # Usually not: each task's deadline comes after the last one's, so the thread
                # wakes at that one, finds this one, and sleeps on without being woken here.
                self._cond.notify()

    def disarm(self, watchdog: _TimeoutWatchdog) -> None:
        with self._cond:
            if self._armed is not None and self._armed[1] is watchdog:
                self._armed = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    armed = self._armed
                    now = time.monotonic()
                    if armed is None:
                        self._wakes_at = math.inf
                        self._cond.wait()
                    elif armed[0] > now:
                        self._wakes_at = deadline = armed[0]
                        # Hold nothing of the task while waiting: its watchdog keeps the
                        # event and the executor's key, which must not outlive the task.
                        armed = None
                        self._cond.wait(deadline - now)
                    else:
                        self._armed = None
                        break
            watchdog, armed = armed[1], None
            watchdog._fire()  # ends the process, unless the call ended just in time
            del watchdog


_watcher = _Watcher()
