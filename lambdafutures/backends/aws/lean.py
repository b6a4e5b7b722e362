"""Lean AWS requests for the host's hot paths: Lambda async invokes, SQS receives and deletes.

A boto3 call spends most of its CPU in botocore's machinery (parameter validation, endpoint
rules, event hooks, response parsing) and in http.client/urllib3's header handling: about
0.6-0.8 ms for one `lambda.invoke` here, which caps one host process near a thousand
invokes per second. The three calls the executor makes per task are small, fixed requests,
so this module sends the very same requests itself:

- endpoint, region, timeouts and TLS trust come from real boto3 clients and their session
  (so AWS_ENDPOINT_URL_<SERVICE>, `endpoint_urls`, profiles, AWS_CA_BUNDLE all hold);
- credentials come from the session's credential chain, frozen per request, so refreshable
  credentials (SSO, assumed roles, instance metadata) refresh as they do in boto3;
- each request is signed by botocore's own `SigV4Auth`;
- requests go over a pool of keep-alive HTTP/1.1 connections (TLS for https), one per
  thread that uses them, through a deliberately minimal HTTP client: one POST at a time,
  Content-Length, chunked or until-close responses;
- failures become the exceptions boto3 raises (ClientError with the service's error code,
  EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ...), so the declared
  retry policies (`invoke.INVOKE_RETRY`, `SQS_RETRY`) retry the same cases and error
  messages read the same.

Proxies and client certificates are not handled here: `lean_unsupported` names the reason
and the backend then uses boto3 for that client.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable
from hashlib import sha256
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import botocore
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from botocore.httpsession import ProxyConfiguration, get_cert_path
from botocore.utils import get_environ_proxies
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from .invoke import INVOKE_RETRY, LambdaInvoker, is_retryable

log = logging.getLogger("lambdafutures")
T = TypeVar("T")

CHOICES = ("lean", "boto3")
_USER_AGENT = f"lambdafutures-lean botocore/{botocore.__version__}"
_MAX_HEAD = 64 * 1024
_NO_BODY_STATUS = {204, 304}

# What botocore's "standard" retry mode does for the SQS client: 3 attempts, jittered
# exponential backoff up to 20 s, for throttling, 5xx and connection errors.
SQS_RETRY = dict(
    retry=retry_if_exception(is_retryable),
    stop=stop_after_attempt(3),
    wait=wait_random_exponential(multiplier=1, max=20),
    before_sleep=before_sleep_log(log, logging.DEBUG),
    reraise=True,
)


def lean_unsupported(client: Any) -> str | None:
    """Why this module cannot stand in for this boto3 client, or None if it can."""
    url = client.meta.endpoint_url
    config = client.meta.config
    proxies = config.proxies or get_environ_proxies(url)
    if ProxyConfiguration(proxies=proxies).proxy_url_for(url):
        return "a proxy is configured for its endpoint"
    if getattr(config, "client_cert", None):
        return "a client certificate is configured"
    if urlsplit(url).scheme not in ("http", "https"):
        return f"unsupported endpoint scheme in {url}"
    return None


def make_invoker(kind: str, client: Any, session: Any, function_name: str,
                 connections: int) -> Any:
    """The aws backend's invoker: "lean" (`LeanLambdaInvoker`, or boto3 where it cannot stand
    in for the client) or "boto3" (`invoke.LambdaInvoker`)."""
    if _lean_wanted("invoker", kind, client):
        return LeanLambdaInvoker(client, session, function_name, connections=connections)
    return LambdaInvoker(client, function_name)


def make_sqs(kind: str, client: Any, session: Any, connections: int) -> Any:
    """The SQS client of the completion queue: "lean" (`LeanSqsClient`, or boto3 where it
    cannot stand in for the client) or "boto3" (the client itself)."""
    if _lean_wanted("receiver", kind, client):
        return LeanSqsClient(client, session, connections=connections)
    return client


def _lean_wanted(option: str, kind: str, client: Any) -> bool:
    if kind not in CHOICES:
        raise ValueError(f"{option} must be one of {', '.join(CHOICES)}, not {kind!r}")
    if kind == "boto3":
        return False
    reason = lean_unsupported(client)
    if reason:
        log.info("%s: using boto3, %s", option, reason)
    return reason is None


class LeanLambdaInvoker:
    """Async-invokes `function_name` as `client.invoke(InvocationType="Event")` would.

    Args:
        client: a boto3 Lambda client; its endpoint, region and timeouts are used.
        session: the boto3 (or botocore) session whose credential chain signs requests.
        function_name: the function's name or ARN.
        connections: idle keep-alive connections kept (one per invoker thread).
        **retry_overrides: tenacity arguments replacing parts of `invoke.INVOKE_RETRY`.
    """

    def __init__(self, client: Any, session: Any, function_name: str, *, connections: int = 10,
                 **retry_overrides: Any) -> None:
        self.transport = SignedTransport(client, session, "lambda", connections=connections)
        self._path = f"/2015-03-31/functions/{quote(function_name, safe='')}/invocations"
        self._headers = {"X-Amz-Invocation-Type": "Event"}
        self._retry = {**INVOKE_RETRY, **retry_overrides}

    def invoke(self, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        with_retries(self._retry, lambda: self._invoke(body))

    def _invoke(self, body: bytes) -> None:
        status, headers, data = self.transport.post(self._path, self._headers, body)
        if not 200 <= status < 300:
            raise client_error(status, headers, data, "Invoke")

    def close(self) -> None:
        self.transport.close()


class LeanSqsClient:
    """`receive_message` and `delete_message_batch` sent as SQS's JSON-protocol requests;
    every other method is the boto3 client's own.

    Results have the shape boto3 returns (without ResponseMetadata)."""

    def __init__(self, client: Any, session: Any, *, connections: int = 10,
                 **retry_overrides: Any) -> None:
        self._client = client
        self.transport = SignedTransport(client, session, "sqs", connections=connections)
        self._retry = {**SQS_RETRY, **retry_overrides}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def receive_message(self, **params: Any) -> dict[str, Any]:
        return self._call("ReceiveMessage", params)

    def delete_message_batch(self, **params: Any) -> dict[str, Any]:
        return self._call("DeleteMessageBatch", params)

    def close(self) -> None:
        self.transport.close()

    def _call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(params).encode()
        headers = {"Content-Type": "application/x-amz-json-1.0",
                   "X-Amz-Target": f"AmazonSQS.{operation}", "x-amzn-query-mode": "true"}

        def call() -> dict[str, Any]:
            status, response_headers, data = self.transport.post("/", headers, body)
            if not 200 <= status < 300:
                raise client_error(status, response_headers, data, operation)
            return json.loads(data) if data else {}

        return with_retries(self._retry, call)


def with_retries(policy: dict[str, Any], call: Callable[[], T]) -> T:
    """`call()` under the tenacity `policy`, as `Retrying(**policy)(call)` runs it.

    Setting up a tenacity loop costs about as much CPU as signing a request, and nearly every
    call succeeds at once: so the first attempt runs bare, and only after it fails does the
    policy take over, with that failure as its own first attempt (same attempts, same
    waits)."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - judged by the policy, as tenacity would
        failure: Exception | None = exc
    for attempt in Retrying(**policy):
        with attempt:
            if failure is not None:
                first, failure = failure, None
                raise first
            result = call()
    return result  # the loop ends only after an attempt succeeded; else tenacity raised


class SignedTransport:
    """SigV4-signed POSTs to one boto3 client's endpoint over pooled keep-alive connections."""

    def __init__(self, client: Any, session: Any, service: str, *, connections: int) -> None:
        reason = lean_unsupported(client)
        if reason:
            raise ValueError(f"lean requests cannot be used: {reason}")
        self._session = session
        self._service = service
        self._region = client.meta.region_name
        parts = urlsplit(client.meta.endpoint_url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        default_port = 443 if self._tls else 80
        self._port = parts.port or default_port
        # The Host header SigV4 signs: without a default port, as botocore's is.
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if parts.port in (None, default_port) else f"{host}:{parts.port}"
        self._base_path = parts.path.rstrip("/")
        self._base_url = f"{parts.scheme}://{parts.netloc}{self._base_path}"
        self._connect_timeout = client.meta.config.connect_timeout
        self._read_timeout = client.meta.config.read_timeout
        self._tls_context = _tls_context(session) if self._tls else None
        self._max_idle = max(1, connections)
        self._idle: deque[_Connection] = deque()

    def signed_headers(self, path: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        """The request's headers, signed with the session's current credentials."""
        credentials = self._session.get_credentials()
        if credentials is None:
            raise NoCredentialsError()
        request = AWSRequest(method="POST", url=self._base_url + path, data=body,
                             headers={"Host": self._host_header, "User-Agent": _USER_AGENT,
                                      **headers})
        _SigV4Auth(credentials.get_frozen_credentials(), self._service,
                   self._region).add_auth(request)
        return dict(request.headers.items())

    def post(self, path: str, headers: dict[str, str],
             body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one signed POST; return the status, lower-cased headers and body."""
        signed = self.signed_headers(path, headers, body)
        head = "".join(f"{name}: {value}\r\n" for name, value in signed.items())
        request = (f"POST {self._base_path}{path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
                   f"{head}\r\n").encode("latin-1") + body
        connection = self._connection()
        try:
            response = connection.exchange(request)
        except BaseException:
            connection.close()
            raise
        if connection.reusable and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _connection(self) -> _Connection:
        # deque.pop/append are atomic, so threads share the pool without a lock.
        while True:
            try:
                connection = self._idle.pop()
            except IndexError:
                break
            if connection.alive():
                return connection
            connection.close()
        return _Connection(self._host, self._port, self._tls_context, self._base_url,
                           self._connect_timeout, self._read_timeout)


class _SigV4Auth(SigV4Auth):
    """botocore's signer, hashing the (bytes) body directly: its own `payload` gets the body
    by preparing a whole copy of the request first, a quarter of the signing time. The hash is
    the same: a bytes body is signed as sha256(body) whatever the scheme."""

    def payload(self, request: AWSRequest) -> str:
        return sha256(request.data).hexdigest()


class _Connection:
    """One keep-alive HTTP/1.1 connection, used by one thread at a time."""

    def __init__(self, host: str, port: int, tls_context: ssl.SSLContext | None, url: str,
                 connect_timeout: float | None, read_timeout: float | None) -> None:
        self._url = url
        self.reusable = True
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError as exc:
            raise ConnectTimeoutError(endpoint_url=url, error=exc) from exc
        except OSError as exc:
            raise EndpointConnectionError(endpoint_url=url, error=exc) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls_context is not None:
                sock = tls_context.wrap_socket(sock, server_hostname=host)
            sock.settimeout(read_timeout)
        except ssl.SSLError as exc:
            sock.close()
            raise SSLError(endpoint_url=url, error=exc) from exc
        except OSError as exc:
            sock.close()
            raise EndpointConnectionError(endpoint_url=url, error=exc) from exc
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._buffer = b""

    def alive(self) -> bool:
        # An idle keep-alive connection has nothing to read; if it is readable, the server
        # closed it (or sent garbage): do not send a request into it.
        return not self._buffer and not self._poll.poll(0)

    def close(self) -> None:
        self.reusable = False
        try:
            self._sock.close()
        except OSError:
            pass

    def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request; return the response's status, lower-cased headers and body."""
        try:
            self._sock.sendall(request)
            head = self._read_until(b"\r\n\r\n", _MAX_HEAD)
            status_line, *lines = head.decode("latin-1").split("\r\n")
            version, status_text = status_line.split(" ", 2)[:2]
            status = int(status_text)
            headers: dict[str, str] = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = self._read_body(status, headers)
        except TimeoutError as exc:
            raise ReadTimeoutError(endpoint_url=self._url, error=exc) from exc
        except ssl.SSLError as exc:
            raise SSLError(endpoint_url=self._url, error=exc) from exc
        except (OSError, ValueError, EOFError) as exc:
            # Reset, closed or garbled: the same retryable error botocore raises for these.
            raise ConnectionClosedError(endpoint_url=self._url) from exc
        connection = headers.get("connection", "").lower()
        if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
            self.reusable = False
        return status, headers, body

    def _read_body(self, status: int, headers: dict[str, str]) -> bytes:
        if status in _NO_BODY_STATUS or 100 <= status < 200:
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int(self._read_until(b"\r\n", _MAX_HEAD).split(b";")[0], 16)
                if size == 0:
                    while self._read_until(b"\r\n", _MAX_HEAD):  # trailers, then a blank line
                        pass
                    return b"".join(chunks)
                chunks.append(self._read_exactly(size + 2)[:size])
        length = headers.get("content-length")
        if length is not None:
            return self._read_exactly(int(length))
        self.reusable = False  # the body runs to the end of the connection
        data = [self._buffer]
        self._buffer = b""
        while block := self._sock.recv(65536):
            data.append(block)
        return b"".join(data)

    def _read_until(self, marker: bytes, limit: int) -> bytes:
        while True:
            end = self._buffer.find(marker)
            if end >= 0:
                found, self._buffer = self._buffer[:end], self._buffer[end + len(marker):]
                return found
            if len(self._buffer) > limit:
                raise ValueError("HTTP response head too long")
            self._fill()

    def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _fill(self) -> None:
        block = self._sock.recv(65536)
        if not block:
            raise EOFError("connection closed by the server")
        self._buffer += block


def client_error(status: int, headers: dict[str, str], body: bytes,
                 operation: str) -> ClientError:
    """The ClientError botocore's JSON / rest-JSON parsers raise for this error response."""
    try:
        document = json.loads(body) if body else {}
    except ValueError:
        document = {}
    if not isinstance(document, dict):
        document = {}
    code = headers.get("x-amzn-errortype", "").split(":")[0]
    if not code:
        code = str(document.get("__type") or document.get("code") or status)
        code = code.split(":")[0].rsplit("#", 1)[-1]
    query_code = headers.get("x-amzn-query-error", "").split(";")
    if len(query_code) == 2 and query_code[0]:
        code = query_code[0]  # SQS names its errors as its older query protocol did
    message = document.get("message") or document.get("Message") or ""
    return ClientError({
        "Error": {"Code": code, "Message": str(message)},
        "ResponseMetadata": {"HTTPStatusCode": status,
                             "RequestId": headers.get("x-amzn-requestid", ""),
                             "HTTPHeaders": headers},
    }, operation)


def _tls_context(session: Any) -> ssl.SSLContext:
    """Trust what a boto3 client of this session trusts: the session's ca_bundle setting
    (AWS_CA_BUNDLE, profile), else REQUESTS_CA_BUNDLE, else botocore's default bundle."""
    botocore_session = getattr(session, "_session", session)
    bundle = botocore_session.get_config_variable("ca_bundle")
    bundle = bundle or os.environ.get("REQUESTS_CA_BUNDLE") or get_cert_path(True)
    return ssl.create_default_context(cafile=bundle)
