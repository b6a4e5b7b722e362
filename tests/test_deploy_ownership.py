"""What `deploy`, `destroy` and `gc` may touch, against the moto server over HTTP.

- destroy never deletes a bucket, queue or role that existed before deploy, and never an
  object the deployment did not write; deploy leaves a pre-existing bucket's settings alone;
- deployments sharing a bucket have disjoint prefixes, and gc of one never touches another's;
- gc keeps every executor whose heartbeat is fresh, however old, and removes the queue and
  objects of one whose heartbeat stopped;
- the worker role cannot delete objects, and gets exactly the KMS grant a customer key needs.
"""

from __future__ import annotations

import json
import time
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from lambdafutures.backends.aws.heartbeat import (
    HEARTBEAT_TAG,
    QueueHeartbeat,
    is_alive,
    last_beat,
)
from lambdafutures.config import load_deployment
from lambdafutures.deploy.aws import Aws
from lambdafutures.deploy.cli import main
from lambdafutures.deploy.gc import DEFAULT_STALE_AFTER_S, collect
from lambdafutures.deploy.spec import Deployment, Settings
from lambdafutures.deploy.stack import deployment_from_config

ACCOUNT = "123456789012"
REGION = "us-east-1"
LAMBDA_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
    "Action": "sts:AssumeRole"}]}


@pytest.fixture
def clients(moto_server):
    session = boto3.Session(region_name=REGION)
    return {service: session.client(service) for service in ("s3", "sqs", "iam", "kms")}


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.splitlines() + captured.err.splitlines()


def keys(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def policy_document(iam, name: str) -> dict:
    document = iam.get_role_policy(RoleName=f"{name}-worker",
                                   PolicyName=f"{name}-worker")["PolicyDocument"]
    return json.loads(document) if isinstance(document, str) else document


def dead_executor(sqs, s3, config: dict, beat_age_s: float = 3600) -> tuple[str, list[str]]:
    """A queue whose heartbeat stopped `beat_age_s` ago, with two objects; (url, keys)."""
    executor_id = uuid.uuid4().hex[:16]
    url = sqs.create_queue(QueueName=f"{config['queue_prefix']}{executor_id}",
                           tags={HEARTBEAT_TAG: str(int(time.time() - beat_age_s))})["QueueUrl"]
    written = [f"{config['prefix']}/{executor_id}/payload", f"{config['prefix']}/{executor_id}/r/0"]
    for key in written:
        s3.put_object(Bucket=config["bucket"], Key=key, Body=b"x")
    return url, written


def queue_exists(sqs, url: str) -> bool:
    try:
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return True
    except ClientError:
        return False


# -- pure -----------------------------------------------------------------------------------

def test_the_worker_role_cannot_delete_objects_and_kms_is_granted_per_key():
    deployment = Deployment(Settings(name="lab", region=REGION), account_id=ACCOUNT)
    plain = deployment.worker_policy()
    actions = [a for s in plain["Statement"] for a in s["Action"]]
    assert "s3:DeleteObject" not in actions and not any("kms:" in a for a in actions)
    [objects] = [s for s in plain["Statement"] if s["Sid"] == "TaskObjects"]
    assert objects["Resource"] == [f"arn:aws:s3:::lab-{ACCOUNT}-{REGION}/tasks/lab/*"]

    key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    [kms] = [s for s in deployment.worker_policy((key,))["Statement"] if s["Sid"] == "Kms"]
    assert kms["Action"] == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert kms["Resource"] == [key]
    assert kms["Condition"] == {"StringEquals": {"kms:ViaService": [
        f"s3.{REGION}.amazonaws.com", f"sqs.{REGION}.amazonaws.com"]}}


def test_prefixes_of_different_deployments_never_overlap():
    from lambdafutures.deploy.bucket import overlaps

    a, b = (Deployment(Settings(name=n, bucket="shared"), account_id=ACCOUNT)
            for n in ("lab", "lab2"))
    assert (a.prefix, b.prefix) == ("tasks/lab", "tasks/lab2")
    assert not overlaps(a.prefix, b.prefix)
    assert overlaps("tasks", a.prefix) and overlaps(a.prefix, a.prefix)


def test_heartbeat_liveness_rule():
    now = 1_000_000.0
    assert is_alive({HEARTBEAT_TAG: str(int(now - 30))}, now, 600)
    assert not is_alive({HEARTBEAT_TAG: str(int(now - 601))}, now, 600)
    assert not is_alive({}, now, 600) and last_beat({}) is None
    assert last_beat({HEARTBEAT_TAG: "garbage"}) is None
    assert DEFAULT_STALE_AFTER_S >= 5 * 60  # several missed beats of a minute each


# -- the heartbeat --------------------------------------------------------------------------

def test_heartbeat_tags_the_queue_stops_promptly_and_survives_failures(moto_server, clients):
    sqs = clients["sqs"]
    url = sqs.create_queue(QueueName=f"hb-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    heartbeat = QueueHeartbeat(sqs, url, interval_s=3600).start()
    deadline = time.monotonic() + 10
    while heartbeat.beats == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    tags = sqs.list_queue_tags(QueueUrl=url)["Tags"]
    assert is_alive(tags, time.time(), 60)
    started = time.monotonic()
    heartbeat.stop()   # the thread is waiting out an hour-long interval
    assert time.monotonic() - started < 1.0
    assert not heartbeat._thread.is_alive()

    # A queue that is gone: the beat fails quietly and the thread keeps trying.
    sqs.delete_queue(QueueUrl=url)
    failing = QueueHeartbeat(sqs, url, interval_s=0.05).start()
    time.sleep(0.3)
    assert failing.beats == 0 and failing._thread.is_alive()
    failing.stop()
    assert not failing._thread.is_alive()


# -- destroy and deploy against pre-existing resources --------------------------------------

def test_pre_existing_bucket_queue_and_role_survive_destroy_untouched(
        moto_server, config_file, clients, name, capsys):
    s3, sqs, iam, kms = (clients[s] for s in ("s3", "sqs", "iam", "kms"))
    bucket = f"{name}-lab-data"
    s3.create_bucket(Bucket=bucket)
    bucket_key = kms.create_key(Description="the lab's bucket key")["KeyMetadata"]
    queue_key = kms.create_key(Description="the lab's queue key")["KeyMetadata"]
    theirs = {
        "public": {"BlockPublicAcls": False, "IgnorePublicAcls": False,
                   "BlockPublicPolicy": True, "RestrictPublicBuckets": False},
        "encryption": {"Rules": [{"ApplyServerSideEncryptionByDefault": {
            "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": bucket_key["KeyId"]}}]},
        "tags": [{"Key": "owner", "Value": "lab"}],
        "rule": {"ID": "lab-archive", "Filter": {"Prefix": "raw/"}, "Status": "Enabled",
                 "Expiration": {"Days": 30}},
    }
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=theirs["public"])
    s3.put_bucket_encryption(Bucket=bucket,
                             ServerSideEncryptionConfiguration=theirs["encryption"])
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": theirs["tags"]})
    s3.put_bucket_lifecycle_configuration(Bucket=bucket,
                                          LifecycleConfiguration={"Rules": [theirs["rule"]]})
    foreign = ["raw/run1.csv", "tasks/notes.txt", f"tasks/{name}x/other"]
    for key in foreign:
        s3.put_object(Bucket=bucket, Key=key, Body=b"the lab's")
    queue_url = sqs.create_queue(QueueName=f"{name}-failures", Attributes={
        "MessageRetentionPeriod": "345600", "KmsMasterKeyId": queue_key["Arn"]})["QueueUrl"]
    iam.create_role(RoleName=f"{name}-worker", AssumeRolePolicyDocument=json.dumps(LAMBDA_TRUST))

    def settings() -> dict:
        return {
            "public": s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"],
            "encryption": s3.get_bucket_encryption(
                Bucket=bucket)["ServerSideEncryptionConfiguration"],
            "tags": s3.get_bucket_tagging(Bucket=bucket)["TagSet"],
            "queue": sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
                "MessageRetentionPeriod", "KmsMasterKeyId"])["Attributes"],
        }

    before = settings()
    code, lines = run(capsys, "deploy", "--name", name, "--bucket", bucket, "--no-layer")
    assert code == 0, lines
    text = "\n".join(lines)
    assert "pre-existing bucket" in text and "pre-existing queue" in text
    assert "pre-existing role" in text
    config = load_deployment()
    assert config["owned"] == {"bucket": False, "failure_queue": False, "role": False}
    assert config["prefix"] == f"tasks/{name}"
    assert settings() == before   # access block, encryption, tags, queue retention and key
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert sorted(r["ID"] for r in rules) == sorted(["lab-archive", f"{name}-expire-tasks"])
    [ours] = [r for r in rules if r["ID"] == f"{name}-expire-tasks"]
    assert ours["Filter"] == {"Prefix": f"tasks/{name}/"}

    # The role may use both customer keys, through S3 and SQS only; it may not delete.
    statements = {s["Sid"]: s for s in policy_document(iam, name)["Statement"]}
    assert sorted(statements["Kms"]["Resource"]) == sorted([bucket_key["Arn"], queue_key["Arn"]])
    assert "s3:DeleteObject" not in json.dumps(statements)
    assert run(capsys, "status")[0] == 0

    # gc takes only a dead executor's folder; destroy takes the rest of our prefix.
    url, written = dead_executor(sqs, s3, config)
    s3.put_object(Bucket=bucket, Key=f"tasks/{name}/stray.txt", Body=b"ours, not an executor's")
    code, lines = run(capsys, "gc")
    assert code == 0 and "deleted 1 executor queue(s) and 2 task object(s)" in lines[-1], lines
    assert not queue_exists(sqs, url)
    assert keys(s3, bucket) == sorted([*foreign, f"tasks/{name}/stray.txt",
                                       f"tasks/.deployments/{name}.json"])

    code, lines = run(capsys, "destroy", "--yes")
    assert code == 0, lines
    kept = [line for line in lines if " kept " in line]
    assert len(kept) == 3, lines   # bucket, failure queue, role
    assert keys(s3, bucket) == sorted(foreign)
    assert settings() == before
    assert s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"] == [theirs["rule"]]
    assert iam.get_role(RoleName=f"{name}-worker")["Role"]["RoleName"] == f"{name}-worker"
    assert iam.list_role_policies(RoleName=f"{name}-worker")["PolicyNames"] == []
    assert queue_exists(sqs, queue_url)


def test_a_pre_existing_role_lambda_cannot_assume_is_refused_not_rewritten(
        moto_server, config_file, clients, name, capsys):
    iam = clients["iam"]
    other_trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
        "Action": "sts:AssumeRole"}]}
    iam.create_role(RoleName=f"{name}-worker", AssumeRolePolicyDocument=json.dumps(other_trust))
    code, lines = run(capsys, "deploy", "--name", name, "--no-layer")
    assert code == 2 and "not created by deployment" in "\n".join(lines), lines
    document = iam.get_role(RoleName=f"{name}-worker")["Role"]["AssumeRolePolicyDocument"]
    document = json.loads(document) if isinstance(document, str) else document
    assert document["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert run(capsys, "destroy", "--yes", "--name", name)[0] == 0
    assert iam.get_role(RoleName=f"{name}-worker")  # still there


def test_failure_retention_is_short_and_configurable(moto_server, config_file, clients, name,
                                                     capsys):
    sqs = clients["sqs"]
    code, lines = run(capsys, "deploy", "--name", name, "--no-layer",
                      "--failure-retention", "900")
    assert code == 0, lines
    config = load_deployment()
    retention = sqs.get_queue_attributes(QueueUrl=config["failure_queue_url"],
                                         AttributeNames=["MessageRetentionPeriod"])
    assert retention["Attributes"]["MessageRetentionPeriod"] == "900"
    assert config["failure_retention"] == 900
    code, lines = run(capsys, "deploy")   # kept without the flag
    assert code == 0 and "MessageRetentionPeriod" not in "\n".join(lines), lines
    assert run(capsys, "destroy", "--yes")[0] == 0


# -- deployments sharing a bucket -----------------------------------------------------------

def test_two_deployments_in_one_bucket_never_touch_each_other(
        moto_server, config_file, clients, name, capsys):
    s3, sqs = clients["s3"], clients["sqs"]
    first, second = f"{name}a", f"{name}b"
    assert run(capsys, "deploy", "--name", first, "--no-layer")[0] == 0
    a = load_deployment()
    assert a["owned"]["bucket"] is True
    assert run(capsys, "deploy", "--name", second, "--bucket", a["bucket"], "--no-layer")[0] == 0
    b = load_deployment()
    assert b["bucket"] == a["bucket"] and b["owned"]["bucket"] is False
    assert a["prefix"] != b["prefix"]

    a_url, a_keys = dead_executor(sqs, s3, a)
    b_url, b_keys = dead_executor(sqs, s3, b)
    aws = Aws(region=REGION)
    collected = collect(aws, deployment_from_config(aws, a), 3600, now=time.time() + 7200)
    assert (collected.queues, collected.objects) == ([a_url], 2)
    assert not queue_exists(sqs, a_url) and queue_exists(sqs, b_url)
    remaining = keys(s3, a["bucket"])
    assert set(b_keys) <= set(remaining) and not set(a_keys) & set(remaining)

    # destroy of the bucket's creator keeps the bucket: it holds the other deployment.
    code, lines = run(capsys, "destroy", "--yes", "--name", first)
    assert code == 0 and any(line.startswith("  bucket ") and " kept " in line
                             for line in lines), lines
    assert set(b_keys) <= set(keys(s3, a["bucket"]))
    code, lines = run(capsys, "status")   # the config names the second deployment
    assert code == 0, lines

    # A record whose prefix contains ours (a hand-edited root, another account with the
    # same layout) makes deploy refuse.
    s3.put_object(Bucket=a["bucket"], Key="tasks/.deployments/legacy.json", Body=json.dumps(
        {"name": "legacy", "account_id": "210987654321", "region": REGION, "prefix": "tasks"}))
    code, lines = run(capsys, "deploy")
    assert code == 2 and "overlaps deployment 'legacy'" in "\n".join(lines), lines
    s3.delete_object(Bucket=a["bucket"], Key="tasks/.deployments/legacy.json")
    assert run(capsys, "destroy", "--yes")[0] == 0
    # Neither deployment is left in the bucket; it stays (the second did not create it).
    assert keys(s3, a["bucket"]) == []
    s3.delete_bucket(Bucket=a["bucket"])


# -- a live executor ------------------------------------------------------------------------

def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_gc_leaves_a_live_executor_alone_and_collects_a_stopped_one(aws_stack, capsys):
    from lambdafutures import LambdaExecutor

    sqs, s3 = boto3.client("sqs"), boto3.client("s3")
    config = aws_stack.config

    def queues() -> set[str]:
        return set(sqs.list_queues(QueueNamePrefix=config["queue_prefix"]).get("QueueUrls", []))

    earlier = queues()
    with LambdaExecutor(max_workers=2, backend="aws") as executor:
        # A large argument goes through the object store: the executor has objects.
        assert executor.submit(len, b"x" * 2_000_000).result(timeout=60) == 2_000_000
        [live] = queues() - earlier
        _wait_for(lambda: HEARTBEAT_TAG in sqs.list_queue_tags(QueueUrl=live).get("Tags", {}))
        dead_url, dead_keys = dead_executor(sqs, s3, config)
        before = set(keys(s3, config["bucket"]))
        assert any(key.startswith(f"{config['prefix']}/") for key in before - set(dead_keys))

        code, lines = run(capsys, "gc", "--older-than", "0")   # a tiny age threshold
        assert code == 0, lines
        assert queue_exists(sqs, live)
        assert not queue_exists(sqs, dead_url)
        assert set(keys(s3, config["bucket"])) == before - set(dead_keys)
        # The executor is untouched and keeps working.
        assert executor.submit(len, b"y" * 2_000_000).result(timeout=60) == 2_000_000
