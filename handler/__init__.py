"""lambdafutures' worker: the code that runs inside each Lambda sandbox (and each local
worker process). It depends only on the standard library, cloudpickle and boto3."""

# First, before anything can load numpy: BLAS thread counts for the sandbox's CPU share.
from . import sandbox  # noqa: F401, I001 - must run before the worker's imports
from .worker import handle

__all__ = ["handle"]
