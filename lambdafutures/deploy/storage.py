"""Storage resources: the failure queue and the function's log group (the bucket is in
bucket.py)."""

from __future__ import annotations

import logging
from typing import Any

from .aws import Aws, is_error
from .resources import CREATED, UNCHANGED, UPDATED, Outcome, Progress, State, differences, quiet
from .spec import TAG_KEY, Deployment

log = logging.getLogger("lambdafutures")


class Queue:
    """The failure queue (the async-invoke failure destination): encrypted, with a short
    retention, since its records carry the tasks' events (users' arguments).

    A queue of that name that `deploy` did not create (no `lambdafutures:deployment` tag
    naming this deployment) is used as it is: its settings are not changed and `destroy`
    leaves it."""

    kind = "queue"

    def __init__(self, aws: Aws, deployment: Deployment, name: str) -> None:
        self.aws, self.deployment, self.name = aws, deployment, name
        self.url: str | None = None
        self.kept = ""   # why delete() left the queue in place, for destroy's report

    def find_url(self) -> str | None:
        try:
            self.url = self.aws.sqs.get_queue_url(QueueName=self.name)["QueueUrl"]
        except Exception as exc:
            if is_error(exc, "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                return None
            raise
        return self.url

    def owned(self, url: str) -> bool:
        tags = self.aws.sqs.list_queue_tags(QueueUrl=url).get("Tags", {})
        return tags.get(TAG_KEY) == self.deployment.name

    def _want(self) -> dict[str, str]:
        return {"MessageRetentionPeriod": str(self.deployment.settings.failure_retention)}

    def attributes(self, url: str) -> dict[str, str]:
        return self.aws.sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["All"])["Attributes"]

    def _differences(self, attributes: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """(what differs, the attributes that fix it)."""
        found, fix = differences(self._want(), attributes), dict(self._want())
        # A KMS key someone set on purpose is encryption too.
        if not (attributes.get("SqsManagedSseEnabled") == "true"
                or attributes.get("KmsMasterKeyId")):
            found.append("encryption (SqsManagedSseEnabled)")
            fix["SqsManagedSseEnabled"] = "true"
        return found, fix

    def inspect(self) -> State:
        url = self.find_url()
        if url is None:
            return State(exists=False)
        if not self.owned(url):
            return State(exists=True, detail=url)
        return State(exists=True, differences=self._differences(self.attributes(url))[0],
                     detail=url)

    def ensure(self, progress: Progress = quiet) -> Outcome:
        url = self.find_url()
        if url is None:
            self.url = self.aws.sqs.create_queue(
                QueueName=self.name,
                Attributes={"SqsManagedSseEnabled": "true", **self._want()},
                tags=self.deployment.tags())["QueueUrl"]
            return Outcome(CREATED, detail=self.url)
        if not self.owned(url):
            return Outcome(UNCHANGED, ["pre-existing queue: its settings are left as they "
                                       "are"], detail=url)
        changes, fix = self._differences(self.attributes(url))
        if not changes:
            return Outcome(UNCHANGED, detail=url)
        self.aws.sqs.set_queue_attributes(QueueUrl=url, Attributes=fix)
        return Outcome(UPDATED, changes, detail=url)

    def delete(self, progress: Progress = quiet) -> bool:
        self.kept = ""
        url = self.find_url()
        if url is None:
            return False
        if not self.owned(url):
            self.kept = "not created by this deployment"
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
