"""The task bucket, and what a deployment owns in it.

A deployment owns a bucket only when `deploy` created it (the bucket then carries the tag
`lambdafutures:deployment=<name>`). In any bucket it owns exactly three things: the objects
under its prefix `{root}/{name}/`, its record `{root}/.deployments/{name}.json`, and its
lifecycle rule `{name}-expire-tasks`.

- A bucket `deploy` created gets public access blocked, SSE-S3 and the lifecycle rule.
- A pre-existing bucket (`--bucket`, or another deployment's) keeps its public access block,
  encryption and tags as they are; `deploy` only merges its own lifecycle rule into the
  existing configuration, or says how to add it when it cannot.
- `destroy` removes what the deployment owns in the bucket, and the bucket itself only when
  the deployment created it and nothing else is left in it.

The records keep deployments apart: `deploy` refuses a prefix that overlaps another recorded
deployment's (another account or region with the same name, or a hand-edited root).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError

from .aws import Aws, is_error
from .resources import CREATED, UNCHANGED, UPDATED, Outcome, Progress, State, quiet
from .spec import TAG_KEY, Deployment

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
PRE_EXISTING = "pre-existing bucket: its access block, encryption and tags are left as they are"


def record_key(deployment: Deployment) -> str:
    # "." cannot start a deployment name, so this folder is never any deployment's prefix,
    # and the worker role (which writes only under "{root}/{name}/") cannot touch it.
    return f"{deployment.settings.prefix.strip('/')}/.deployments/{deployment.name}.json"


def record(deployment: Deployment) -> dict[str, str]:
    return {"name": deployment.name, "account_id": deployment.account_id,
            "region": deployment.region, "prefix": deployment.prefix}


def overlaps(a: str, b: str) -> bool:
    """True when one prefix contains the other, path segment by path segment."""
    a, b = a.strip("/") + "/", b.strip("/") + "/"
    return a.startswith(b) or b.startswith(a)


class Bucket:
    """The task bucket (see the module docstring for what is owned)."""

    kind = "bucket"

    def __init__(self, aws: Aws, deployment: Deployment) -> None:
        self.aws, self.deployment = aws, deployment
        self.name = deployment.bucket
        self.kept = ""   # why delete() left the bucket in place, for destroy's report

    # -- reading ----------------------------------------------------------------------------
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

    def owned(self) -> bool:
        """True when this deployment created the bucket (it carries our tag)."""
        try:
            tags = self.aws.s3.get_bucket_tagging(Bucket=self.name)["TagSet"]
        except Exception as exc:
            if is_error(exc, "NoSuchTagSet", "NoSuchBucket"):
                return False
            raise
        return any(t["Key"] == TAG_KEY and t["Value"] == self.deployment.name for t in tags)

    def _public_access(self) -> dict[str, bool]:
        try:
            response = self.aws.s3.get_public_access_block(Bucket=self.name)
        except Exception as exc:
            if is_error(exc, "NoSuchPublicAccessBlockConfiguration"):
                return {}
            raise
        return response["PublicAccessBlockConfiguration"]

    def encryption(self) -> tuple[str | None, str | None]:
        """(algorithm, KMS key id) of the bucket's default encryption."""
        try:
            response = self.aws.s3.get_bucket_encryption(Bucket=self.name)
        except Exception as exc:
            if is_error(exc, "ServerSideEncryptionConfigurationNotFoundError", "NoSuchBucket"):
                return None, None
            raise
        for rule in response["ServerSideEncryptionConfiguration"].get("Rules", []):
            default = rule.get("ApplyServerSideEncryptionByDefault", {})
            if default.get("SSEAlgorithm"):
                return default["SSEAlgorithm"], default.get("KMSMasterKeyID")
        return None, None

    def _lifecycle(self) -> dict[str, Any]:
        try:
            response = self.aws.s3.get_bucket_lifecycle_configuration(Bucket=self.name)
        except Exception as exc:
            if is_error(exc, "NoSuchLifecycleConfiguration"):
                return {"Rules": []}
            raise
        response.pop("ResponseMetadata", None)
        return response

    def _rule_differs(self) -> bool:
        want = self.deployment.lifecycle_rule()
        ours = [r for r in self._lifecycle()["Rules"] if r.get("ID") == want["ID"]]
        return not ours or any(ours[0].get(key) != want[key] for key in _RULE_FIELDS)

    def _record_differs(self) -> bool:
        try:
            body = self.aws.s3.get_object(Bucket=self.name, Key=record_key(self.deployment))
        except Exception as exc:
            if is_error(exc, "NoSuchKey", "404"):
                return True
            raise
        return json.loads(body["Body"].read()) != record(self.deployment)

    def _differences(self, owned: bool) -> list[str]:
        found = []
        if owned and self._public_access() != PUBLIC_ACCESS_BLOCK:
            found.append("public access block")
        if owned and self.encryption()[0] not in _ENCRYPTED:
            found.append("default encryption")
        if self._rule_differs():
            found.append("lifecycle rule")
        if self._record_differs():
            found.append("deployment record")
        return found

    def inspect(self) -> State:
        if not self._exists():
            return State(exists=False)
        owned = self.owned()
        return State(exists=True, differences=self._differences(owned),
                     detail="" if owned else PRE_EXISTING)

    # -- deploy -----------------------------------------------------------------------------
    def ensure(self, progress: Progress = quiet) -> Outcome:
        if not self._exists():
            self._create()
            changes, status, owned = ["public access block", "default encryption",
                                      "lifecycle rule", "deployment record"], CREATED, True
        else:
            owned = self.owned()
            changes = self._differences(owned)
            status = UPDATED if changes else UNCHANGED
        self._refuse_overlap()
        notes = [] if owned else [PRE_EXISTING]
        if "public access block" in changes:
            self.aws.s3.put_public_access_block(
                Bucket=self.name, PublicAccessBlockConfiguration=PUBLIC_ACCESS_BLOCK)
        if "default encryption" in changes:
            self.aws.s3.put_bucket_encryption(
                Bucket=self.name, ServerSideEncryptionConfiguration=SSE_S3)
        if "lifecycle rule" in changes and not self._merge_lifecycle(add=True):
            rule = self.deployment.lifecycle_rule()
            notes.append(f"could not merge lifecycle rule {rule['ID']} into the bucket's "
                         f"configuration: add one expiring {rule['Filter']['Prefix']} after "
                         f"{rule['Expiration']['Days']} day(s) yourself")
        if "deployment record" in changes:
            self.aws.s3.put_object(Bucket=self.name, Key=record_key(self.deployment),
                                   Body=json.dumps(record(self.deployment)).encode(),
                                   ContentType="application/json")
        shown = changes if status == UPDATED else []
        return Outcome(status, shown + notes)

    def _create(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.name}
        if self.deployment.region != "us-east-1":  # us-east-1 refuses its own name here
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.deployment.region}
        self.aws.s3.create_bucket(**kwargs)
        # Only a bucket this call created is tagged (BucketAlreadyOwnedByYou is raised, not
        # swallowed: a bucket made meanwhile by someone else is theirs).
        tags = [{"Key": k, "Value": v} for k, v in self.deployment.tags().items()]
        self.aws.s3.put_bucket_tagging(Bucket=self.name, Tagging={"TagSet": tags})

    def _refuse_overlap(self) -> None:
        mine = record(self.deployment)
        for other in self.records():
            same = all(other.get(k) == mine[k] for k in ("name", "account_id", "region"))
            if not same and overlaps(str(other.get("prefix", "")), mine["prefix"]):
                raise RuntimeError(
                    f"prefix {mine['prefix']}/ of bucket {self.name} overlaps deployment "
                    f"{other.get('name')!r} (account {other.get('account_id')}, "
                    f"{other.get('region')}, prefix {other.get('prefix')}/): choose another "
                    "--name or --bucket")

    def records(self) -> list[dict[str, Any]]:
        """Every deployment recorded in the bucket under this deployment's root."""
        folder = record_key(self.deployment).rsplit("/", 1)[0] + "/"
        found = []
        for page in self.aws.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=folder):
            for item in page.get("Contents", []):
                body = self.aws.s3.get_object(Bucket=self.name, Key=item["Key"])["Body"]
                try:
                    found.append(json.loads(body.read()))
                except ValueError:
                    log.debug("ignoring unreadable deployment record %s", item["Key"])
        return found

    def _merge_lifecycle(self, *, add: bool) -> bool:
        """Add (or remove) our rule, keeping every other rule; False when S3 refuses."""
        want = self.deployment.lifecycle_rule()
        try:
            configuration = self._lifecycle()
            rules = [r for r in configuration["Rules"] if r.get("ID") != want["ID"]]
            if add:
                rules.append(want)
            extra = {k: v for k, v in configuration.items() if k != "Rules"}
            if rules:
                self.aws.s3.put_bucket_lifecycle_configuration(
                    Bucket=self.name, LifecycleConfiguration={"Rules": rules}, **extra)
            elif len(configuration["Rules"]) > 0:
                self.aws.s3.delete_bucket_lifecycle(Bucket=self.name)
        except ClientError as exc:  # e.g. AccessDenied, or V1 rules that cannot be mixed
            log.debug("lifecycle merge on %s failed: %s", self.name, exc)
            return False
        return True

    # -- destroy ----------------------------------------------------------------------------
    def delete(self, progress: Progress = quiet) -> bool:
        """Remove what the deployment owns; the bucket only when it created it and nothing
        else is left. True when the bucket itself was deleted."""
        self.kept = ""
        if not self._exists():
            return False
        owned = self.owned()
        removed = delete_versions(self.aws, self.name, f"{self.deployment.prefix}/")
        removed += delete_versions(self.aws, self.name, record_key(self.deployment))
        if removed:
            progress(f"removed {removed} objects under {self.deployment.prefix}/ "
                     f"of bucket {self.name}")
        others = self._other_content()
        if owned and not others:
            self.aws.s3.delete_bucket(Bucket=self.name)
            return True
        if self._rule_present() and not self._merge_lifecycle(add=False):
            progress(f"could not remove lifecycle rule {self.deployment.lifecycle_rule()['ID']}"
                     f" from bucket {self.name}")
        self.kept = (f"holds {others} not written by this deployment" if owned
                     else "not created by this deployment")
        return False

    def _rule_present(self) -> bool:
        rule_id = self.deployment.lifecycle_rule()["ID"]
        try:
            return any(r.get("ID") == rule_id for r in self._lifecycle()["Rules"])
        except Exception:  # noqa: BLE001 - unreadable: nothing we can remove either
            return False

    def _other_content(self) -> str:
        """What else is in the bucket ('' when empty): objects, versions, uploads."""
        s3 = self.aws.s3
        versions = s3.list_object_versions(Bucket=self.name, MaxKeys=1)
        if versions.get("Versions") or versions.get("DeleteMarkers"):
            return "other objects"
        if s3.list_multipart_uploads(Bucket=self.name, MaxUploads=1).get("Uploads"):
            return "unfinished uploads"
        return ""


def delete_versions(aws: Aws, bucket: str, prefix: str) -> int:
    """Delete every version, delete marker and unfinished upload under `prefix` (a folder
    "a/b/" or one key); returns how many versions and markers were deleted."""
    s3 = aws.s3
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                      UploadId=upload["UploadId"])
    count = 0
    for batch in _batches(_versions(aws, bucket, prefix), 1000):  # DeleteObjects' limit
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        count += len(batch)
    return count


def _versions(aws: Aws, bucket: str, prefix: str) -> Iterator[dict[str, str]]:
    exact = not prefix.endswith("/")   # one key: do not take "key2" along with "key"
    for page in aws.s3.get_paginator("list_object_versions").paginate(Bucket=bucket,
                                                                      Prefix=prefix):
        for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            if not exact or item["Key"] == prefix:
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
