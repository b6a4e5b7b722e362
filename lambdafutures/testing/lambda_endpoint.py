"""A Lambda API endpoint that runs async invokes in real worker processes.

moto emulates Lambda's control plane but cannot run a Python handler without Docker and
never delivers async-invoke destinations. This endpoint fills that gap for tests and local
trials: `POST /2015-03-31/functions/{name}/invocations` with `X-Amz-Invocation-Type: Event`
answers 202 and runs the event through the real `lambdafutures_handler` in a WorkerPool
(the local backend's sandboxes), with the function's timeout and memory size read from moto
and the workers' boto3 pointed at moto. A task that times out or crashes produces the
failure record Lambda would post to the function's on-failure destination. Every other
request is forwarded to moto unchanged, so AWS_ENDPOINT_URL_LAMBDA can point here for the
control plane too.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlparse

import boto3

from lambdafutures_handler import protocol

from ..backends.local.pool import WorkerPool
from .loopback import LoopbackServer, read_body

log = logging.getLogger("lambdafutures")

_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
_CONFIG_TTL_S = 2.0



class _Function:
    def __init__(self, name: str, config: dict[str, Any], failure_queue_url: str | None,
                 pool: WorkerPool | None) -> None:
        self.name = name
        self.arn = config["FunctionArn"]
        self.timeout = float(config.get("Timeout", 3))
        self.memory = int(config.get("MemorySize", 128))
        self.failure_queue_url = failure_queue_url
        self.pool = pool
        self.loaded_at = time.monotonic()


class LambdaEndpoint:
    """Serve Lambda's invoke API on 127.0.0.1; start() returns the base URL."""

    def __init__(self, moto_url: str, *, concurrency: int = 8, latency_s: float = 0.0,
                 run: bool = True, host: str = "127.0.0.1", port: int = 0,
                 blas_threads: int | None = 1,
                 worker_env: dict[str, str | None] | None = None) -> None:
        self.moto_url = moto_url.rstrip("/")
        # Merged into the workers' environment last, e.g. {"AWS_ENDPOINT_URL_SQS": proxy}.
        self.worker_env = worker_env
        self.concurrency = concurrency
        self.latency_s = latency_s
        self.run = run
        self.blas_threads = blas_threads
        self.accepted = 0
        self._functions: dict[str, _Function] = {}
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._server = LoopbackServer((host, port), self._handler_class())

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> str:
        self._server.start("lambda-endpoint")
        return self.url

    def stop(self) -> None:
        self._server.stop()
        with self._lock:
            functions = list(self._functions.values())
            self._functions.clear()
        for function in functions:
            if function.pool is not None:
                function.pool.close()

    # -- moto ---------------------------------------------------------------------------------

    def _client(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                self._clients[service] = boto3.client(service, endpoint_url=self.moto_url)
            return self._clients[service]

    def _function(self, name: str) -> _Function:
        """The function's settings from moto (refreshed every few seconds); raises if none."""
        name = name.split(":")[6] if name.startswith("arn:") else name
        with self._lock:
            function = self._functions.get(name)
        if function is not None and time.monotonic() - function.loaded_at < _CONFIG_TTL_S:
            return function
        lam = self._client("lambda")
        config = lam.get_function_configuration(FunctionName=name)
        failure_queue_url = self._failure_queue_url(name)
        with self._lock:
            old = self._functions.get(name)
            pool = old.pool if old is not None else None
            if old is not None and (old.timeout, old.memory) != (float(config.get("Timeout", 3)),
                                                                   int(config.get("MemorySize",
                                                                                  128))):
                pool = None  # settings changed: new sandboxes, as Lambda does
                if old.pool is not None:
                    threading.Thread(target=old.pool.close, daemon=True).start()
            function = _Function(name, config, failure_queue_url, pool)
            if function.pool is None and self.run:
                function.pool = self._pool_for(function)
            self._functions[name] = function
        return function

    def _failure_queue_url(self, name: str) -> str | None:
        lam = self._client("lambda")
        try:
            config = lam.get_function_event_invoke_config(FunctionName=name)
        except lam.exceptions.ResourceNotFoundException:
            return None
        arn = (config.get("DestinationConfig", {}).get("OnFailure", {}) or {}).get("Destination")
        if not arn or ":sqs:" not in arn:
            return None
        account, queue_name = arn.split(":")[4], arn.split(":")[5]
        return self._client("sqs").get_queue_url(QueueName=queue_name,
                                                 QueueOwnerAWSAccountId=account)["QueueUrl"]

    def _pool_for(self, function: _Function) -> WorkerPool:
        env = {
            "AWS_ENDPOINT_URL": self.moto_url,
            "AWS_LAMBDA_FUNCTION_NAME": function.name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory),
            # Workers talk to moto directly; the host's route to this endpoint stays out.
            "AWS_ENDPOINT_URL_LAMBDA": None,
            **(self.worker_env or {}),
        }
        pool = WorkerPool(
            self.concurrency, timeout=function.timeout, on_frame=lambda frame: None,
            on_failure=lambda event, kind, message: self._report_failure(function, event,
                                                                         kind, message),
            blas_threads=self.blas_threads, env=env, name=f"endpoint-{function.name}")
        return pool

    def _report_failure(self, function: _Function, event: dict, kind: str,
                        message: str) -> None:
        """Post the record Lambda posts to an on-failure destination."""
        if function.failure_queue_url is None:
            log.warning("function %s has no on-failure destination; dropping a %s record",
                        function.name, kind)
            return
        request_id = str(uuid.uuid4())
        if kind == protocol.TIMEOUT:
            payload = {"errorType": "Sandbox.Timedout",
                       "errorMessage": f"RequestId: {request_id} Error: Task timed out after "
                                       f"{function.timeout:.2f} seconds"}
        elif kind == protocol.CRASH:
            payload = {"errorType": "Runtime.ExitError",
                       "errorMessage": f"RequestId: {request_id} Error: Runtime exited with "
                                       f"error: {message}"}
        else:
            error_type, _, error_message = message.partition(": ")
            payload = {"errorType": error_type, "errorMessage": error_message}
        record = {
            "version": "1.0",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "requestContext": {"requestId": request_id, "functionArn": f"{function.arn}:$LATEST",
                               "condition": "RetriesExhausted", "approximateInvokeCount": 1},
            "requestPayload": event,
            "responseContext": {"statusCode": 200, "executedVersion": "$LATEST",
                                "functionError": "Unhandled"},
            "responsePayload": payload,
        }
        self._client("sqs").send_message(QueueUrl=function.failure_queue_url,
                                         MessageBody=json.dumps(record))

    # -- HTTP ---------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: boto3 reuses its connections
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("lambda endpoint: " + format, *args)

            def _reply(self, status: int, body: bytes = b"",
                       headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                match = _INVOKE_PATH.match(urlparse(self.path).path)
                if match and self.headers.get("X-Amz-Invocation-Type") == "Event":
                    endpoint._invoke(self, unquote(match.group(1)), read_body(self))
                else:
                    endpoint._forward(self, read_body(self))

            def do_GET(self) -> None:
                endpoint._forward(self, b"")

            def do_DELETE(self) -> None:
                endpoint._forward(self, b"")

            def do_PUT(self) -> None:
                endpoint._forward(self, read_body(self))

        return Handler

    def _invoke(self, request: Any, name: str, body: bytes) -> None:
        try:
            function = self._function(name)
        except Exception as exc:  # noqa: BLE001 - answered as Lambda would
            request._reply(404, json.dumps({"Type": "User", "message": str(exc)}).encode(),
                           {"x-amzn-ErrorType": "ResourceNotFoundException",
                            "Content-Type": "application/json"})
            return
        if self.latency_s:
            time.sleep(self.latency_s)
        try:
            event = json.loads(body)
        except ValueError:
            request._reply(400, b'{"message": "payload is not JSON"}',
                           {"x-amzn-ErrorType": "InvalidRequestContentException"})
            return
        if function.pool is not None:
            function.pool.invoke(event)
        with self._lock:
            self.accepted += 1
        request._reply(202, b"", {"x-amzn-RequestId": str(uuid.uuid4())})

    def _forward(self, request: Any, body: bytes) -> None:
        target = urlparse(self.moto_url)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in _HOP_BY_HOP}  # the body is re-sized below
            headers["Host"] = target.netloc
            connection.request(request.command, request.path, body=body or None,
                               headers=headers)
            response = connection.getresponse()
            data = response.read()
            passed = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
            request._reply(response.status, data, passed)
        finally:
            connection.close()

