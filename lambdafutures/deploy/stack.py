"""The commands' work, without the command line: deploy, inspect, destroy.

Each takes a `report(kind, name, status, notes)` callable that hears one line per resource
as it is handled, and a `progress(message)` callable for what happens in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .aws import Aws
from .bucket import PRE_EXISTING, Bucket
from .functions import AsyncInvokeConfig, Function, Layer
from .iam import Role, RolePolicy
from .layer import LayerSource, from_record
from .package import build_function_zip
from .resources import Progress, Resource, State, quiet
from .spec import Deployment, Settings, host_cloudpickle, host_python, settings_from_config
from .storage import LogGroup, Queue, queues_with_prefix

Report = Callable[[str, str, str, list[str]], None]
NO_LAYER = "no layer (--no-layer)"
# Details `status` prints next to "ok".
SHOWN_DETAILS = (NO_LAYER, PRE_EXISTING)


def bind(aws: Aws, settings: Settings, python: str | None = None) -> Deployment:
    """Settings plus the caller's account: every name and ARN."""
    identity = aws.identity()
    return Deployment(settings, account_id=identity["account_id"],
                      partition=identity["partition"], python=python or host_python())


def deployment_from_config(aws: Aws, config: dict[str, Any]) -> Deployment:
    deployment = bind(aws, Settings(**settings_from_config(config)), python=config.get("python"))
    if config.get("account_id") not in (None, deployment.account_id):
        raise RuntimeError(
            f"the config describes deployment {deployment.name!r} in account "
            f"{config['account_id']}, but these credentials are for account "
            f"{deployment.account_id}")
    return deployment


def _base(aws: Aws, deployment: Deployment) -> list[Resource]:
    """Resources that depend on nothing but names, in creation order."""
    return [
        Bucket(aws, deployment),
        Queue(aws, deployment, deployment.failure_queue_name),
        LogGroup(aws, deployment),
        Role(aws, deployment),
        RolePolicy(aws, deployment),
    ]


def deploy(aws: Aws, deployment: Deployment, layer_source: LayerSource | None,
           report: Report, progress: Progress = quiet,
           code: bytes | None = None) -> dict[str, Any]:
    """Create or update every resource; return the config for `LambdaExecutor()`."""
    failure_queue_url = ""
    for resource in _base(aws, deployment):
        outcome = resource.ensure(progress)
        report(resource.kind, resource.name, outcome.status, outcome.changes)
        if isinstance(resource, Queue):
            failure_queue_url = outcome.detail

    layer_arn = None
    if layer_source is None:
        report("layer", deployment.layer_name, "none", ["--no-layer"])
    else:
        layer = Layer(aws, deployment, layer_source)
        outcome = layer.ensure(progress)
        layer_arn = outcome.detail
        report(layer.kind, layer_arn.split(":layer:")[-1], outcome.status, outcome.changes)

    function = Function(aws, deployment, code if code is not None else build_function_zip(),
                        layer_arn)
    outcome = function.ensure(progress)
    report(function.kind, function.name, outcome.status, outcome.changes)

    async_config = AsyncInvokeConfig(aws, deployment)
    outcome = async_config.ensure(progress)
    report(async_config.kind, async_config.name, outcome.status, outcome.changes)

    config = deployment.to_config(
        function_arn=function.arn or deployment.function_arn, layer_arn=layer_arn,
        failure_queue_url=failure_queue_url,
        layer_source=layer_source.record if layer_source else None)
    # For the reader: what this deployment owns. `destroy` asks the resources' tags, which
    # hold even without this file (and cannot be edited by whoever can edit it).
    config["owned"] = {
        "bucket": Bucket(aws, deployment).owned(),
        "failure_queue": Queue(aws, deployment, deployment.failure_queue_name).owned(
            failure_queue_url),
        "role": Role(aws, deployment).owned()}
    return config


def inspect(aws: Aws, deployment: Deployment,
            config: dict[str, Any] | None) -> list[tuple[str, str, State]]:
    """(kind, name, state) for every resource, checked against `config` (the deployment's
    config file) and this host's code."""
    results = [(r.kind, r.name, r.inspect()) for r in _base(aws, deployment)]

    # Without a config (a deployment named by --name) there is no record of the layer
    # source, the layer version or the host versions to compare with.
    layer_arn = (config or {}).get("layer_arn")
    record = (config or {}).get("layer_source")
    if record:
        source = from_record(record, deployment.settings.architecture, deployment.python)
        layer = Layer(aws, deployment, source, expected_arn=layer_arn)
        results.append((layer.kind, layer.name, layer.inspect()))
    elif config is not None:
        results.append(("layer", deployment.layer_name, State(exists=True, detail=NO_LAYER)))

    function = Function(aws, deployment, build_function_zip(), layer_arn)
    results.append((function.kind, function.name, function.inspect()))
    async_config = AsyncInvokeConfig(aws, deployment)
    results.append((async_config.kind, async_config.name, async_config.inspect()))

    if config is None:
        return results
    # The worker refuses payloads from another Python or cloudpickle: say so before a run.
    host = {"python": host_python(), "cloudpickle": host_cloudpickle()}
    deployed = {"python": deployment.python, "cloudpickle": config.get("cloudpickle")}
    mismatches = [f"{key}: deployed {deployed[key]}, this host {host[key]}"
                  for key in host if deployed[key] != host[key]]
    results.append(("host runtime", f"python {host['python']}, cloudpickle "
                    f"{host['cloudpickle']}", State(exists=True, differences=mismatches)))
    return results


def destroy(aws: Aws, deployment: Deployment, report: Report,
            progress: Progress = quiet) -> None:
    """Delete everything `deploy` made, dependents first. A bucket, failure queue or role
    that existed before `deploy` is kept (the bucket loses only our prefix, record and
    lifecycle rule); so is a bucket we made that holds objects we did not write."""
    # Any layer source will do: deletion removes every version of the deployment's layer.
    layer = Layer(aws, deployment, LayerSource("", None, {}, ""))
    bucket, failure_queue, log_group, role, policy = _base(aws, deployment)
    first: list[Resource] = [AsyncInvokeConfig(aws, deployment),
                             Function(aws, deployment, b"", None), layer, policy, role]
    for resource in first:
        _delete(resource, report, progress)

    # Executor queues are the deployment's by name ("-x-" is reserved for them); the function
    # is gone, so even a live executor cannot use its queue any more: say so.
    leftovers = queues_with_prefix(aws, deployment.queue_prefix)
    live = 0
    for url in leftovers:
        live += was_alive(aws, url)
        aws.sqs.delete_queue(QueueUrl=url)
    report("queues", f"{deployment.queue_prefix}*", f"deleted {len(leftovers)}",
           [f"{live} of them had a live executor"] if live else [])

    for resource in [failure_queue, bucket, log_group]:
        _delete(resource, report, progress)


def was_alive(aws: Aws, url: str) -> bool:
    """True when the executor queue at `url` has a fresh heartbeat."""
    from ..backends.aws.heartbeat import is_alive  # the backend loads only when needed

    try:
        tags = aws.sqs.list_queue_tags(QueueUrl=url).get("Tags", {})
    except Exception:  # noqa: BLE001 - only for the report
        return False
    return is_alive(tags, time.time())


def _delete(resource: Resource, report: Report, progress: Progress) -> None:
    deleted = resource.delete(progress)
    kept = getattr(resource, "kept", "")
    report(resource.kind, resource.name,
           "deleted" if deleted else "kept" if kept else "absent", [kept] if kept else [])
