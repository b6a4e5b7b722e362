"""`lambdafutures deploy | status | destroy | gc` against a moto server.

Every test uses its own deployment name, so tests can share the session's moto server and
run in parallel. The CLI runs in-process through `main([...])`, and once as the installed
console script in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import boto3
import pytest
import tenacity
from botocore.exceptions import ClientError

from lambdafutures.config import load_deployment
from lambdafutures.deploy import aws as aws_module
from lambdafutures.deploy import layer as layer_module
from lambdafutures.deploy.aws import Aws, retry_iam_propagation
from lambdafutures.deploy.cli import main
from lambdafutures.deploy.gc import collect
from lambdafutures.deploy.package import HANDLER, build_function_zip, code_sha256
from lambdafutures.deploy.spec import Deployment, Settings, check_name

PYTHON = "%d.%d" % sys.version_info[:2]
ACCOUNT = "123456789012"
REGION = "us-east-1"
READ_ONLY = ("Get", "List", "Head", "Describe")


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture
def clients(moto_server):
    session = boto3.Session(region_name=REGION)
    return {service: session.client(service)
            for service in ("s3", "sqs", "iam", "lambda", "logs")}


@pytest.fixture
def layer_zip(tmp_path) -> Path:
    """A tiny prebuilt layer, so that only the network test downloads anything."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("python/tinydep.py", "VALUE = 42\n")
    path = tmp_path / "layer.zip"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def api_calls(monkeypatch) -> list[str]:
    """The AWS operations the CLI makes (e.g. 'lambda.UpdateFunctionCode')."""
    calls: list[str] = []
    original = Aws.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)

        def record(model, **_):
            calls.append(f"{model.service_model.service_name}.{model.name}")

        self.session.events.register("before-call", record)

    monkeypatch.setattr(Aws, "__init__", init)
    return calls


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    """main(argv) in-process: (exit code, printed lines)."""
    code = main(list(argv))
    return code, capsys.readouterr().out.splitlines()


def statuses(lines: list[str]) -> dict[str, str]:
    """{kind: status word} from deploy's per-resource lines."""
    found = {}
    for line in lines:
        for kind in ("bucket", "queue", "log group", "role policy", "role", "layer",
                     "function", "async config"):
            if line.startswith(f"  {kind} "):
                found[kind] = line[len(kind) + 3:].split()[1]
                break
    return found


def snapshot(clients, name: str) -> dict:
    """Everything a deploy may touch, as the services report it."""
    lam, s3, iam, sqs, logs = (clients[s] for s in ("lambda", "s3", "iam", "sqs", "logs"))
    bucket = f"{name}-{ACCOUNT}-{REGION}"

    def clean(response: dict) -> dict:
        response.pop("ResponseMetadata", None)
        return response

    function = clean(lam.get_function(FunctionName=name))
    function.pop("Code", None)  # moto's presigned code URL differs per call
    return {
        "function": function,
        "async": clean(lam.get_function_event_invoke_config(FunctionName=name)),
        "layers": clean(lam.list_layer_versions(LayerName=f"{name}-deps")),
        "role": clean(iam.get_role(RoleName=f"{name}-worker")),
        "policy": clean(iam.get_role_policy(RoleName=f"{name}-worker",
                                            PolicyName=f"{name}-worker")),
        "public": clean(s3.get_public_access_block(Bucket=bucket)),
        "encryption": clean(s3.get_bucket_encryption(Bucket=bucket)),
        "lifecycle": clean(s3.get_bucket_lifecycle_configuration(Bucket=bucket)),
        "queue": clean(sqs.get_queue_attributes(
            QueueUrl=sqs.get_queue_url(QueueName=f"{name}-failures")["QueueUrl"],
            AttributeNames=["All"])),
        "logs": clean(logs.describe_log_groups(logGroupNamePrefix=f"/aws/lambda/{name}")),
    }


def assert_nothing_left(clients, name: str) -> None:
    lam, s3, iam, sqs, logs = (clients[s] for s in ("lambda", "s3", "iam", "sqs", "logs"))
    with pytest.raises(ClientError, match="404|Not Found"):
        s3.head_bucket(Bucket=f"{name}-{ACCOUNT}-{REGION}")
    assert sqs.list_queues(QueueNamePrefix=name).get("QueueUrls", []) == []
    with pytest.raises(ClientError, match="NoSuchEntity"):
        iam.get_role(RoleName=f"{name}-worker")
    with pytest.raises(ClientError, match="ResourceNotFound"):
        lam.get_function(FunctionName=name)
    assert lam.list_layer_versions(LayerName=f"{name}-deps")["LayerVersions"] == []
    assert logs.describe_log_groups(logGroupNamePrefix=f"/aws/lambda/{name}")["logGroups"] == []


# -- pure parts -----------------------------------------------------------------------------

def test_worker_policy_is_least_privilege():
    deployment = Deployment(Settings(name="lambdafutures", region=REGION), account_id=ACCOUNT)
    assert deployment.worker_policy() == {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "TaskObjects", "Effect": "Allow",
             "Action": ["s3:GetObject"],
             "Resource": [
                 "arn:aws:s3:::lambdafutures-123456789012-us-east-1/tasks/lambdafutures/*"]},
            {"Sid": "Results", "Effect": "Allow",
             "Action": ["s3:PutObject"],
             "Resource": [
                 "arn:aws:s3:::lambdafutures-123456789012-us-east-1/tasks/lambdafutures/*/result"
             ]},
            {"Sid": "Queues", "Effect": "Allow", "Action": ["sqs:SendMessage"],
             "Resource": ["arn:aws:sqs:us-east-1:123456789012:lambdafutures-x-*",
                          "arn:aws:sqs:us-east-1:123456789012:lambdafutures-failures"]},
            {"Sid": "Logs", "Effect": "Allow",
             "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
             "Resource": [
                 "arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/lambdafutures",
                 "arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/lambdafutures:*"]},
        ],
    }


@pytest.mark.parametrize("bad", ["", "Upper", "under_score", "-lead", "trail-", "a-x-b",
                                 "ends-x", "a" * 33])
def test_deployment_names_are_checked(bad):
    with pytest.raises(ValueError):
        check_name(bad)


def test_function_zip_is_reproducible_and_complete():
    import cloudpickle

    first, second = build_function_zip(), build_function_zip()
    assert first == second and code_sha256(first) == code_sha256(second)
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert "lambdafutures_handler/worker.py" in names
    assert "lambdafutures_handler/protocol.py" in names
    assert "cloudpickle/__init__.py" in names
    assert all(n.endswith(".py") and "__pycache__" not in n for n in names)
    # The worker's cloudpickle is this host's, byte for byte.
    shipped = zipfile.ZipFile(io.BytesIO(first)).read("cloudpickle/cloudpickle.py")
    assert shipped == (Path(cloudpickle.__path__[0]) / "cloudpickle.py").read_bytes()


def test_function_zip_imports_on_its_own(tmp_path):
    """The zip is all the worker needs besides the standard library (and boto3, which the
    Lambda runtime provides and the worker imports only when it talks to AWS)."""
    zipfile.ZipFile(io.BytesIO(build_function_zip())).extractall(tmp_path)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "import lambdafutures_handler.worker as w, cloudpickle; "
             "print(w.__file__); print(cloudpickle.__file__)")
    # -S -I: no site-packages, no environment; only the extracted zip and the stdlib.
    done = subprocess.run([sys.executable, "-S", "-I", "-c", probe, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(line.startswith(str(tmp_path)) for line in done.stdout.splitlines())


def _client_error(code: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "CreateFunction")


def test_iam_propagation_delay_is_retried_then_succeeds():
    attempts, waits = [], []

    def create():
        attempts.append(1)
        if len(attempts) < 3:
            raise _client_error("InvalidParameterValueException",
                                "The role defined for the function cannot be assumed by Lambda.")
        return "created"

    fast = aws_module.IAM_PROPAGATION.copy(wait=tenacity.wait_none())
    assert retry_iam_propagation(create, waits.append, policy=fast) == "created"
    assert len(attempts) == 3 and len(waits) == 2


def test_other_errors_are_not_retried_and_the_retry_is_bounded():
    attempts = []

    def create():
        attempts.append(1)
        raise _client_error("InvalidParameterValueException", "Unsupported runtime")

    with pytest.raises(ClientError, match="Unsupported runtime"):
        retry_iam_propagation(create)
    assert len(attempts) == 1

    def never_ready():
        raise _client_error("InvalidParameterValueException",
                            "The provided execution role does not have permissions to call "
                            "SendMessage on SQS")

    bounded = aws_module.IAM_PROPAGATION.copy(wait=tenacity.wait_none(),
                                              stop=tenacity.stop_after_attempt(4))
    with pytest.raises(ClientError, match="SendMessage"):
        retry_iam_propagation(never_ready, policy=bounded)
    # The declared policy gives up: a delay bound, not an attempt count.
    assert aws_module.IAM_PROPAGATION.stop.max_delay == 120


# -- against moto ---------------------------------------------------------------------------

def test_deploy_creates_everything_twice_changes_nothing_destroy_removes_all(
        moto_server, config_file, clients, name, layer_zip, capsys, api_calls):
    code, lines = run(capsys, "deploy", "--name", name, "--layer-zip", str(layer_zip),
                      "--memory", "1024", "--timeout", "120", "--reserved-concurrency", "5")
    assert code == 0, lines
    assert set(statuses(lines).values()) == {"created"}, lines
    assert len(statuses(lines)) == 8

    lam, s3, iam, sqs, logs = (clients[s] for s in ("lambda", "s3", "iam", "sqs", "logs"))
    bucket = f"{name}-{ACCOUNT}-{REGION}"
    config = load_deployment()
    failure_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}-failures"

    # The config file LambdaExecutor() reads.
    assert {k: config[k] for k in ("backend", "name", "region", "account_id", "bucket",
                                   "prefix", "function_name", "queue_prefix",
                                   "failure_queue_arn", "timeout", "memory_mb",
                                   "architecture", "python", "profile")} == {
        "backend": "aws", "name": name, "region": REGION, "account_id": ACCOUNT,
        "bucket": bucket, "prefix": f"tasks/{name}", "function_name": name,
        "queue_prefix": f"{name}-x-", "failure_queue_arn": failure_arn, "timeout": 120,
        "memory_mb": 1024, "architecture": "arm64", "python": PYTHON, "profile": None}
    import cloudpickle
    assert config["cloudpickle"] == cloudpickle.__version__
    assert config["failure_queue_url"] == sqs.get_queue_url(
        QueueName=f"{name}-failures")["QueueUrl"]

    # Bucket: private, encrypted, task objects expire.
    assert s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True}
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    assert rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    [rule] = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["Filter"] == {"Prefix": f"tasks/{name}/"} and rule["Status"] == "Enabled"
    assert rule["Expiration"] == {"Days": 1}

    # Queue: encrypted.
    attributes = sqs.get_queue_attributes(QueueUrl=config["failure_queue_url"],
                                          AttributeNames=["All"])["Attributes"]
    assert attributes["SqsManagedSseEnabled"] == "true"
    assert attributes["QueueArn"] == failure_arn
    assert attributes["MessageRetentionPeriod"] == "3600"  # records hold users' arguments
    assert config["owned"] == {"bucket": True, "failure_queue": True, "role": True}

    # Role: only Lambda assumes it; the inline policy is exactly the least-privilege one.
    role = iam.get_role(RoleName=f"{name}-worker")["Role"]
    assert config["role_arn"] == role["Arn"]
    [trust] = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "lambda.amazonaws.com"}
    assert trust["Action"] == "sts:AssumeRole"
    assert iam.list_attached_role_policies(RoleName=f"{name}-worker")["AttachedPolicies"] == []
    assert iam.list_role_policies(RoleName=f"{name}-worker")["PolicyNames"] == [f"{name}-worker"]
    document = iam.get_role_policy(RoleName=f"{name}-worker",
                                   PolicyName=f"{name}-worker")["PolicyDocument"]
    if isinstance(document, str):
        document = json.loads(document)
    statements = {s["Sid"]: s for s in document["Statement"]}
    assert set(statements) == {"TaskObjects", "Results", "Queues", "Logs"}
    assert all(s["Effect"] == "Allow" for s in statements.values())
    assert statements["TaskObjects"]["Action"] == ["s3:GetObject"]
    assert statements["TaskObjects"]["Resource"] == [f"arn:aws:s3:::{bucket}/tasks/{name}/*"]
    assert statements["Results"]["Action"] == ["s3:PutObject"]
    assert statements["Results"]["Resource"] == [
        f"arn:aws:s3:::{bucket}/tasks/{name}/*/result"]
    assert statements["Queues"]["Action"] == ["sqs:SendMessage"]
    assert sorted(statements["Queues"]["Resource"]) == sorted([
        f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}-x-*", failure_arn])
    group = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/lambda/{name}"
    assert sorted(statements["Logs"]["Resource"]) == [group, f"{group}:*"]
    assert sorted(statements["Logs"]["Action"]) == [
        "logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"]
    no_wildcard_actions = [a for s in statements.values() for a in s["Action"]]
    assert not any("*" in a for a in no_wildcard_actions)

    # Layer: the prebuilt zip, published once, for this runtime and architecture.
    [version] = lam.list_layer_versions(LayerName=f"{name}-deps")["LayerVersions"]
    assert config["layer_arn"] == version["LayerVersionArn"]
    assert version["CompatibleRuntimes"] == [f"python{PYTHON}"]
    assert version["CompatibleArchitectures"] == ["arm64"]
    assert layer_module.described_digest(version["Description"]) == \
        layer_module.from_zip(layer_zip.read_bytes()).digest

    # Function: runtime of this host, our handler, role, layer, settings, code.
    function = lam.get_function(FunctionName=name)
    settings = function["Configuration"]
    assert settings["Runtime"] == f"python{PYTHON}"
    assert settings["Handler"] == HANDLER == "lambdafutures_handler.worker.handle"
    assert settings["Role"] == role["Arn"]
    assert settings["Architectures"] == ["arm64"]
    assert settings["MemorySize"] == 1024 and settings["Timeout"] == 120
    assert [layer["Arn"] for layer in settings["Layers"]] == [config["layer_arn"]]
    assert settings["CodeSha256"] == code_sha256(build_function_zip())
    assert function["Concurrency"]["ReservedConcurrentExecutions"] == 5
    assert config["function_arn"] == settings["FunctionArn"]

    # Async invokes: Lambda never retries; failures go to our queue.
    invoke_config = lam.get_function_event_invoke_config(FunctionName=name)
    assert invoke_config["MaximumRetryAttempts"] == 0
    assert invoke_config["MaximumEventAgeInSeconds"] == 21600
    assert invoke_config["DestinationConfig"]["OnFailure"]["Destination"] == failure_arn

    [log_group] = logs.describe_log_groups(
        logGroupNamePrefix=f"/aws/lambda/{name}")["logGroups"]
    assert log_group["retentionInDays"] == 14

    # A second run, with no flags at all: the config carries the settings; nothing changes.
    before = snapshot(clients, name)
    assert {"s3.CreateBucket", "iam.PutRolePolicy", "lambda.CreateFunction",
            "lambda.PutFunctionEventInvokeConfig"} <= set(api_calls)  # the recorder works
    api_calls.clear()
    code, lines = run(capsys, "deploy")
    assert code == 0, lines
    assert statuses(lines) == {kind: "unchanged" for kind in statuses(lines)}, lines
    assert len(statuses(lines)) == 8
    writes = [call for call in api_calls if not call.split(".")[1].startswith(READ_ONLY)]
    assert writes == [], writes
    assert snapshot(clients, name) == before
    assert load_deployment() == config

    code, lines = run(capsys, "status")
    assert code == 0 and lines[-1] == "all good", lines

    code, lines = run(capsys, "destroy", "--yes")
    assert code == 0, lines
    assert not config_file.exists()
    assert_nothing_left(clients, name)


def test_update_changes_only_what_differs(moto_server, config_file, clients, name, capsys):
    code, lines = run(capsys, "deploy", "--name", name, "--no-layer")
    assert code == 0 and statuses(lines)["layer"] == "none", lines
    before = snapshot(clients, name)

    code, lines = run(capsys, "deploy", "--memory", "512", "--log-retention-days", "30")
    assert code == 0, lines
    found = statuses(lines)
    assert found.pop("function") == "updated" and found.pop("log group") == "updated"
    assert set(found.values()) == {"unchanged", "none"}, lines
    assert "MemorySize: 2048 -> 512" in "\n".join(lines)
    after = snapshot(clients, name)
    assert after["function"]["Configuration"]["MemorySize"] == 512
    assert after["logs"]["logGroups"][0]["retentionInDays"] == 30
    # Only those two changed: the snapshot is sensitive, and precise.
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {"function", "logs"}, changed
    assert load_deployment()["memory_mb"] == 512

    # Drift made behind deploy's back shows in status, and deploy repairs it.
    lam, s3 = clients["lambda"], clients["s3"]
    lam.update_function_configuration(FunctionName=name, Timeout=3)
    s3.delete_bucket_lifecycle(Bucket=f"{name}-{ACCOUNT}-{REGION}")
    code, lines = run(capsys, "status")
    assert code == 1, lines
    text = "\n".join(lines)
    assert "DIFFERS (Timeout: 3 -> 900)" in text and "DIFFERS (lifecycle rule)" in text
    code, lines = run(capsys, "deploy")
    assert code == 0 and statuses(lines)["function"] == "updated"
    assert statuses(lines)["bucket"] == "updated", lines
    assert run(capsys, "status")[0] == 0

    # Reserved concurrency is set, then removed again.
    code, lines = run(capsys, "deploy", "--reserved-concurrency", "3")
    assert code == 0 and statuses(lines)["function"] == "updated", lines
    assert lam.get_function(FunctionName=name)["Concurrency"] == {
        "ReservedConcurrentExecutions": 3}
    code, lines = run(capsys, "deploy", "--reserved-concurrency", "none")
    assert code == 0 and statuses(lines)["function"] == "updated", lines
    assert "Concurrency" not in lam.get_function(FunctionName=name)

    # Without its config file, a deployment can still be destroyed by name.
    config_file.unlink()
    code, lines = run(capsys, "destroy", "--yes", "--name", name)
    assert code == 0, lines
    assert_nothing_left(clients, name)


def test_status_without_deployment_and_destroy_without_yes(moto_server, config_file, name,
                                                           capsys, monkeypatch):
    code, lines = run(capsys, "status", "--name", name)
    assert code == 1 and "MISSING" in "\n".join(lines)
    assert main(["status"]) == 2  # no config, no name
    assert "no deployment config" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["destroy", "--name", name]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["deploy", "--name", "Not_Valid", "--no-layer"]) == 2
    assert "deployment name" in capsys.readouterr().err


def test_gc_removes_only_old_executor_leftovers(moto_server, config_file, clients, name,
                                                capsys):
    assert run(capsys, "deploy", "--name", name, "--no-layer")[0] == 0
    config = load_deployment()
    sqs, s3 = clients["sqs"], clients["s3"]
    prefix, dead1, dead2 = config["prefix"], "d1" * 8, "d2" * 8
    # Executors from before heartbeats: their queues carry no heartbeat tag.
    for executor in (dead1, dead2):
        sqs.create_queue(QueueName=f"{config['queue_prefix']}{executor}")
    bucket = config["bucket"]
    for key in (f"{prefix}/{dead1}/p1", f"{prefix}/{dead1}/r1", f"{prefix}/{dead2}/p1"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    not_executors = ["elsewhere/keep", f"{prefix}/notes.txt", f"{prefix}/notes/a.txt"]
    for key in not_executors:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")

    aws = Aws(region=REGION)
    from lambdafutures.deploy.stack import deployment_from_config
    deployment = deployment_from_config(aws, config)
    # Nothing is an hour old yet: all kept.
    kept = collect(aws, deployment, 3600)
    assert (kept.queues, kept.objects, kept.queues_kept, kept.objects_kept) == ([], 0, 2, 3)
    # Two hours from now, they are; a dry run only counts them.
    later = time.time() + 7200
    dry = collect(aws, deployment, 3600, now=later, dry_run=True)
    assert (len(dry.queues), dry.objects) == (2, 3)
    assert len(sqs.list_queues(QueueNamePrefix=config["queue_prefix"])["QueueUrls"]) == 2
    gone = collect(aws, deployment, 3600, now=later)
    assert (len(gone.queues), gone.objects) == (2, 3)
    assert sqs.list_queues(QueueNamePrefix=config["queue_prefix"]).get("QueueUrls", []) == []
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(keys) == sorted([*not_executors, f"tasks/.deployments/{name}.json"])
    # The failure queue is not a leftover.
    assert sqs.get_queue_url(QueueName=f"{name}-failures")

    # A queue made a moment ago has not beaten yet: even --older-than 0 keeps it. Once its
    # heartbeat is an hour old, gc takes it.
    dead3 = sqs.create_queue(QueueName=f"{config['queue_prefix']}{'d3' * 8}")["QueueUrl"]
    code, lines = run(capsys, "gc", "--older-than", "0")
    assert code == 0 and "deleted 0 executor queue(s)" in lines[-1], lines
    sqs.tag_queue(QueueUrl=dead3,
                  Tags={"lambdafutures:heartbeat": str(int(time.time()) - 3600)})
    code, lines = run(capsys, "gc")
    assert code == 0 and "deleted 1 executor queue(s) and 0 task object(s)" in lines[-1]

    # destroy also takes leftover executor queues and everything under its prefix, but keeps
    # the bucket while it holds an object the deployment did not write.
    sqs.create_queue(QueueName=f"{config['queue_prefix']}dead4")
    code, lines = run(capsys, "destroy", "--yes")
    assert code == 0 and any("deleted 1" in line for line in lines), lines
    assert any(line.startswith("  bucket ") and " kept " in line for line in lines), lines
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["elsewhere/keep"]
    s3.delete_object(Bucket=bucket, Key="elsewhere/keep")
    assert run(capsys, "destroy", "--yes", "--name", name)[0] == 0
    assert_nothing_left(clients, name)


def test_large_layer_goes_through_s3(moto_server, config_file, clients, name, layer_zip,
                                     capsys, monkeypatch):
    from lambdafutures.deploy import functions

    monkeypatch.setattr(functions, "DIRECT_UPLOAD_LIMIT", 0)  # every zip counts as large
    code, lines = run(capsys, "deploy", "--name", name, "--layer-zip", str(layer_zip))
    assert code == 0 and statuses(lines)["layer"] == "created", lines
    config = load_deployment()
    layer_name, number = config["layer_arn"].split(":")[-2:]
    layer = clients["lambda"].get_layer_version(LayerName=layer_name, VersionNumber=int(number))
    assert layer["Content"]["CodeSize"] == len(layer_zip.read_bytes())
    # The staged copy is gone once Lambda has it.
    listed = clients["s3"].list_objects_v2(Bucket=config["bucket"]).get("Contents", [])
    assert [o["Key"] for o in listed] == [f"tasks/.deployments/{name}.json"]  # the record
    # A re-run without --layer-zip finds the recorded prebuilt layer again.
    code, lines = run(capsys, "deploy")
    assert code == 0 and statuses(lines)["layer"] == "unchanged", lines
    assert run(capsys, "destroy", "--yes")[0] == 0
    assert_nothing_left(clients, name)


def test_console_script_in_a_subprocess(moto_server, tmp_path, clients, name):
    script = Path(sys.executable).parent / "lambdafutures"
    assert script.exists(), "the console script is installed with the package"
    env = {**os.environ, "LAMBDAFUTURES_CONFIG": str(tmp_path / "config.json")}

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *argv], env=env, capture_output=True, text=True,
                              timeout=120)

    done = cli("deploy", "--name", name, "--no-layer", "--architecture", "x86_64")
    assert done.returncode == 0, done.stderr
    assert "function" in done.stdout and "created" in done.stdout
    assert clients["lambda"].get_function(
        FunctionName=name)["Configuration"]["Architectures"] == ["x86_64"]
    done = cli("status")
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "all good", done.stdout
    done = cli("destroy", "--yes")
    assert done.returncode == 0, done.stderr
    assert_nothing_left(clients, name)


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("LAMBDAFUTURES_OFFLINE") == "1",
                    reason="builds a layer from PyPI (LAMBDAFUTURES_OFFLINE=1)")
def test_layer_is_built_from_pypi_with_pip_for_lambda(moto_server, config_file, clients, name,
                                                      tmp_path, capsys, monkeypatch):
    built: list[bytes] = []
    real_build = layer_module.build_layer_zip

    def spy(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(layer_module, "build_layer_zip", spy)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("six\n")  # tiny, pure Python

    code, lines = run(capsys, "deploy", "--name", name, "--requirements", str(requirements))
    assert code == 0, lines
    assert statuses(lines)["layer"] == "created"
    [data] = built
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "python/six.py" in names
    assert any(n.startswith("python/six-") and n.endswith(".dist-info/METADATA") for n in names)

    config = load_deployment()
    assert config["layer_source"] == {"requirements": "six\n"}
    # (moto lacks GetLayerVersionByArn; the name and number say the same.)
    layer_name, number = config["layer_arn"].split(":")[-2:]
    layer = clients["lambda"].get_layer_version(LayerName=layer_name, VersionNumber=int(number))
    assert layer["Content"]["CodeSize"] == len(data)
    assert layer["CompatibleArchitectures"] == ["arm64"]
    function = clients["lambda"].get_function(FunctionName=name)["Configuration"]
    assert [entry["Arn"] for entry in function["Layers"]] == [config["layer_arn"]]

    # The re-run finds the layer by its digest and builds nothing.
    code, lines = run(capsys, "deploy")
    assert code == 0 and statuses(lines)["layer"] == "unchanged", lines
    assert len(built) == 1

    assert run(capsys, "destroy", "--yes")[0] == 0
    assert_nothing_left(clients, name)
