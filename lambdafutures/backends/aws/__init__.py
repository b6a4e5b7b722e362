"""The AWS backend: payloads and results in S3, async Lambda invokes, completions over SQS.

Everything it needs comes from the deployment config that `lambdafutures deploy` writes,
overridden by options given to LambdaExecutor. Endpoints follow boto3's conventions
(AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 / _SQS / _LAMBDA, profiles) or the `endpoint_urls`
option, so the same code talks to AWS, a moto server or LocalStack.

Each executor makes its own completion queue (`{queue_prefix}{executor id}`) and deletes it
at shutdown; Lambda's failure records (timeouts, crashes, out of memory) arrive on the
deployment's shared failure queue and become hints (completions.py).

The parts: lean.py / signed_http.py (the hot requests, without boto3's CPU cost), invoke.py
(the boto3 invoker), completions.py (SQS completions), retry.py (every retry policy and the
invokers' shared budget), limits.py (the concurrency Lambda allows the function).
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.config import Config

from lambdafutures_handler import protocol
from lambdafutures_handler.transport import S3Store

from ..base import Backend
from .completions import SqsCompletionQueue, failure_from_record
from .heartbeat import QueueHeartbeat
from .lean import make_invoker, make_sqs
from .limits import DEFAULT_MAX_WORKERS, available_concurrency, default_max_workers

__all__ = ["DEFAULT_MAX_WORKERS", "SqsCompletionQueue", "available_concurrency",
           "failure_from_record", "open_aws_backend"]

log = logging.getLogger("lambdafutures")

DEFAULT_INVOKE_THREADS = 64
DEFAULT_RECEIVERS = 4
_REQUIRED = ("function_name", "bucket", "queue_prefix")
_OPTIONS = ("function_name", "bucket", "prefix", "queue_prefix", "failure_queue_url",
            "region", "profile", "timeout")


def open_aws_backend(
    *,
    executor_id: str,
    max_workers: int | None,
    timeout: float | None,
    deployment: dict[str, Any] | None,
    endpoint_urls: dict[str, str] | None = None,
    invoke_threads: int | None = None,
    receivers: int = DEFAULT_RECEIVERS,
    inline_limit: int | None = None,
    long_poll_s: int = 20,
    deadline_margin: float = 30.0,
    session: Any = None,
    invoker: str = "lean",
    receiver: str = "lean",
    **options: Any,
) -> Backend:
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) for the aws backend: {', '.join(sorted(unknown))}")
    settings = {**(deployment or {}), **{k: v for k, v in options.items() if v is not None}}
    missing = [name for name in _REQUIRED if not settings.get(name)]
    if missing:
        raise ValueError(
            f"the aws backend needs {', '.join(missing)}: run `lambdafutures deploy` once, "
            f"or pass them to LambdaExecutor")
    endpoints = {**settings.get("endpoint_urls", {}), **(endpoint_urls or {})}
    if session is None:
        import boto3

        session = boto3.Session(profile_name=settings.get("profile"),
                                region_name=settings.get("region"))

    def client(service: str, connections: int, **config: Any) -> Any:
        # One pooled connection per thread that uses the client, so none waits for another.
        return session.client(service, endpoint_url=endpoints.get(service),
                              config=Config(max_pool_connections=connections, **config))

    function_name = settings["function_name"]
    # Lambda and SQS retries are ours (retry.py: one declared policy per call, and a budget
    # the invokers share), so each is counted once; botocore's own would multiply them.
    lam = client("lambda", invoke_threads or DEFAULT_INVOKE_THREADS,
                 retries={"total_max_attempts": 1})
    available = available_concurrency(lam, function_name)
    default_workers = default_max_workers(available, function_name,
                                          announce=max_workers is None)
    threads = invoke_threads or min(DEFAULT_INVOKE_THREADS, max_workers or default_workers)
    s3 = client("s3", threads + receivers + 2, retries={"mode": "standard"})
    sqs = client("sqs", receivers + 3, retries={"total_max_attempts": 1})
    # "lean" sends invokes, receives and deletes itself, signed by botocore, at a fraction of
    # boto3's CPU per call (lean.py); "boto3" keeps the plain clients.
    lambda_invoker = make_invoker(invoker, lam, session, function_name, threads)
    completion_sqs = make_sqs(receiver, sqs, session, receivers + 3)

    store = S3Store(settings["bucket"], f"{settings.get('prefix', 'tasks')}", client=s3)
    completions = SqsCompletionQueue(
        completion_sqs, f"{settings['queue_prefix']}{executor_id}", executor_id,
        failure_queue_url=settings.get("failure_queue_url"), receivers=receivers,
        long_poll_s=long_poll_s)
    # Marks the completion queue alive for `lambdafutures gc` (heartbeat.py).
    heartbeat = QueueHeartbeat(sqs, completions.queue_url).start()

    def delete_objects() -> None:
        store.delete_prefix(f"{executor_id}/")

    _warn_environment_differences(settings)
    sandbox_timeout = settings.get("timeout")
    return Backend(
        name="aws",
        store=store,
        invoker=lambda_invoker,
        completions=completions,
        reply_url=completions.queue_url,
        invoke_threads=threads,
        inline_limit=inline_limit or protocol.inline_limit(),
        deadline_margin=deadline_margin,
        sandbox_timeout=float(sandbox_timeout) if sandbox_timeout else None,
        default_max_workers=default_workers,
        concurrency_limit=available,
        # Lambda accepts an async invoke and may hold it in its own queue (concurrency
        # exhausted): events carry an expiry, and the deadline counts from there.
        platform_queue=True,
        closers=[getattr(lambda_invoker, "close", lambda: None),
                 getattr(completion_sqs, "close", lambda: None), completions.close,
                 delete_objects, heartbeat.stop],  # closed in reverse: heartbeat first
    )


_warned_about: set[str] = set()


def _warn_environment_differences(settings: dict[str, Any]) -> None:
    """Once per deployment and process: packages whose version in the function's layer is
    not the host's (see `lambdafutures status`)."""
    name = str(settings.get("function_name"))
    if name in _warned_about:
        return
    _warned_about.add(name)
    from ...deploy.environment import differences

    try:
        differing = differences(settings)
    except Exception:  # noqa: BLE001 - a report, never a reason not to run
        log.debug("could not compare the host's packages with the layer's", exc_info=True)
        return
    if differing:
        log.warning("the Lambda layer's packages differ from this host's: %s (tasks using them "
                    "run those versions in the cloud; see `lambdafutures status`)",
                    ", ".join(f"{package} host {host or '-'} / layer {layer or '-'}"
                              for package, (host, layer) in sorted(differing.items())))
