"""Lambda resources: the dependency layer, the function, and its async-invoke config."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import tenacity

from .aws import Aws, is_error, retry_iam_propagation
from .layer import LayerSource, described_digest
from .package import HANDLER, build_function_zip, check_unzipped_size, code_sha256, unzipped_size
from .resources import CREATED, UNCHANGED, UPDATED, Outcome, Progress, State, differences, quiet
from .spec import Deployment, host_python

log = logging.getLogger("lambdafutures")

# Lambda takes a zip of up to 50 MB in the request itself; larger ones go through S3.
DIRECT_UPLOAD_LIMIT = 45 * 2**20
_WAIT = {"Delay": 1, "MaxAttempts": 300}
# Layer versions kept after a new one is published: the newest few (and the one in use), so
# that a function pinned to a recent version keeps working and old ones stop piling up.
KEEP_LAYER_VERSIONS = 3


def _not_found(exc: BaseException) -> bool:
    return is_error(exc, "ResourceNotFoundException")


class FunctionBusy(RuntimeError):
    """The function stayed mid-update longer than deploy waits."""


def _busy(configuration: dict[str, Any]) -> bool:
    """Lambda refuses changes (ResourceConflictException) while a function is being created
    (State Pending) or updated (LastUpdateStatus InProgress)."""
    return (configuration.get("State") == "Pending"
            or configuration.get("LastUpdateStatus") == "InProgress")


def _give_up_waiting(state: tenacity.RetryCallState) -> None:
    raise FunctionBusy(f"the function is still being updated after "
                       f"{state.seconds_since_start:.0f} s; try deploy again later")


# Until the function is Active with its last update done: polled, up to five minutes.
FUNCTION_READY = tenacity.Retrying(
    retry=tenacity.retry_if_result(_busy),
    wait=tenacity.wait_exponential(multiplier=0.25, min=0.25, max=5),
    stop=tenacity.stop_after_delay(300),
    retry_error_callback=_give_up_waiting,
)

# Someone else (a console edit, another deploy, Lambda's own post-create work) may start an
# update between our wait and our call: Lambda answers ResourceConflictException; wait for
# the function again and repeat, for up to three minutes.
RESOURCE_CONFLICT = tenacity.Retrying(
    retry=tenacity.retry_if_exception(lambda exc: is_error(exc, "ResourceConflictException")),
    wait=tenacity.wait_exponential(multiplier=0.5, min=0.5, max=10),
    stop=tenacity.stop_after_delay(180),
    reraise=True,
)


class Layer:
    """The dependency layer. A version is reused when its description records the digest
    of what the deployment wants; otherwise a new version is built and published."""

    kind = "layer"

    def __init__(self, aws: Aws, deployment: Deployment, source: LayerSource,
                 expected_arn: str | None = None) -> None:
        self.aws, self.deployment, self.source = aws, deployment, source
        self.name = deployment.layer_name
        self.expected_arn = expected_arn  # status: the version the config names

    def versions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        paginator = self.aws.lam.get_paginator("list_layer_versions")
        try:
            for page in paginator.paginate(LayerName=self.name):
                found.extend(page.get("LayerVersions", []))
        except Exception as exc:
            if not _not_found(exc):
                raise
        return found

    def _matching(self, versions: list[dict[str, Any]]) -> dict[str, Any] | None:
        arch = self.deployment.settings.architecture
        matches = [v for v in versions
                   if described_digest(v.get("Description")) == self.source.digest
                   and arch in v.get("CompatibleArchitectures", [arch])]
        return max(matches, key=lambda v: v["Version"], default=None)

    def inspect(self) -> State:
        versions = self.versions()
        if not versions:
            return State(exists=False)
        match = self._matching(versions)
        if match is None:
            return State(exists=True, differences=["no version built from the recorded "
                                                   "requirements and platform at this "
                                                   "host's versions"])
        found = []
        if self.expected_arn and self.expected_arn not in {v["LayerVersionArn"]
                                                          for v in versions}:
            found.append(f"config names {self.expected_arn}, which is gone")
        return State(exists=True, differences=found, detail=match["LayerVersionArn"])

    def ensure(self, progress: Progress = quiet) -> Outcome:
        versions = self.versions()
        match = self._matching(versions)
        if match is not None:
            return Outcome(UNCHANGED, detail=match["LayerVersionArn"])
        if self.source.build is None:
            raise RuntimeError(
                f"layer {self.name}: the prebuilt zip recorded in the config "
                f"(sha256 {self.source.digest[:12]}) is not published any more; "
                "pass --layer-zip or --requirements")
        progress(f"building layer {self.name} ({self.source.summary}, "
                 f"{self.deployment.settings.architecture}, Python {self.deployment.python})")
        started = time.monotonic()
        data = self.source.build()
        size = (f"{len(data) / 2**20:.1f} MiB" if len(data) >= 2**20
                else f"{len(data) / 2**10:.0f} KiB")
        progress(f"built layer: {size} in {time.monotonic() - started:.0f} s; "
                 + self._pyc_note())
        # Lambda would only refuse the function after every upload: check first.
        check_unzipped_size({"function": unzipped_size(build_function_zip()),
                             f"layer {self.name}": unzipped_size(data)})
        progress("publishing")
        arn = self._publish(data)
        self.prune(keep=arn, progress=progress)
        return Outcome(UPDATED if versions else CREATED,
                       ["new version"] if versions else [], detail=arn)

    def _pyc_note(self) -> str:
        if self.source.built.get("pyc"):
            return ".pyc compiled (unchecked-hash)"
        if "requirements" not in self.source.record:
            return "prebuilt zip taken as is"
        return (f"no .pyc: this host runs Python {host_python()}, the runtime "
                f"{self.deployment.python} (bytecode is per Python minor)")

    def prune(self, keep: str, progress: Progress = quiet) -> list[int]:
        """Delete all but the newest KEEP_LAYER_VERSIONS versions, never `keep` (the ARN in
        use); returns the version numbers deleted."""
        versions = sorted(self.versions(), key=lambda v: v["Version"], reverse=True)
        kept = {v["Version"] for v in versions[:KEEP_LAYER_VERSIONS]}
        doomed = [v["Version"] for v in versions
                  if v["Version"] not in kept and v["LayerVersionArn"] != keep]
        for number in doomed:
            self.aws.lam.delete_layer_version(LayerName=self.name, VersionNumber=number)
        if doomed:
            progress(f"pruned {len(doomed)} old layer version(s) (kept the newest "
                     f"{KEEP_LAYER_VERSIONS})")
        return doomed

    def _publish(self, data: bytes) -> str:
        kwargs: dict[str, Any] = {
            "LayerName": self.name,
            "Description": self.source.description,
            "CompatibleRuntimes": [self.deployment.runtime],
            "CompatibleArchitectures": [self.deployment.settings.architecture],
        }
        if len(data) <= DIRECT_UPLOAD_LIMIT:
            return self.aws.lam.publish_layer_version(Content={"ZipFile": data},
                                                      **kwargs)["LayerVersionArn"]
        # Staged outside the task prefix (the function's role cannot read it) and removed
        # once Lambda has copied it.
        bucket, key = self.deployment.bucket, f"layers/{self.source.digest}.zip"
        self.aws.s3.put_object(Bucket=bucket, Key=key, Body=data)
        try:
            return self.aws.lam.publish_layer_version(
                Content={"S3Bucket": bucket, "S3Key": key}, **kwargs)["LayerVersionArn"]
        finally:
            self.aws.s3.delete_object(Bucket=bucket, Key=key)

    def delete(self, progress: Progress = quiet) -> bool:
        """Every version of the deployment's layer (the layer name is the deployment's own)."""
        versions = self.versions()
        for version in versions:
            self.aws.lam.delete_layer_version(LayerName=self.name,
                                              VersionNumber=version["Version"])
        if versions:
            progress(f"deleted {len(versions)} version(s) of layer {self.name}")
        return bool(versions)


class Function:
    """The Lambda function running `lambdafutures_handler.worker.handle`."""

    kind = "function"

    def __init__(self, aws: Aws, deployment: Deployment, code: bytes,
                 layer_arn: str | None) -> None:
        self.aws, self.deployment, self.code = aws, deployment, code
        self.layer_arn = layer_arn
        self.name = deployment.function_name
        self.arn: str | None = None

    def _want(self) -> dict[str, Any]:
        s = self.deployment.settings
        return {
            "Runtime": self.deployment.runtime,
            "Handler": HANDLER,
            "Role": self.deployment.role_arn,
            "Timeout": s.timeout,
            "MemorySize": s.memory_mb,
            "Description": f"lambdafutures worker of deployment {self.deployment.name}",
            "Layers": [self.layer_arn] if self.layer_arn else [],
        }

    def _get(self) -> dict[str, Any] | None:
        try:
            response = self.aws.lam.get_function(FunctionName=self.name)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise
        config = response["Configuration"]
        self.arn = config["FunctionArn"]
        return {
            **{key: config.get(key) for key in self._want() if key != "Layers"},
            "Layers": [layer["Arn"] for layer in config.get("Layers", [])],
            "Architectures": config.get("Architectures", ["x86_64"]),
            "CodeSha256": config.get("CodeSha256"),
            "ReservedConcurrentExecutions":
                response.get("Concurrency", {}).get("ReservedConcurrentExecutions"),
        }

    def deployed_runtime(self) -> str | None:
        """The runtime of the function as it exists (None: no function yet)."""
        have = self._get()
        return None if have is None else have.get("Runtime")

    def _code_want(self) -> dict[str, Any]:
        return {"CodeSha256": code_sha256(self.code),
                "Architectures": [self.deployment.settings.architecture]}

    def _concurrency_want(self) -> dict[str, Any]:
        return {"ReservedConcurrentExecutions": self.deployment.settings.reserved_concurrency}

    def _all_differences(self, have: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
        return (differences(self._code_want(), have), differences(self._want(), have),
                differences(self._concurrency_want(), have))

    def inspect(self) -> State:
        have = self._get()
        if have is None:
            return State(exists=False)
        code, config, concurrency = self._all_differences(have)
        return State(exists=True, differences=code + config + concurrency, detail=self.arn or "")

    def ensure(self, progress: Progress = quiet) -> Outcome:
        have = self._get()
        if have is None:
            self._create(progress)
            return Outcome(CREATED, detail=self.arn or "")
        code, config, concurrency = self._all_differences(have)
        lam = self.aws.lam
        if code:
            # Architecture is a property of the code in Lambda's API.
            self._update(lambda: lam.update_function_code(
                FunctionName=self.name, ZipFile=self.code, Publish=False,
                Architectures=[self.deployment.settings.architecture]), progress)
        if config:
            want = self._want()
            changed = {key: want[key] for key in want if have.get(key) != want[key]}
            self._update(lambda: retry_iam_propagation(
                lambda: lam.update_function_configuration(FunctionName=self.name, **changed),
                progress), progress)
        if concurrency:
            self._update(self._put_concurrency, progress)
        changes = code + config + concurrency
        return Outcome(UPDATED if changes else UNCHANGED, changes, detail=self.arn or "")

    def _create(self, progress: Progress) -> None:
        lam = self.aws.lam
        want = self._want()
        response = retry_iam_propagation(lambda: lam.create_function(
            FunctionName=self.name, Code={"ZipFile": self.code}, PackageType="Zip",
            Architectures=[self.deployment.settings.architecture], Publish=False,
            Tags=self.deployment.tags(), **want), progress)
        self.arn = response["FunctionArn"]
        lam.get_waiter("function_active_v2").wait(FunctionName=self.name, WaiterConfig=_WAIT)
        if self.deployment.settings.reserved_concurrency is not None:
            self._update(self._put_concurrency, progress)

    def wait_ready(self, policy: tenacity.Retrying = FUNCTION_READY) -> None:
        """Until the function is Active and its last update is done (Lambda refuses the
        next change before that)."""
        policy.copy()(lambda: self.aws.lam.get_function_configuration(FunctionName=self.name))

    def _update(self, change: Callable[[], Any], progress: Progress) -> Any:
        """Wait for the function to be ready, make the change, wait for it to take effect;
        a ResourceConflictException (someone else's update came in between) starts over."""

        def attempt() -> Any:
            self.wait_ready()
            result = change()
            self.wait_ready()
            return result

        def before_sleep(state: tenacity.RetryCallState) -> None:
            progress(f"function busy with another update (attempt {state.attempt_number}); "
                     "waiting")

        return RESOURCE_CONFLICT.copy(before_sleep=before_sleep)(attempt)

    def _put_concurrency(self) -> None:
        reserved = self.deployment.settings.reserved_concurrency
        if reserved is None:
            self.aws.lam.delete_function_concurrency(FunctionName=self.name)
        else:
            self.aws.lam.put_function_concurrency(FunctionName=self.name,
                                                  ReservedConcurrentExecutions=reserved)

    def delete(self, progress: Progress = quiet) -> bool:
        try:
            self.aws.lam.delete_function(FunctionName=self.name)
        except Exception as exc:
            if _not_found(exc):
                return False
            raise
        return True


class AsyncInvokeConfig:
    """How Lambda treats our asynchronous invokes: it never retries a task itself (the
    executor decides about retries), and an event it gives up on goes to the failure queue,
    where the executor learns about it."""

    kind = "async config"

    def __init__(self, aws: Aws, deployment: Deployment) -> None:
        self.aws, self.deployment = aws, deployment
        self.name = deployment.function_name

    def _want(self) -> dict[str, Any]:
        return {
            "MaximumRetryAttempts": 0,
            "MaximumEventAgeInSeconds": self.deployment.settings.max_event_age,
            "OnFailure": self.deployment.failure_queue_arn,
            "OnSuccess": None,
        }

    def _get(self) -> dict[str, Any] | None:
        try:
            config = self.aws.lam.get_function_event_invoke_config(FunctionName=self.name)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise
        destinations = config.get("DestinationConfig", {})
        return {
            "MaximumRetryAttempts": config.get("MaximumRetryAttempts"),
            "MaximumEventAgeInSeconds": config.get("MaximumEventAgeInSeconds"),
            "OnFailure": destinations.get("OnFailure", {}).get("Destination"),
            "OnSuccess": destinations.get("OnSuccess", {}).get("Destination"),
        }

    def inspect(self) -> State:
        have = self._get()
        if have is None:
            return State(exists=False)
        return State(exists=True, differences=differences(self._want(), have))

    def ensure(self, progress: Progress = quiet) -> Outcome:
        have = self._get()
        changes = [] if have is None else differences(self._want(), have)
        if have is not None and not changes:
            return Outcome(UNCHANGED)
        # Put replaces the whole config. (moto 5.2 appends instead and keeps returning the
        # first one it stored, so an *update* is not visible through moto; creation is.)
        want = self._want()
        retry_iam_propagation(lambda: self.aws.lam.put_function_event_invoke_config(
            FunctionName=self.name, MaximumRetryAttempts=want["MaximumRetryAttempts"],
            MaximumEventAgeInSeconds=want["MaximumEventAgeInSeconds"],
            DestinationConfig={"OnFailure": {"Destination": want["OnFailure"]}}), progress)
        return Outcome(CREATED if have is None else UPDATED, changes)

    def delete(self, progress: Progress = quiet) -> bool:
        try:
            self.aws.lam.delete_function_event_invoke_config(FunctionName=self.name)
        except Exception as exc:
            if _not_found(exc):
                return False
            raise
        return True
