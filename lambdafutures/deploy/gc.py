"""Leftovers of executors that did not shut down cleanly: their completion queues and task
objects. An executor deletes both at shutdown; a killed host leaves them behind.

Age is the only safe test from outside: a live executor's queue looks like a dead one's, so
the threshold must exceed the longest run (24 hours by default).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .aws import Aws, is_error
from .spec import Deployment
from .storage import queues_with_prefix


@dataclass
class Collected:
    queues: list[str] = field(default_factory=list)       # URLs deleted (or to delete)
    objects: int = 0                                       # task objects deleted (or to)
    queues_kept: int = 0
    objects_kept: int = 0


def collect(aws: Aws, deployment: Deployment, older_than_s: float, *, dry_run: bool = False,
            now: float | None = None) -> Collected:
    """Delete per-executor queues created, and task objects last written, more than
    `older_than_s` seconds ago."""
    cutoff = (time.time() if now is None else now) - older_than_s
    result = Collected()

    for url in queues_with_prefix(aws, deployment.queue_prefix):
        try:
            created = float(aws.sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["CreatedTimestamp"])["Attributes"]
                ["CreatedTimestamp"])
        except Exception as exc:  # deleted meanwhile (its executor shut down)
            if is_error(exc, "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                continue
            raise
        if created < cutoff:
            result.queues.append(url)
            if not dry_run:
                aws.sqs.delete_queue(QueueUrl=url)
        else:
            result.queues_kept += 1

    try:
        stale: list[str] = []
        paginator = aws.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=deployment.bucket,
                                       Prefix=f"{deployment.prefix}/"):
            for item in page.get("Contents", []):
                if item["LastModified"].timestamp() < cutoff:
                    stale.append(item["Key"])
                else:
                    result.objects_kept += 1
    except Exception as exc:
        if not is_error(exc, "NoSuchBucket"):
            raise
    result.objects = len(stale)
    if not dry_run:
        for start in range(0, len(stale), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": key} for key in stale[start:start + 1000]]
            aws.s3.delete_objects(Bucket=deployment.bucket,
                                  Delete={"Objects": batch, "Quiet": True})
    return result
