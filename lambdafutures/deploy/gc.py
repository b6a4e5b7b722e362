"""Leftovers of executors that did not shut down cleanly: their completion queues and task
objects. An executor deletes both at shutdown; a killed host leaves them behind.

What gc may touch, and nothing else:
- completion queues named `{queue_prefix}{executor id}`;
- objects under `{prefix}/{executor id}/`, where the executor id has the executor's form
  (hex). Any other object, in or out of the deployment's prefix, is not gc's.

Which executors are dead: a live executor tags its completion queue with a heartbeat every
minute (backends/aws/heartbeat.py). A queue is dead when its last beat is older than
`stale_after_s` (10 minutes by default: many missed beats), or, for a queue without a
heartbeat (an executor from before heartbeats), when it was created more than `older_than_s`
ago (24 hours by default) and more than two minutes ago (a new executor beats within
seconds). Objects of an executor whose queue is alive are never deleted; objects without any
queue are deleted once none of them was written in the last `stale_after_s`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .aws import Aws, is_error
from .spec import Deployment
from .storage import queues_with_prefix

# As in backends/aws/heartbeat.py (not imported here: the backend package loads the whole
# AWS path, which the CLI needs only for gc's verdicts; see _Judge).
DEFAULT_STALE_AFTER_S = 600.0
# executor.py names executors uuid4().hex[:16]; a longer hex id is accepted for the future.
EXECUTOR_ID = re.compile(r"[0-9a-f]{16,32}")
# An untagged queue younger than this is an executor whose first beat is still on its way.
NEW_QUEUE_GRACE_S = 120.0
_GONE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


@dataclass
class Collected:
    queues: list[str] = field(default_factory=list)       # URLs deleted (or to delete)
    objects: int = 0                                       # task objects deleted (or to)
    queues_kept: int = 0
    objects_kept: int = 0


def collect(aws: Aws, deployment: Deployment, older_than_s: float, *,
            stale_after_s: float = DEFAULT_STALE_AFTER_S, dry_run: bool = False,
            now: float | None = None) -> Collected:
    """Delete the queues and task objects of dead executors (see the module docstring)."""
    now = time.time() if now is None else now
    result = Collected()
    judge = _Judge(aws, now, older_than_s, stale_after_s)

    alive: dict[str, bool] = {}   # executor id -> alive, for every queue seen
    for url in queues_with_prefix(aws, deployment.queue_prefix):
        executor_id = url.rsplit("/", 1)[-1][len(deployment.queue_prefix):]
        verdict = judge.queue(url)
        if verdict is None:       # deleted meanwhile (its executor shut down)
            continue
        alive[executor_id] = verdict
        if verdict:
            result.queues_kept += 1
        else:
            result.queues.append(url)

    for executor_id, keys, newest in _executor_objects(aws, deployment):
        if executor_id not in alive:
            # ListQueues lags behind CreateQueue: ask for the queue by name as well.
            url = _queue_url(aws, deployment.queue_prefix + executor_id)
            verdict = judge.queue(url) if url else None
            if verdict is not None:
                alive[executor_id] = verdict
                if verdict:
                    result.queues_kept += 1
                else:
                    result.queues.append(url)  # type: ignore[arg-type]
            elif now - newest <= stale_after_s:   # no queue: shutting down right now
                alive[executor_id] = True
        if alive.get(executor_id, False):
            result.objects_kept += len(keys)
            continue
        result.objects += len(keys)
        if not dry_run:
            _delete_keys(aws, deployment.bucket, keys)

    if not dry_run:
        for url in result.queues:
            try:
                aws.sqs.delete_queue(QueueUrl=url)
            except Exception as exc:
                if not is_error(exc, *_GONE):
                    raise
    return result


class _Judge:
    """Whether a completion queue's executor is alive."""

    def __init__(self, aws: Aws, now: float, older_than_s: float, stale_after_s: float):
        self.aws, self.now = aws, now
        self.older_than_s, self.stale_after_s = older_than_s, stale_after_s

    def queue(self, url: str) -> bool | None:
        """True alive, False dead, None gone."""
        from ..backends.aws.heartbeat import is_alive, last_beat

        try:
            tags = self.aws.sqs.list_queue_tags(QueueUrl=url).get("Tags", {})
            if last_beat(tags) is not None:
                return is_alive(tags, self.now, self.stale_after_s)
            created = float(self.aws.sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["CreatedTimestamp"])["Attributes"]
                ["CreatedTimestamp"])
        except Exception as exc:
            if is_error(exc, *_GONE):
                return None
            raise
        age = self.now - created
        return age <= self.older_than_s or age <= NEW_QUEUE_GRACE_S


def _queue_url(aws: Aws, name: str) -> str | None:
    try:
        return str(aws.sqs.get_queue_url(QueueName=name)["QueueUrl"])
    except Exception as exc:
        if is_error(exc, *_GONE):
            return None
        raise


def _executor_objects(aws: Aws,
                      deployment: Deployment) -> Iterator[tuple[str, list[str], float]]:
    """(executor id, keys, newest LastModified) for each executor folder under the prefix."""
    base = f"{deployment.prefix}/"
    folders: dict[str, tuple[list[str], float]] = {}
    try:
        for page in aws.s3.get_paginator("list_objects_v2").paginate(
                Bucket=deployment.bucket, Prefix=base):
            for item in page.get("Contents", []):
                executor_id, slash, _ = item["Key"][len(base):].partition("/")
                if not slash or not EXECUTOR_ID.fullmatch(executor_id):
                    continue   # not an executor's object: never gc's to delete
                keys, newest = folders.get(executor_id, ([], 0.0))
                keys.append(item["Key"])
                folders[executor_id] = (keys, max(newest, item["LastModified"].timestamp()))
    except Exception as exc:
        if not is_error(exc, "NoSuchBucket"):
            raise
    for executor_id, (keys, newest) in folders.items():
        yield executor_id, keys, newest


def _delete_keys(aws: Aws, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
        batch = [{"Key": key} for key in keys[start:start + 1000]]
        aws.s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
