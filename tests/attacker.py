"""What an attacker can do against one deployment of the moto stack, for tests/test_security.py.

`Principal` holds only what a principal of the deployment has: SQS receive and send on the
deployment's queues (an executor's completion queue is found by its name, `queue_prefix` +
executor id), the worker role's S3 GetObject / PutObject under the deployment's prefix, and
InvokeFunction on the function. It never goes through lambdafutures' own host code.

Also here: the forged messages it sends (`forgeries`), and the search a task of its own
runs in a warm sandbox for what another executor left there (`search_sandbox`, shipped by
value like any function of this module).
"""

from __future__ import annotations

import base64
import json
import pickle
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import boto3

from lambdafutures.testing.records import failure_record
from lambdafutures_handler import protocol


class Principal:
    def __init__(self, config: dict[str, Any]) -> None:
        self.sqs = boto3.client("sqs")
        self.s3 = boto3.client("s3")
        self.lam = boto3.client("lambda")  # the stack's Lambda endpoint (AWS_ENDPOINT_URL_LAMBDA)
        self.bucket = config["bucket"]
        self.prefix = config.get("prefix", "tasks").strip("/")
        self.queue_prefix = config["queue_prefix"]
        self.failure_queue_url = config["failure_queue_url"]
        self.function_name = config["function_name"]
        self._made: list[str] = []

    # -- S3 -----------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)

    def exists(self, key: str) -> bool:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/{key}")
        return any(item["Key"] == f"{self.prefix}/{key}" for item in listed.get("Contents", ()))

    def key_of(self, executor_id: str) -> bytes:
        """The executor's signing key, where workers read it (`<prefix>/<id>/key`)."""
        return self.get(f"{executor_id}/key")

    # -- SQS ------------------------------------------------------------------------------------

    def queue_of(self, executor_id: str) -> str:
        return self.sqs.get_queue_url(QueueName=f"{self.queue_prefix}{executor_id}")["QueueUrl"]

    def new_queue(self) -> str:
        """A queue of the attacker's own (outside the deployment's queue prefix)."""
        url = self.sqs.create_queue(QueueName=f"lf-sec-{uuid.uuid4().hex[:12]}")["QueueUrl"]
        self._made.append(url)
        return url

    def send(self, url: str, body: str | dict | list) -> None:
        text = body if isinstance(body, str) else json.dumps(body)
        self.sqs.send_message(QueueUrl=url, MessageBody=text)

    def receive_until(self, url: str, enough: Callable[[list[dict]], bool],
                      timeout: float = 30.0) -> list[dict]:
        """Messages received from `url` (left in flight, not deleted) until `enough(all of
        them)` or `timeout`."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout
        while not enough(got) and time.monotonic() < deadline:
            got += self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                            WaitTimeSeconds=1,
                                            VisibilityTimeout=120).get("Messages", [])
        return got

    def release(self, url: str, messages: Iterable[dict]) -> None:
        """Make received messages visible again, for whoever reads the queue next."""
        for message in messages:
            self.sqs.change_message_visibility(QueueUrl=url, VisibilityTimeout=0,
                                               ReceiptHandle=message["ReceiptHandle"])

    def delete(self, url: str, messages: Iterable[dict]) -> None:
        for message in messages:
            self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    def is_empty(self, url: str) -> bool:
        """True if the queue holds no message (False once it is deleted)."""
        try:
            attributes = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
        except self.sqs.exceptions.QueueDoesNotExist:
            return False
        return not any(int(value) for value in attributes["Attributes"].values())

    def wait_until_empty(self, url: str, timeout: float = 30.0) -> bool:
        """True once nothing is left in the queue, visible or in flight: its reader took and
        deleted every message."""
        return wait_for(lambda: self.is_empty(url), timeout)

    # -- Lambda ---------------------------------------------------------------------------------

    def invoke_async(self, payload: bytes) -> None:
        self.lam.invoke(FunctionName=self.function_name, InvocationType="Event",
                        Payload=payload)

    def purge(self, url: str) -> None:
        """Empty a queue, in flight included (cleaning up after a test, not an attack)."""
        self.sqs.purge_queue(QueueUrl=url)

    def close(self) -> None:
        for url in self._made:
            self.sqs.delete_queue(QueueUrl=url)


def wait_for(condition: Callable[[], Any], timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


def record_event(message: dict) -> Any:
    """The invoke event inside a Lambda failure record (a received SQS message)."""
    try:
        return json.loads(message["Body"]).get("requestPayload")
    except (ValueError, AttributeError, RecursionError):  # not a record: poison, say
        return None


def records_about(messages: Iterable[dict], executor_id: str) -> list[dict]:
    found = []
    for message in messages:
        event = record_event(message)
        if isinstance(event, dict) and event.get("executor") == executor_id:
            found.append(message)
    return found


def lambda_record(event: Any, error_type: str = "Runtime.ExitError",
                  message: str = "Runtime exited with error: exit status 3") -> dict:
    """A failure record shaped exactly as Lambda writes it, about `event`."""
    return failure_record(request_id=str(uuid.uuid4()),
                          function_arn="arn:aws:lambda:us-east-1:123456789012:function:f",
                          condition="RetriesExhausted", invoke_count=1, request_payload=event,
                          response_payload={"errorType": error_type, "errorMessage": message})


def key_forms(key: bytes) -> list[bytes]:
    """The key as it could show up in a text or a body: raw, base64 (both alphabets, with
    and without padding), hex (both cases)."""
    forms = [key, key.hex().encode(), key.hex().upper().encode()]
    for encoded in (base64.b64encode(key), base64.urlsafe_b64encode(key)):
        forms += [encoded, encoded.rstrip(b"=")]
    return forms


def leaks(key: bytes, seen: dict[str, str | bytes]) -> list[str]:
    """The names of the things in `seen` that contain the key in any of its forms."""
    forms = key_forms(key)
    found = []
    for name, value in seen.items():
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        latin = value.encode("latin-1", "replace") if isinstance(value, str) else value
        if any(form in data or form in latin for form in forms):
            found.append(name)
    return found


# -- forgeries ----------------------------------------------------------------------------

class Trap:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def forgeries(executor: str, key: bytes, other: str, trap: str) -> tuple[list, dict]:
    """(bodies sent while the tasks run, the "captured" genuine completion of task 3)."""
    trap_pickle = pickle.dumps(Trap(trap))
    trapped = {"inline": base64.b64encode(trap_pickle).decode()}
    attacker_key = protocol.new_key()

    def completion(task, **fields):
        body = {"v": protocol.VERSION, "executor": executor, "task": task, "attempt": 0,
                "status": "ok", "result": trapped, "result_sha256": protocol.digest(trap_pickle),
                "error": None, "stats": {}, "output": None, "sig": "0" * 64}
        body.update(fields)
        return body

    def error(kind):
        return {"kind": kind, "type": "ValueError", "message": "forged", "traceback": ""}

    thirty = pickle.dumps(30)
    captured = protocol.make_completion(
        {"executor": executor, "task": 3, "attempt": 0}, key, status="ok",
        stats={"worker_id": "eavesdropped"}, result=protocol.inline_blob(thirty),
        result_sha256=protocol.digest(thirty))
    bodies = [
        completion(1),                                                     # ok, trap, bad sig
        protocol.sign_completion(attacker_key, completion(1)),             # ok, trap, own key
        completion(2, status="error", result=None, result_sha256=None, error=error("user")),
        completion(0, status="error", result=None, result_sha256=None, error=error("crash")),
        completion(2, status="error", result=None, result_sha256=None, error=error("timeout")),
        protocol.sign_completion(attacker_key, completion(1, executor=other)),
        dict(captured, task=0),                                            # replayed, renamed
        dict(captured, attempt=1),
        dict(captured, status="error", result=None, error=error("crash")),
        completion(2, v=2, result={"key": f"{other}/0/0/result"}),          # v2-style key
        completion(2, result={"key": f"{other}/0/0/result"}),
        completion(2, result={"stored": True}),                            # own key, bad sig
        "[]", '"x"', "{}", "null", "17", "not json {", "z" * 200_000,
        completion([0]), completion(0, status="error", error="boom", result=None),
        completion(0, attempt=-1), completion(0, stats="none"), completion(0, output=17),
        completion(0, status="maybe"), {"v": protocol.VERSION, "executor": executor},
        lambda_record({"hello": 1}),
        {"hint": protocol.CRASH, "message": "forged", "event": {"executor": executor,
                                                                 "task": 0, "attempt": 0}},
    ]
    return bodies, captured



# -- what a task of another executor can find in a warm sandbox -------------------------------

def _holds(value, secret) -> bool:
    if isinstance(value, str):
        return secret in value
    if isinstance(value, (bytes, bytearray)):
        return secret.encode() in value
    return False


def search_sandbox(reversed_secret, other_executor):
    """(this sandbox's worker id, what of `other_executor` it can still reach): functions
    whose closure or globals hold the secret, containers that hold it as text, and the
    other executor's messages. The secret comes reversed, and lives here in a local only,
    so that the search does not find its own arguments."""
    import gc
    import types
    from collections import deque

    from lambdafutures_handler import worker

    secret = reversed_secret[::-1]
    time.sleep(0.3)
    found = []
    seen_globals = set()
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    if _holds(cell.cell_contents, secret):
                        found.append(f"closure of {obj.__qualname__}")
                except ValueError:
                    pass  # an empty cell
            if id(obj.__globals__) not in seen_globals:
                seen_globals.add(id(obj.__globals__))
                if any(_holds(value, secret) for value in list(obj.__globals__.values())):
                    found.append(f"globals of {obj.__qualname__}")
        elif isinstance(obj, dict):
            if obj.get("executor") == other_executor:
                found.append(f"a message of the other executor: {sorted(obj)}")
            elif any(_holds(value, secret) for value in list(obj.values())):
                found.append(f"a dict with keys {sorted(map(str, obj))[:10]}")
        elif isinstance(obj, (list, tuple, deque)) and obj is not found:
            if any(_holds(item, secret) for item in list(obj)):
                found.append(f"a {type(obj).__name__}")
    for fn in list(worker._functions.values()):
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                if _holds(cell.cell_contents, secret):
                    found.append("worker._functions")
            except ValueError:
                pass
    return worker.WORKER_ID, found
