"""The function's execution role and its least-privilege inline policy.

The role is the deployment's when `deploy` created it (tag `lambdafutures:deployment`). A role
of that name made by someone else is used only if Lambda may already assume it; its trust
policy is never rewritten, and `destroy` removes only our inline policy from it.

KMS: when the bucket or the failure queue (pre-existing ones) encrypt with a customer-managed
KMS key, the policy grants kms:Decrypt and kms:GenerateDataKey on exactly that key, and only
through S3 and SQS (kms:ViaService). Refusing such buckets would shut out exactly the users
whose organisation mandates KMS; granting the two calls S3 and SQS make on the role's behalf
(PutObject / SendMessage need GenerateDataKey, GetObject needs Decrypt) is the least that
works. AWS-managed keys (aws/s3, aws/sqs) need no grant: their key policy already allows
every principal of the account through the service.
"""

from __future__ import annotations

import json

from botocore.exceptions import ClientError

from .aws import Aws, is_error
from .bucket import Bucket
from .resources import CREATED, UNCHANGED, UPDATED, Outcome, Progress, State, quiet
from .spec import TAG_KEY, TRUST_POLICY, Deployment, canonical_policy
from .storage import Queue

_AWS_MANAGED_ALIASES = ("alias/aws/s3", "alias/aws/sqs")


class Role:
    """The execution role; only Lambda may assume it."""

    kind = "role"

    def __init__(self, aws: Aws, deployment: Deployment) -> None:
        self.aws, self.deployment = aws, deployment
        self.name = deployment.role_name
        self.kept = ""   # why delete() left the role in place, for destroy's report

    def owned(self) -> bool:
        tags = self.aws.iam.list_role_tags(RoleName=self.name).get("Tags", [])
        return any(t["Key"] == TAG_KEY and t["Value"] == self.deployment.name for t in tags)

    def _get(self) -> dict | None:
        try:
            return self.aws.iam.get_role(RoleName=self.name)["Role"]
        except Exception as exc:
            if is_error(exc, "NoSuchEntity"):
                return None
            raise

    def _differences(self, role: dict) -> list[str]:
        if canonical_policy(role["AssumeRolePolicyDocument"]) != canonical_policy(TRUST_POLICY):
            return ["trust policy"]
        return []

    def inspect(self) -> State:
        role = self._get()
        if role is None:
            return State(exists=False)
        return State(exists=True, differences=self._differences(role), detail=role["Arn"])

    def ensure(self, progress: Progress = quiet) -> Outcome:
        role = self._get()
        if role is None:
            tags = [{"Key": k, "Value": v} for k, v in self.deployment.tags().items()]
            role = self.aws.iam.create_role(
                RoleName=self.name, AssumeRolePolicyDocument=json.dumps(TRUST_POLICY),
                Description=f"lambdafutures worker role of deployment {self.deployment.name}",
                Tags=tags)["Role"]
            return Outcome(CREATED, detail=role["Arn"])
        changes = self._differences(role)
        owned = self.owned()
        if not changes:
            notes = [] if owned else ["pre-existing role: only our inline policy is added"]
            return Outcome(UNCHANGED, notes, detail=role["Arn"])
        if not owned:
            raise RuntimeError(
                f"role {self.name} exists, was not created by deployment "
                f"{self.deployment.name!r}, and its trust policy does not let Lambda assume "
                "it; it is left as it is: choose another --name")
        self.aws.iam.update_assume_role_policy(RoleName=self.name,
                                               PolicyDocument=json.dumps(TRUST_POLICY))
        return Outcome(UPDATED, changes, detail=role["Arn"])

    def delete(self, progress: Progress = quiet) -> bool:
        self.kept = ""
        if self._get() is None:
            return False
        if not self.owned():
            self.kept = "not created by this deployment"
            return False
        iam = self.aws.iam
        # IAM refuses to delete a role that still has policies: remove any left on it.
        for page in iam.get_paginator("list_role_policies").paginate(RoleName=self.name):
            for policy in page["PolicyNames"]:
                iam.delete_role_policy(RoleName=self.name, PolicyName=policy)
        for page in iam.get_paginator("list_attached_role_policies").paginate(
                RoleName=self.name):
            for policy in page["AttachedPolicies"]:
                iam.detach_role_policy(RoleName=self.name, PolicyArn=policy["PolicyArn"])
        iam.delete_role(RoleName=self.name)
        return True


class RolePolicy:
    """The role's inline policy (see Deployment.worker_policy)."""

    kind = "role policy"

    def __init__(self, aws: Aws, deployment: Deployment) -> None:
        self.aws, self.deployment = aws, deployment
        self.name = deployment.policy_name

    def _get(self) -> dict | None:
        try:
            return self.aws.iam.get_role_policy(
                RoleName=self.deployment.role_name, PolicyName=self.name)["PolicyDocument"]
        except Exception as exc:
            if is_error(exc, "NoSuchEntity"):
                return None
            raise

    def inspect(self) -> State:
        document = self._get()
        if document is None:
            return State(exists=False)
        want = self.deployment.worker_policy(kms_keys(self.aws, self.deployment))
        same = canonical_policy(document) == canonical_policy(want)
        return State(exists=True, differences=[] if same else ["policy document"])

    def ensure(self, progress: Progress = quiet) -> Outcome:
        document = self._get()
        want = self.deployment.worker_policy(kms_keys(self.aws, self.deployment))
        if document is not None and canonical_policy(document) == canonical_policy(want):
            return Outcome(UNCHANGED)
        self.aws.iam.put_role_policy(RoleName=self.deployment.role_name, PolicyName=self.name,
                                     PolicyDocument=json.dumps(want))
        return Outcome(CREATED if document is None else UPDATED,
                       [] if document is None else ["policy document"])

    def delete(self, progress: Progress = quiet) -> bool:
        if self._get() is None:
            return False
        self.aws.iam.delete_role_policy(RoleName=self.deployment.role_name,
                                        PolicyName=self.name)
        return True


def kms_keys(aws: Aws, deployment: Deployment) -> tuple[str, ...]:
    """ARNs of the customer-managed KMS keys the bucket and the failure queue encrypt with."""
    found = []
    algorithm, key = Bucket(aws, deployment).encryption()
    if algorithm in ("aws:kms", "aws:kms:dsse") and key:
        found.append(key)
    queue = Queue(aws, deployment, deployment.failure_queue_name)
    url = queue.find_url()
    if url is not None:
        key = queue.attributes(url).get("KmsMasterKeyId")
        if key:
            found.append(key)
    arns = {_key_arn(aws, key, deployment) for key in found
            if not key.endswith(_AWS_MANAGED_ALIASES)}
    return tuple(sorted(arns))


def _key_arn(aws: Aws, key: str, deployment: Deployment) -> str:
    """A key id or alias as the key's ARN (IAM grants on keys, not on aliases)."""
    if key.startswith("arn:") and ":key/" in key:
        return key
    try:
        return str(aws.client("kms").describe_key(KeyId=key)["KeyMetadata"]["Arn"])
    except ClientError as exc:
        raise RuntimeError(
            f"bucket {deployment.bucket} or queue {deployment.failure_queue_name} encrypts "
            f"with KMS key {key}, which these credentials cannot describe ({exc}); the "
            "worker role needs kms:Decrypt and kms:GenerateDataKey on it. Allow "
            "kms:DescribeKey, or give the key's ARN as the bucket's default key") from None
