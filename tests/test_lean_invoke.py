"""The lean AWS requests (lambdafutures/backends/aws/lean.py) stand in for boto3's.

Against the AWS stack: tasks run through an executor whose invokes, receives and deletes are
lean; a missing function ends the future with InvocationFailed naming the error code, as
with boto3. Against a tiny local HTTP server: throttling and dropped connections are retried
by the declared policy, each request carries a SigV4 signature that verifies with the
session's current credentials, and the invoke is asynchronous (X-Amz-Invocation-Type:
Event). Against moto: the lean SQS calls return what boto3's return and fail with the same
error codes.
"""

from __future__ import annotations

import json
import operator
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError
from tenacity import wait_none

from lambdafutures import InvocationFailed, LambdaExecutor
from lambdafutures.backends.aws import lean
from lambdafutures.backends.aws.invoke import LambdaInvoker, is_retryable
from lambdafutures.backends.aws.retry import INVOKE

EVENT = {"v": 2, "task": 7, "payload": {"inline": "eA=="}}


class FakeLambda:
    """Answers invoke requests from a script of (status, headers, body) or "drop" (close
    the connection without answering), then 202 for ever; records every request."""

    def __init__(self, script=()):
        self.script = list(script)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((self.path, dict(self.headers.items()), body))
                step = outer.script.pop(0) if outer.script else (202, {}, b"")
                if step == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, headers, data = step
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_lambda():
    made = []

    def make(script=()):
        made.append(FakeLambda(script))
        return made[-1]

    yield make
    for server in made:
        server.close()


def session_with(access_key="AKIDLEAN", secret="lean-secret", token="lean-token"):
    session = botocore.session.get_session()
    session.set_credentials(access_key, secret, token)
    return session


def lambda_client(session, url):
    return session.create_client("lambda", region_name="eu-west-1", endpoint_url=url,
                                 config=Config(retries={"total_max_attempts": 1}))


def quick_retries(attempts=8):
    """The declared invoke policy without its waits, and with `attempts`."""
    return {"policy": replace(INVOKE, wait=wait_none(), attempts=attempts)}


THROTTLED = (429, {"x-amzn-ErrorType": "TooManyRequestsException",
                   "Content-Type": "application/json"},
             b'{"Reason": "ReservedFunctionConcurrentInvocationLimitExceeded", '
             b'"Type": "User", "message": "Rate Exceeded."}')


# -- through an executor, on the AWS stack -------------------------------------------------------

def test_tasks_run_through_lean_invokes_and_receives(aws_stack, monkeypatch):
    counts = {"invokes": 0, "receives": 0}
    invoke, receive = lean.LeanLambdaInvoker.invoke, lean.LeanSqsClient.receive_message

    def counted_invoke(self, event):
        counts["invokes"] += 1
        return invoke(self, event)

    def counted_receive(self, **params):
        counts["receives"] += 1
        return receive(self, **params)

    monkeypatch.setattr(lean.LeanLambdaInvoker, "invoke", counted_invoke)
    monkeypatch.setattr(lean.LeanSqsClient, "receive_message", counted_receive)
    with LambdaExecutor(max_workers=8, backend="aws", invoker="lean",
                        receiver="lean") as executor:
        assert list(executor.map(operator.mul, range(20), range(20))) == [
            n * n for n in range(20)]
        assert executor.submit(sum, range(1000)).result() == 499500
    assert counts["invokes"] == 21
    assert counts["receives"] >= 1


@pytest.mark.parametrize("kind", ["lean", "boto3"])
def test_missing_function_ends_the_future_with_invocation_failed(aws_stack, kind):
    with LambdaExecutor(max_workers=2, backend="aws", invoker=kind,
                        function_name="lf-no-such-function") as executor:
        future = executor.submit(operator.add, 1, 2)
        with pytest.raises(InvocationFailed, match="ResourceNotFoundException"):
            future.result(timeout=60)
    assert isinstance(future.exception().__cause__, ClientError)


def test_unknown_invoker_is_refused(aws_stack):
    with pytest.raises(ValueError, match="invoker must be one of lean, boto3"):
        LambdaExecutor(backend="aws", invoker="fast")


# -- one invoker against a local server ----------------------------------------------------------

def test_throttled_invoke_is_retried_until_accepted(fake_lambda):
    server = fake_lambda([THROTTLED, THROTTLED])
    session = session_with()
    invoker = lean.LeanLambdaInvoker(lambda_client(session, server.url), session, "my-fn",
                                     **quick_retries())
    invoker.invoke(EVENT)
    assert len(server.requests) == 3
    assert all(json.loads(body) == EVENT for _, _, body in server.requests)


def test_throttling_past_the_policy_raises_the_client_error(fake_lambda):
    server = fake_lambda([THROTTLED] * 5)
    session = session_with()
    invoker = lean.LeanLambdaInvoker(lambda_client(session, server.url), session, "my-fn",
                                     **quick_retries(attempts=3))
    with pytest.raises(ClientError) as raised:
        invoker.invoke(EVENT)
    error = raised.value.response
    assert error["Error"]["Code"] == "TooManyRequestsException"
    assert error["Error"]["Message"] == "Rate Exceeded."
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert is_retryable(raised.value)
    assert len(server.requests) == 3


def test_missing_function_is_not_retried(fake_lambda):
    server = fake_lambda([(404, {"x-amzn-ErrorType": "ResourceNotFoundException:http://x"},
                           b'{"Type": "User", "message": "Function not found: my-fn"}')])
    session = session_with()
    invoker = lean.LeanLambdaInvoker(lambda_client(session, server.url), session, "my-fn",
                                     **quick_retries())
    with pytest.raises(ClientError, match="ResourceNotFoundException.*Function not found"):
        invoker.invoke(EVENT)
    assert len(server.requests) == 1


def test_dropped_connection_is_retried(fake_lambda):
    server = fake_lambda(["drop"])
    session = session_with()
    invoker = lean.LeanLambdaInvoker(lambda_client(session, server.url), session, "my-fn",
                                     **quick_retries())
    invoker.invoke(EVENT)
    assert len(server.requests) == 2


def test_unreachable_endpoint_raises_a_retryable_connection_error():
    listener = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = "http://127.0.0.1:%d" % listener.server_address[1]
    listener.server_close()  # nothing listens there any more
    session = session_with()
    invoker = lean.LeanLambdaInvoker(lambda_client(session, url), session, "my-fn",
                                     **quick_retries(attempts=2))
    with pytest.raises(EndpointConnectionError) as raised:
        invoker.invoke(EVENT)
    assert is_retryable(raised.value)


def test_connections_are_reused(fake_lambda):
    server = fake_lambda()
    session = session_with()
    invoker = lean.LeanLambdaInvoker(lambda_client(session, server.url), session, "my-fn")
    for _ in range(5):
        invoker.invoke(EVENT)
    assert len(server.requests) == 5
    assert len(invoker.transport._idle) == 1


def verify_sigv4(url, path, headers, body, credentials, region, service):
    """Check a request's SigV4 signature the way the service does: recompute it from the
    signed headers with the caller's credentials; return the Authorization fields."""
    authorization = headers["Authorization"]
    algorithm, _, fields = authorization.partition(" ")
    assert algorithm == "AWS4-HMAC-SHA256"
    parts = dict(field.strip().split("=", 1) for field in fields.split(","))
    signed = parts["SignedHeaders"].split(";")
    lowered = {name.lower(): value for name, value in headers.items()}
    request = AWSRequest(method="POST", url=url + path, data=body,
                         headers={name: lowered[name] for name in signed})
    request.context["timestamp"] = lowered["x-amz-date"]
    signer = SigV4Auth(credentials, service, region)
    expected = signer.signature(
        signer.string_to_sign(request, signer.canonical_request(request)), request)
    assert parts["Signature"] == expected
    return parts


def test_invoke_is_async_and_signed_with_the_sessions_current_credentials(fake_lambda):
    server = fake_lambda()
    session = session_with("AKIDFIRST", "first-secret", "first-token")
    invoker = lean.LeanLambdaInvoker(lambda_client(session, server.url), session,
                                     "arn:aws:lambda:eu-west-1:123456789012:function:my-fn")
    invoker.invoke(EVENT)
    # The credential chain is asked per request: refreshed credentials sign the next one.
    session.set_credentials("AKIDSECOND", "second-secret", "second-token")
    invoker.invoke(EVENT)

    for (path, headers, body), (key, secret, token) in zip(server.requests, [
            ("AKIDFIRST", "first-secret", "first-token"),
            ("AKIDSECOND", "second-secret", "second-token")], strict=True):
        assert path == ("/2015-03-31/functions/arn%3Aaws%3Alambda%3Aeu-west-1%3A123456789012"
                        "%3Afunction%3Amy-fn/invocations")
        assert headers["X-Amz-Invocation-Type"] == "Event"
        assert headers["X-Amz-Security-Token"] == token
        parts = verify_sigv4(server.url, path, headers, body, Credentials(key, secret, token),
                             "eu-west-1", "lambda")
        assert parts["Credential"].startswith(f"{key}/")
        assert parts["Credential"].endswith("/eu-west-1/lambda/aws4_request")
        assert {"host", "x-amz-date", "x-amz-invocation-type",
                "x-amz-security-token"} <= set(parts["SignedHeaders"].split(";"))
        assert json.loads(body) == EVENT


def test_no_credentials_is_the_error_boto3_raises(fake_lambda):
    server = fake_lambda()
    session = botocore.session.get_session()
    client = session.create_client("lambda", region_name="eu-west-1", endpoint_url=server.url,
                                   aws_access_key_id="x", aws_secret_access_key="y")
    session.get_credentials = lambda: None
    invoker = lean.LeanLambdaInvoker(client, session, "my-fn")
    from botocore.exceptions import NoCredentialsError

    with pytest.raises(NoCredentialsError):
        invoker.invoke(EVENT)
    assert server.requests == []


def test_a_proxied_client_keeps_the_boto3_invoker(fake_lambda):
    server = fake_lambda()
    session = session_with()
    client = session.create_client("lambda", region_name="eu-west-1", endpoint_url=server.url,
                                   config=Config(proxies={"http": "http://proxy.invalid:3128"}))
    assert lean.lean_unsupported(client) == "a proxy is configured for its endpoint"
    assert isinstance(lean.make_invoker("lean", client, session, "my-fn", 4), LambdaInvoker)
    direct = lambda_client(session, server.url)
    assert isinstance(lean.make_invoker("lean", direct, session, "my-fn", 4),
                      lean.LeanLambdaInvoker)
    assert isinstance(lean.make_invoker("boto3", direct, session, "my-fn", 4), LambdaInvoker)


# -- SQS, against moto -----------------------------------------------------------------------

def test_lean_sqs_calls_match_boto3(moto_server):
    session = boto3.Session()
    sqs = session.client("sqs")
    lean_sqs = lean.LeanSqsClient(sqs, session, connections=2)
    queue_url = sqs.create_queue(QueueName="lf-lean-sqs")["QueueUrl"]
    bodies = [json.dumps({"n": n}) for n in range(3)]
    for body in bodies:
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)

    received = []
    while len(received) < 3:
        response = lean_sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                            WaitTimeSeconds=1, MessageAttributeNames=[],
                                            AttributeNames=[])
        received += response.get("Messages", [])
    assert sorted(message["Body"] for message in received) == sorted(bodies)
    deleted = lean_sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
        {"Id": str(n), "ReceiptHandle": message["ReceiptHandle"]}
        for n, message in enumerate(received)])
    assert sorted(entry["Id"] for entry in deleted["Successful"]) == ["0", "1", "2"]
    assert "Messages" not in sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0)
    # Everything else is boto3's own.
    assert lean_sqs.get_queue_url(QueueName="lf-lean-sqs")["QueueUrl"] == queue_url
    sqs.delete_queue(QueueUrl=queue_url)

    errors = []
    for client in (sqs, lean_sqs):
        with pytest.raises(ClientError) as raised:
            client.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0)
        errors.append(raised.value.response["Error"]["Code"])
    assert errors[0] == errors[1]


def test_lean_sqs_connection_errors_are_retryable():
    listener = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = "http://127.0.0.1:%d" % listener.server_address[1]
    listener.server_close()
    session = session_with()
    client = session.create_client("sqs", region_name="eu-west-1", endpoint_url=url)
    lean_sqs = lean.LeanSqsClient(client, session)
    with pytest.raises((EndpointConnectionError, ConnectionClosedError)) as raised:
        lean_sqs.receive_message(QueueUrl=f"{url}/123456789012/q", WaitTimeSeconds=0)
    assert is_retryable(raised.value)
