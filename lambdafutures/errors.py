"""The errors a lambdafutures future can end with, besides the user's own exceptions."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor

__all__ = [
    "BrokenExecutor",
    "InvocationFailed",
    "LambdaFuturesError",
    "RemoteError",
    "RemoteTraceback",
    "RuntimeMismatch",
    "SerializationError",
    "SignatureMismatch",
    "TaskTimeout",
    "WorkerCrashed",
]


class LambdaFuturesError(Exception):
    """Base class of every error lambdafutures raises on its own account."""


class TaskTimeout(LambdaFuturesError, TimeoutError):
    """The task ran past the executor's per-task `timeout` and was stopped."""


class WorkerCrashed(LambdaFuturesError):
    """The process running the task died (segfault, out of memory, os._exit, ...)."""


class SerializationError(LambdaFuturesError):
    """A function, its arguments or its result could not be pickled or unpickled."""


class RemoteError(LambdaFuturesError):
    """The task raised an exception that cannot be rebuilt on the host.

    `type_name`, `message` and `remote_traceback` carry what the worker reported."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback


class RuntimeMismatch(LambdaFuturesError):
    """The worker runs a different Python minor version or cloudpickle than the host."""


class SignatureMismatch(LambdaFuturesError):
    """A payload or result failed its HMAC check and was refused without unpickling."""


class InvocationFailed(LambdaFuturesError):
    """The task could not be started: the invoke kept failing after bounded retries."""


class RemoteTraceback(Exception):
    """Set as `__cause__` of an exception re-raised from a worker; prints its traceback."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'
