"""Turning completion messages into what a future ends with.

`outcome(message, ...)` decodes one completion into a result or an exception; it never
unpickles bytes whose signature does not match. The completion thread that calls it lives
in executor.py, next to the task table it owns.
"""

from __future__ import annotations

from typing import Any

from lambdafutures_handler import protocol

from . import errors, serialize
from .backends.base import ObjectStore

_RETRYABLE = (protocol.TIMEOUT, protocol.CRASH)


class Outcome:
    __slots__ = ("value", "exception", "retryable", "stored_keys")

    def __init__(self, value: Any = None, exception: BaseException | None = None,
                 retryable: bool = False, stored_keys: tuple[str, ...] = ()) -> None:
        self.value = value
        self.exception = exception
        self.retryable = retryable
        self.stored_keys = stored_keys


def is_final(message: dict[str, Any]) -> bool:
    """True when a completion ends its task whatever its result holds: no retry follows it
    and no twin attempt is waited for (only a crash or a timeout may lead to those)."""
    if message.get("status") == "ok":
        return True
    return (message.get("error") or {}).get("kind") not in _RETRYABLE


def outcome(message: dict[str, Any], store: ObjectStore, key: bytes) -> Outcome:
    blob = message.get("result")
    stored = protocol.blob_key(blob) if blob else None
    keys = (stored,) if stored else ()
    if message.get("status") == "ok":
        try:
            return Outcome(value=_load(blob, message.get("sig"), store, key), stored_keys=keys)
        except errors.LambdaFuturesError as exc:
            return Outcome(exception=exc, stored_keys=keys)
    error = message.get("error") or {}
    kind = error.get("kind")
    if kind == protocol.USER:
        return Outcome(exception=_user_exception(error, blob, message.get("sig"), store, key),
                       stored_keys=keys)
    return Outcome(exception=_lambdafutures_exception(kind, error), retryable=kind in _RETRYABLE,
                   stored_keys=keys)


def _load(blob: dict[str, str] | None, sig: str | None, store: ObjectStore, key: bytes) -> Any:
    if not blob:
        raise errors.SerializationError("completion carries no result")
    stored = protocol.blob_key(blob)
    try:
        data = store.get(stored) if stored else protocol.read_inline(blob)
    except Exception as exc:  # noqa: BLE001 - this task's failure, not the executor's
        # E.g. S3 still failing after botocore's retries: the future ends with a typed error
        # instead of the exception ending the completion thread (BrokenExecutor for all).
        where = f"object {stored!r}" if stored else "its inline blob"
        raise errors.LambdaFuturesError(
            f"the task's result could not be read from {where}: "
            f"{type(exc).__name__}: {exc}") from exc
    if not protocol.verify(key, data, sig):
        raise errors.SignatureMismatch(
            "result signature does not match this executor's key; refusing to unpickle it")
    return serialize.loads_result(data)


def _user_exception(error: dict[str, str], blob, sig, store: ObjectStore,
                    key: bytes) -> BaseException:
    traceback_text = error.get("traceback", "")
    if blob:
        try:
            exception = _load(blob, sig, store, key)
        except errors.SignatureMismatch as exc:
            return exc
        except errors.LambdaFuturesError:
            exception = None  # e.g. its class cannot be imported here: RemoteError below
        if isinstance(exception, BaseException):
            exception.__cause__ = errors.RemoteTraceback(traceback_text)
            return exception
    remote = errors.RemoteError(error.get("type", "Exception"), error.get("message", ""),
                                traceback_text)
    remote.__cause__ = errors.RemoteTraceback(traceback_text)
    return remote


_EXCEPTIONS = {
    protocol.TIMEOUT: errors.TaskTimeout,
    protocol.CRASH: errors.WorkerCrashed,
    protocol.SERIALIZATION: errors.SerializationError,
    protocol.MISMATCH: errors.RuntimeMismatch,
    protocol.SIGNATURE: errors.SignatureMismatch,
    protocol.PROTOCOL: errors.RuntimeMismatch,
    protocol.NOT_RUN: errors.InvocationFailed,
}


def _lambdafutures_exception(kind: str | None, error: dict[str, str]) -> BaseException:
    cls = _EXCEPTIONS.get(kind, errors.LambdaFuturesError)
    exception = cls(error.get("message") or f"task failed ({kind})")
    if error.get("traceback"):
        exception.__cause__ = errors.RemoteTraceback(error["traceback"])
    return exception
