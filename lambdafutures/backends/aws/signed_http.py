"""SigV4-signed HTTP/1.1 POSTs over pooled keep-alive connections: the wire under lean.py.

A deliberately minimal client: one POST at a time per connection, Content-Length, chunked or
until-close responses. Failures become the exceptions boto3 raises (ClientError with the
service's error code, EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ...),
so the declared retry policies (retry.py) retry the same cases and messages read the same.

A transport made `interruptible` can be cut from another thread: `interrupt()` shuts down the
sockets of requests in flight (a 20 s SQS long poll ends at once) and refuses new requests,
both with `Interrupted`. That is how an executor's shutdown returns without waiting out its
receivers' long polls.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import threading
from collections import deque
from hashlib import sha256
from typing import Any
from urllib.parse import urlsplit

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

_USER_AGENT = f"lambdafutures-lean botocore/{botocore.__version__}"
_MAX_HEAD = 64 * 1024
_NO_BODY_STATUS = {204, 304}


class Interrupted(Exception):
    """The request was cut, or refused, because its transport was interrupted (shutdown)."""


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


class SignedTransport:
    """SigV4-signed POSTs to one boto3 client's endpoint over pooled keep-alive connections.

    With `interruptible=True`, `interrupt()` cuts the requests in flight and refuses new ones
    (see the module's docstring); the others skip that bookkeeping, a lock per request."""

    def __init__(self, client: Any, session: Any, service: str, *, connections: int,
                 interruptible: bool = False) -> None:
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
        self._in_flight: set[_Connection] | None = set() if interruptible else None
        self._in_flight_lock = threading.Lock()
        self._interrupted = False

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
        if self._in_flight is not None:
            self._track(connection)
        try:
            response = connection.exchange(request)
        except BaseException as exc:
            connection.close()
            if self._interrupted:
                raise Interrupted(f"request to {self._base_url} cut by shutdown") from exc
            raise
        finally:
            if self._in_flight is not None:
                with self._in_flight_lock:
                    self._in_flight.discard(connection)
        if connection.reusable and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    def interrupt(self) -> None:
        """Cut every request in flight and refuse new ones, from any thread."""
        if self._in_flight is None:
            raise TypeError("this transport was not made interruptible")
        with self._in_flight_lock:
            self._interrupted = True
            cut = list(self._in_flight)
        for connection in cut:
            connection.abort()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _track(self, connection: _Connection) -> None:
        # Registered under the same lock `interrupt` takes: either it sees this connection
        # and cuts it, or this request sees the flag and is never sent.
        with self._in_flight_lock:
            if not self._interrupted:
                assert self._in_flight is not None
                self._in_flight.add(connection)
                return
        connection.close()
        raise Interrupted(f"request to {self._base_url} refused: shutting down")

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

    def abort(self) -> None:
        """From another thread: end the exchange in progress. shutdown() wakes a blocked
        recv (which then reads end-of-file); close() alone would not, on Linux."""
        self.reusable = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
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
