"""What a deployment is: the user's settings, every resource name derived from them, the IAM
documents, and the config file the executor reads.

Everything here is pure (no AWS calls), so the names and policies can be checked in a test
without a server, and `deploy`, `status`, `destroy` and `gc` all agree on them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

DEFAULT_NAME = "lambdafutures"
ARCHITECTURES = ("arm64", "x86_64")

# Names feed S3 (lowercase, <= 63 chars with "-{account}-{region}" appended), SQS, IAM and
# Lambda, so only what all of them accept. "-x-" is reserved: per-executor queues are
# "{name}-x-{id}" and the role may send to "{name}-x-*"; a deployment named "a-x-b" would
# put its own queues inside deployment "a"'s wildcard.
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")

TRUST_POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [{
        "Effect": "Allow",
        "Principal": {"Service": "lambda.amazonaws.com"},
        "Action": "sts:AssumeRole",
    }],
}

TAG_KEY = "lambdafutures:deployment"

# The only values CloudWatch Logs accepts for a retention policy.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096,
                      1827, 2192, 2557, 2922, 3288, 3653)


def host_python() -> str:
    return "%d.%d" % sys.version_info[:2]


def host_cloudpickle() -> str:
    import cloudpickle

    return cloudpickle.__version__


def check_name(name: str) -> str:
    if not _NAME.match(name) or "-x-" in f"{name}-" or "--" in name:
        raise ValueError(
            f"deployment name {name!r}: use 1-32 lowercase letters, digits and single hyphens, "
            "starting and ending with a letter or digit, without '-x-' or a trailing '-x' "
            "(reserved for per-executor queues)")
    return name


@dataclass(frozen=True)
class Settings:
    """What the user chooses (flags, or the previous deployment's values)."""

    name: str = DEFAULT_NAME
    region: str = "us-east-1"
    profile: str | None = None
    bucket: str | None = None          # None: "{name}-{account}-{region}"
    prefix: str = "tasks"              # the root; the deployment's is "{prefix}/{name}"
    timeout: int = 900                 # seconds; Lambda's maximum, tasks carry their own
    memory_mb: int = 2048
    architecture: str = "arm64"        # Graviton: cheaper per GB-second
    max_event_age: int = 21600         # async events older than this go to the failure queue
    object_expiry_days: int = 1        # lifecycle rule on "{prefix}/"
    log_retention_days: int = 14
    reserved_concurrency: int | None = None
    # Failure records carry the task's event (users' arguments): keep them an hour, not days.
    failure_retention: int = 3600

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}")
        if not 1 <= self.timeout <= 900:
            raise ValueError("timeout must be 1..900 seconds (Lambda's limit)")
        if not 128 <= self.memory_mb <= 10240:
            raise ValueError("memory must be 128..10240 MB (Lambda's limit)")
        if not 60 <= self.max_event_age <= 21600:
            raise ValueError("max event age must be 60..21600 seconds (Lambda's limit)")
        if self.object_expiry_days < 1:
            raise ValueError("object expiry must be at least 1 day")
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            raise ValueError(f"log retention must be one of {LOG_RETENTION_DAYS} days")
        if self.reserved_concurrency is not None and self.reserved_concurrency < 1:
            raise ValueError("reserved concurrency must be at least 1 (or unset)")
        if not self.prefix or "/" in self.prefix.strip("/"):
            raise ValueError("prefix must be one non-empty path segment")
        if not 60 <= self.failure_retention <= 1209600:
            raise ValueError("failure retention must be 60..1209600 seconds (SQS's limits)")


@dataclass(frozen=True)
class Deployment:
    """Settings bound to an account: every resource name and ARN, derived in one place."""

    settings: Settings
    account_id: str
    partition: str = "aws"
    python: str = dataclasses.field(default_factory=host_python)

    # -- names ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def region(self) -> str:
        return self.settings.region

    @property
    def prefix(self) -> str:
        # The name makes one deployment's prefix disjoint from every other's in a shared bucket.
        return f"{self.settings.prefix.strip('/')}/{self.name}"

    @property
    def bucket(self) -> str:
        return self.settings.bucket or f"{self.name}-{self.account_id}-{self.region}"

    @property
    def function_name(self) -> str:
        return self.name

    @property
    def role_name(self) -> str:
        return f"{self.name}-worker"

    @property
    def policy_name(self) -> str:
        return f"{self.name}-worker"

    @property
    def layer_name(self) -> str:
        return f"{self.name}-deps"

    @property
    def queue_prefix(self) -> str:
        return f"{self.name}-x-"

    @property
    def failure_queue_name(self) -> str:
        return f"{self.name}-failures"

    @property
    def log_group(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def runtime(self) -> str:
        return f"python{self.python}"

    # -- ARNs (deterministic, so the policy can be written before the resources exist) -----
    def _arn(self, service: str, resource: str, region: bool = True) -> str:
        return (f"arn:{self.partition}:{service}:{self.region if region else ''}:"
                f"{self.account_id}:{resource}")

    @property
    def role_arn(self) -> str:
        return self._arn("iam", f"role/{self.role_name}", region=False)

    @property
    def function_arn(self) -> str:
        return self._arn("lambda", f"function:{self.function_name}")

    @property
    def failure_queue_arn(self) -> str:
        return self._arn("sqs", self.failure_queue_name)

    @property
    def log_group_arn(self) -> str:
        return self._arn("logs", f"log-group:{self.log_group}")

    def worker_policy(self, kms_keys: tuple[str, ...] = ()) -> dict[str, Any]:
        """The role's inline policy: its task objects, its queues, its logs; nothing else.
        Workers never delete (the host does), so no s3:DeleteObject. `kms_keys`: the ARNs of
        customer-managed keys of an existing bucket or queue the deployment was given."""
        policy: dict[str, Any] = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "TaskObjects",
                    "Effect": "Allow",
                    "Action": ["s3:GetObject"],
                    "Resource": [f"arn:{self.partition}:s3:::{self.bucket}/{self.prefix}/*"],
                },
                {
                    # A worker writes results only: keys, payloads and blobs are the host's,
                    # so a task cannot overwrite another executor's key or inputs.
                    "Sid": "Results",
                    "Effect": "Allow",
                    "Action": ["s3:PutObject"],
                    "Resource": [
                        f"arn:{self.partition}:s3:::{self.bucket}/{self.prefix}/*/result"],
                },
                {
                    # Completions go to per-executor queues; Lambda delivers async-invoke
                    # failures to the destination queue with the function's own role.
                    "Sid": "Queues",
                    "Effect": "Allow",
                    "Action": ["sqs:SendMessage"],
                    "Resource": [self._arn("sqs", f"{self.queue_prefix}*"),
                                 self.failure_queue_arn],
                },
                {
                    "Sid": "Logs",
                    "Effect": "Allow",
                    "Action": ["logs:CreateLogGroup", "logs:CreateLogStream",
                               "logs:PutLogEvents"],
                    "Resource": [self.log_group_arn, f"{self.log_group_arn}:*"],
                },
            ],
        }
        if kms_keys:  # only through S3 and SQS, never the key directly
            policy["Statement"].append({
                "Sid": "Kms", "Effect": "Allow",
                "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                "Resource": sorted(kms_keys),
                "Condition": {"StringEquals": {"kms:ViaService": [
                    f"s3.{self.region}.amazonaws.com", f"sqs.{self.region}.amazonaws.com"]}},
            })
        return policy

    def lifecycle_rule(self) -> dict[str, Any]:
        return {
            "ID": f"{self.name}-expire-tasks",
            "Filter": {"Prefix": f"{self.prefix}/"},
            "Status": "Enabled",
            "Expiration": {"Days": self.settings.object_expiry_days},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }

    def tags(self) -> dict[str, str]:
        return {TAG_KEY: self.name}

    # -- the config file --------------------------------------------------------------------
    def to_config(self, *, function_arn: str, layer_arn: str | None, failure_queue_url: str,
                  layer_source: dict[str, str] | None) -> dict[str, Any]:
        s = self.settings
        return {
            "backend": "aws",
            "name": self.name,
            "region": self.region,
            "profile": s.profile,
            "account_id": self.account_id,
            "partition": self.partition,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "function_name": self.function_name,
            "function_arn": function_arn,
            "role_arn": self.role_arn,
            "layer_arn": layer_arn,
            "queue_prefix": self.queue_prefix,
            "failure_queue_url": failure_queue_url,
            "failure_queue_arn": self.failure_queue_arn,
            "timeout": s.timeout,
            "memory_mb": s.memory_mb,
            "architecture": s.architecture,
            "python": self.python,
            "cloudpickle": host_cloudpickle(),
            # Not read by the executor; kept so that a re-run without flags keeps them.
            "custom_bucket": s.bucket is not None,
            "max_event_age": s.max_event_age,
            "object_expiry_days": s.object_expiry_days,
            "log_retention_days": s.log_retention_days,
            "reserved_concurrency": s.reserved_concurrency,
            "failure_retention": s.failure_retention,
            "layer_source": layer_source,
        }


def settings_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Settings fields a previous deployment config recorded (for re-runs)."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    # "prefix" in the config is the derived "{root}/{name}", not the root setting.
    values = {key: config[key] for key in fields
              if key in config and key not in ("bucket", "prefix")}
    if config.get("custom_bucket"):
        values["bucket"] = config["bucket"]
    return values


def canonical_policy(document: Any) -> Any:
    """A policy document in a comparable form: IAM may return it re-ordered, with a single
    action as a string instead of a one-element list."""
    if isinstance(document, str):
        document = json.loads(document)

    def norm(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: norm(v, k) for k, v in sorted(value.items())}
        if key in {"Action", "Resource", "NotAction", "NotResource"}:
            items = [value] if isinstance(value, str) else value
            return sorted(items)
        if isinstance(value, list):
            return [norm(v) for v in value]
        return value

    document = norm(document)
    if isinstance(document.get("Statement"), dict):
        document["Statement"] = [document["Statement"]]
    return document
