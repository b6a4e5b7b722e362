"""lambdafutures' worker: the code that runs inside each Lambda sandbox (and each local
worker process). It depends only on the standard library, cloudpickle and boto3."""

from .worker import handle

__all__ = ["handle"]
