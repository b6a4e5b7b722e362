"""The errors a lambdafutures future can end with, besides the user's own exceptions."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor
from typing import Any

__all__ = [
    "BrokenExecutor",
    "InvocationFailed",
    "LambdaFuturesError",
    "RemoteError",
    "RemoteTraceback",
    "RuntimeMismatch",
    "SerializationError",
    "SignatureMismatch",
    "TaskExited",
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

    def __reduce__(self) -> tuple:
        return type(self), (self.type_name, self.message, self.remote_traceback)


class TaskExited(LambdaFuturesError):
    """The task raised SystemExit, KeyboardInterrupt or another BaseException that is not an
    Exception. It comes back as this error, never as the host's own control flow: a task
    calling sys.exit(3) must not end the script that submitted it.

    `type_name` names what the task raised, `code` is SystemExit's exit code (else None)
    and `message` its text."""

    def __init__(self, type_name: str, message: str = "", code: Any = None) -> None:
        if type_name.rpartition(".")[2] == "SystemExit":
            what = f"{type_name} (exit code {code!r})" if code is not None else type_name
        else:
            what = f"{type_name}: {message}" if message else type_name
        super().__init__(f"the task raised {what}; it ended only that task")
        self.type_name = type_name
        self.message = message
        self.code = code

    def __reduce__(self) -> tuple:
        return type(self), (self.type_name, self.message, self.code)


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
