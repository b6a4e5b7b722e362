"""Storage resources: the task bucket, the failure queue, the function's log group."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from .aws import Aws, is_error
from .resources import CREATED, UNCHANGED, UPDATED, Outcome, Progress, State, differences, quiet
from .spec import Deployment

log = logging.getLogger("lambdafutures")

PUBLIC_ACCESS_BLOCK = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}
SSE_S3 = {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}
# Encryption someone chose on purpose (KMS) is at least as strong as SSE-S3: leave it.
_ENCRYPTED = {"AES256", "aws:kms", "aws:kms:dsse"}
_RULE_FIELDS = ("Filter", "Status", "Expiration", "AbortIncompleteMultipartUpload")


class Bucket:
    """The task bucket: public access blocked, encrypted at rest, task objects expiring."""

    kind = "bucket"

    def __init__(self, aws: Aws, deployment: Deployment) -> None:
        self.aws, self.deployment = aws, deployment
        self.name = deployment.bucket

    def _exists(self) -> bool:
        try:
            self.aws.s3.head_bucket(Bucket=self.name)
            return True
        except Exception as exc:  # head_bucket reports a missing bucket as a bare 404
            if is_error(exc, "404", "NoSuchBucket", "NotFound"):
                return False
            if is_error(exc, "403"):
                raise RuntimeError(
                    f"bucket {self.name} exists but belongs to another account; choose "
                    "another name with --bucket") from None
            raise

    def _public_access(self) -> dict[str, bool]:
        try:
            response = self.aws.s3.get_public_access_block(Bucket=self.name)
        except Exception as exc:
            if is_error(exc, "NoSuchPublicAccessBlockConfiguration"):
                return {}
            raise
        return response["PublicAccessBlockConfiguration"]

    def _encryption(self) -> str | None:
        try:
            response = self.aws.s3.get_bucket_encryption(Bucket=self.name)
        except Exception as exc:
            if is_error(exc, "ServerSideEncryptionConfigurationNotFoundError"):
                return None
            raise
        rules = response["ServerSideEncryptionConfiguration"].get("Rules", [])
        for rule in rules:
            algorithm = rule.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm")
            if algorithm:
                return algorithm
        return None

    def _lifecycle_rules(self) -> list[dict[str, Any]]:
        try:
            response = self.aws.s3.get_bucket_lifecycle_configuration(Bucket=self.name)
        except Exception as exc:
            if is_error(exc, "NoSuchLifecycleConfiguration"):
                return []
            raise
        return response.get("Rules", [])

    def _settings_differences(self) -> list[str]:
        found = []
        if self._public_access() != PUBLIC_ACCESS_BLOCK:
            found.append("public access block")
        if self._encryption() not in _ENCRYPTED:
            found.append("default encryption")
        want = self.deployment.lifecycle_rule()
        ours = [rule for rule in self._lifecycle_rules() if rule.get("ID") == want["ID"]]
        if not ours or any(ours[0].get(key) != want[key] for key in _RULE_FIELDS):
            found.append("lifecycle rule")
        return found

    def inspect(self) -> State:
        if not self._exists():
            return State(exists=False)
        return State(exists=True, differences=self._settings_differences())

    def ensure(self, progress: Progress = quiet) -> Outcome:
        if self._exists():
            changes = self._settings_differences()
            status = UPDATED if changes else UNCHANGED
        else:
            self._create()
            changes, status = ["public access block", "default encryption",
                               "lifecycle rule"], CREATED
        if "public access block" in changes:
            self.aws.s3.put_public_access_block(
                Bucket=self.name, PublicAccessBlockConfiguration=PUBLIC_ACCESS_BLOCK)
        if "default encryption" in changes:
            self.aws.s3.put_bucket_encryption(
                Bucket=self.name, ServerSideEncryptionConfiguration=SSE_S3)
        if "lifecycle rule" in changes:
            self._put_lifecycle_rule()
        return Outcome(status, changes if status == UPDATED else [])

    def _create(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.name}
        if self.deployment.region != "us-east-1":  # us-east-1 refuses its own name here
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.deployment.region}
        try:
            self.aws.s3.create_bucket(**kwargs)
        except Exception as exc:
            if not is_error(exc, "BucketAlreadyOwnedByYou"):
                raise
        tags = [{"Key": k, "Value": v} for k, v in self.deployment.tags().items()]
        self.aws.s3.put_bucket_tagging(Bucket=self.name, Tagging={"TagSet": tags})

    def _put_lifecycle_rule(self) -> None:
        # The call replaces the whole configuration: keep rules that are not ours.
        want = self.deployment.lifecycle_rule()
        others = [rule for rule in self._lifecycle_rules() if rule.get("ID") != want["ID"]]
        self.aws.s3.put_bucket_lifecycle_configuration(
            Bucket=self.name, LifecycleConfiguration={"Rules": [*others, want]})

    def delete(self, progress: Progress = quiet) -> bool:
        if not self._exists():
            return False
        removed = empty_bucket(self.aws, self.name)
        if removed:
            progress(f"removed {removed} objects from bucket {self.name}")
        self.aws.s3.delete_bucket(Bucket=self.name)
        return True


def empty_bucket(aws: Aws, bucket: str) -> int:
    """Delete every object version, delete marker and unfinished upload; return the count."""
    s3 = aws.s3
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                      UploadId=upload["UploadId"])
    count = 0
    for batch in _batches(_all_versions(aws, bucket), 1000):  # DeleteObjects' limit
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        count += len(batch)
    return count


def _all_versions(aws: Aws, bucket: str) -> Iterator[dict[str, str]]:
    for page in aws.s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            yield {"Key": item["Key"], "VersionId": item["VersionId"]}


def _batches(items: Iterator[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    batch: list[dict[str, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Queue:
    """An encrypted SQS queue (the async-invoke failure destination)."""

    kind = "queue"

    def __init__(self, aws: Aws, deployment: Deployment, name: str) -> None:
        self.aws, self.deployment, self.name = aws, deployment, name
        self.url: str | None = None

    def _url(self) -> str | None:
        try:
            self.url = self.aws.sqs.get_queue_url(QueueName=self.name)["QueueUrl"]
        except Exception as exc:
            if is_error(exc, "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                return None
            raise
        return self.url

    def _differences(self, url: str) -> list[str]:
        attributes = self.aws.sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["All"])["Attributes"]
        # A KMS key someone set on purpose is encryption too.
        if attributes.get("SqsManagedSseEnabled") == "true" or attributes.get("KmsMasterKeyId"):
            return []
        return ["encryption (SqsManagedSseEnabled)"]

    def inspect(self) -> State:
        url = self._url()
        if url is None:
            return State(exists=False)
        return State(exists=True, differences=self._differences(url), detail=url)

    def ensure(self, progress: Progress = quiet) -> Outcome:
        url = self._url()
        if url is None:
            self.url = self.aws.sqs.create_queue(
                QueueName=self.name, Attributes={"SqsManagedSseEnabled": "true"},
                tags=self.deployment.tags())["QueueUrl"]
            return Outcome(CREATED, detail=self.url)
        changes = self._differences(url)
        if not changes:
            return Outcome(UNCHANGED, detail=url)
        self.aws.sqs.set_queue_attributes(QueueUrl=url,
                                          Attributes={"SqsManagedSseEnabled": "true"})
        return Outcome(UPDATED, changes, detail=url)

    def delete(self, progress: Progress = quiet) -> bool:
        url = self._url()
        if url is None:
            return False
        self.aws.sqs.delete_queue(QueueUrl=url)
        return True


def queues_with_prefix(aws: Aws, prefix: str) -> list[str]:
    """URLs of the queues whose name starts with `prefix`."""
    urls: list[str] = []
    for page in aws.sqs.get_paginator("list_queues").paginate(
            QueueNamePrefix=prefix, PaginationConfig={"PageSize": 1000}):
        urls.extend(page.get("QueueUrls", []))
    # SQS matches the prefix already; the check guards against endpoints that do not.
    return [url for url in urls if url.rsplit("/", 1)[-1].startswith(prefix)]


class LogGroup:
    """The function's log group, made up front so that its logs expire."""

    kind = "log group"

    def __init__(self, aws: Aws, deployment: Deployment) -> None:
        self.aws, self.deployment = aws, deployment
        self.name = deployment.log_group

    def _find(self) -> dict[str, Any] | None:
        paginator = self.aws.logs.get_paginator("describe_log_groups")
        for page in paginator.paginate(logGroupNamePrefix=self.name):
            for group in page.get("logGroups", []):
                if group["logGroupName"] == self.name:
                    return group
        return None

    def _want(self) -> dict[str, object]:
        return {"retentionInDays": self.deployment.settings.log_retention_days}

    def inspect(self) -> State:
        group = self._find()
        if group is None:
            return State(exists=False)
        return State(exists=True, differences=differences(self._want(), group))

    def ensure(self, progress: Progress = quiet) -> Outcome:
        group = self._find()
        if group is None:
            try:
                self.aws.logs.create_log_group(logGroupName=self.name,
                                               tags=self.deployment.tags())
            except Exception as exc:  # created by Lambda in the meantime
                if not is_error(exc, "ResourceAlreadyExistsException"):
                    raise
            self._put_retention()
            return Outcome(CREATED)
        changes = differences(self._want(), group)
        if not changes:
            return Outcome(UNCHANGED)
        self._put_retention()
        return Outcome(UPDATED, changes)

    def _put_retention(self) -> None:
        self.aws.logs.put_retention_policy(
            logGroupName=self.name, retentionInDays=self.deployment.settings.log_retention_days)

    def delete(self, progress: Progress = quiet) -> bool:
        try:
            self.aws.logs.delete_log_group(logGroupName=self.name)
        except Exception as exc:
            if is_error(exc, "ResourceNotFoundException"):
                return False
            raise
        return True
