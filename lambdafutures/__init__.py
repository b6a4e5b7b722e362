"""lambdafutures: AWS Lambda as a concurrent.futures executor."""

from .errors import (
    BrokenExecutor,
    InvocationFailed,
    LambdaFuturesError,
    RemoteError,
    RemoteTraceback,
    RuntimeMismatch,
    SerializationError,
    SignatureMismatch,
    TaskExited,
    TaskTimeout,
    WorkerCrashed,
)
from .executor import LambdaExecutor
from .observe.stats import TaskStats, output_of, stats_of
from .serialize import ship_by_value
from .shared import Shared
from .speculation import Speculation

__version__ = "0.1.0"

__all__ = [
    "BrokenExecutor",
    "InvocationFailed",
    "LambdaExecutor",
    "LambdaFuturesError",
    "RemoteError",
    "RemoteTraceback",
    "RuntimeMismatch",
    "SerializationError",
    "Shared",
    "SignatureMismatch",
    "Speculation",
    "TaskExited",
    "TaskStats",
    "TaskTimeout",
    "WorkerCrashed",
    "output_of",
    "ship_by_value",
    "stats_of",
]
