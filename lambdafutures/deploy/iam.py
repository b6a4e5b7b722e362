"""The function's execution role and its least-privilege inline policy."""

from __future__ import annotations

import json

from .aws import Aws, is_error
from .resources import CREATED, UNCHANGED, UPDATED, Outcome, Progress, State, quiet
from .spec import TRUST_POLICY, Deployment, canonical_policy


class Role:
    """The execution role; only Lambda may assume it."""

    kind = "role"

    def __init__(self, aws: Aws, deployment: Deployment) -> None:
        self.aws, self.deployment = aws, deployment
        self.name = deployment.role_name

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
        if not changes:
            return Outcome(UNCHANGED, detail=role["Arn"])
        self.aws.iam.update_assume_role_policy(RoleName=self.name,
                                               PolicyDocument=json.dumps(TRUST_POLICY))
        return Outcome(UPDATED, changes, detail=role["Arn"])

    def delete(self, progress: Progress = quiet) -> bool:
        if self._get() is None:
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
        same = canonical_policy(document) == canonical_policy(self.deployment.worker_policy())
        return State(exists=True, differences=[] if same else ["policy document"])

    def ensure(self, progress: Progress = quiet) -> Outcome:
        document = self._get()
        want = self.deployment.worker_policy()
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
