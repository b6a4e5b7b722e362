"""A Lambda API endpoint that runs async invokes in real worker processes.

moto emulates Lambda's control plane but cannot run a Python handler without Docker and
never delivers async-invoke destinations. This endpoint fills that gap for tests and local
trials: `POST /2015-03-31/functions/{name}/invocations` with `X-Amz-Invocation-Type: Event`
answers 202 and runs the event through the real `lambdafutures_handler`, with the function's
settings read from moto and the workers' boto3 pointed at moto. An event that times out,
crashes or fails produces the record Lambda posts to the function's on-failure destination
(records.py). `GET /2016-08-19/account-settings/` answers with the endpoint's account
concurrency. Every other request is forwarded to moto unchanged, so AWS_ENDPOINT_URL_LAMBDA
can point here for the control plane too.

Two settings:
- fast (default): each function's events run in a WorkerPool of `concurrency` local worker
  processes (the local backend's sandboxes), queued there beyond it; no limits, no CPU
  quota. The bulk of the tests use it.
- harsh (`harsh=True`): as hard as Lambda where it hurts. The account's and each function's
  reserved concurrency (from moto) are enforced by Lambda's async queue (async_queue.py:
  throttles, backoff, EventAgeExceeded, retries of function errors); each event runs in a
  sandbox process under AWS's runtime interface client (sandboxes.py), limited to its
  memory size's CPU share (cpu_quota.py), with Lambda's environment (sandbox_env.py).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlparse

from lambdafutures_handler import protocol

from ..backends.local.pool import WorkerPool
from .async_queue import AsyncQueue, QueuedEvent, QueueSettings
from .cpu_quota import CpuQuota, cpu_share
from .function_settings import FunctionCatalog, FunctionSettings
from .loopback import LoopbackServer, read_body
from .records import failure_record, request_payload
from .sandbox_env import lambda_environment, without_host
from .sandboxes import CRASH, TIMEOUT, Fleet, Invocation, Outcome, SandboxSpec

log = logging.getLogger("lambdafutures")

_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")
_ACCOUNT_SETTINGS_PATH = re.compile(r"^/2016-08-19/account-settings/?$")
_REGION_IN_AUTH = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/lambda/")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
DEFAULT_ACCOUNT_CONCURRENCY = 1000  # Lambda's default account limit per region


class LambdaEndpoint:
    """Serve Lambda's invoke API on 127.0.0.1; start() returns the base URL."""

    def __init__(self, moto_url: str, *, concurrency: int = 8, latency_s: float = 0.0,
                 run: bool = True, host: str = "127.0.0.1", port: int = 0,
                 blas_threads: int | None = None,
                 worker_env: dict[str, str | None] | None = None,
                 harsh: bool = False, account_concurrency: int = DEFAULT_ACCOUNT_CONCURRENCY,
                 cpu_quota: bool | None = None, time_scale: float = 1.0,
                 max_event_age_s: float | dict[str, float] | None = None,
                 region: str = "us-east-1") -> None:
        """`concurrency`: worker processes per function (fast setting only). `blas_threads`:
        forced on the fast setting's workers (default None: the worker picks them from the
        memory size, handler/sandbox.py). `worker_env`: merged into the sandboxes'
        environment last (a None value removes a variable). `account_concurrency`: the
        account's limit, enforced by the harsh setting and reported by GetAccountSettings.
        `cpu_quota`: each sandbox gets its memory's CPU share (default: when harsh).
        `time_scale`: multiplies Lambda's throttle backoff and retry delays (harsh).
        `max_event_age_s`: overrides the MaximumEventAgeInSeconds of every function, or of
        those named in a {function name: seconds} dict."""
        self.moto_url = moto_url.rstrip("/")
        self.worker_env = worker_env
        self.concurrency = concurrency
        self.latency_s = latency_s
        self.run = run
        self.blas_threads = blas_threads
        self.harsh = harsh
        self.account_concurrency = account_concurrency
        self.region = region
        self.accepted = 0
        self.catalog = FunctionCatalog(self.moto_url, max_event_age_s=max_event_age_s)
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, str], tuple[tuple, WorkerPool]] = {}
        self._fleets: dict[tuple[str, str], tuple[tuple, Fleet]] = {}
        self._task_root_dir: str | None = None
        self._task_root_lock = threading.Lock()  # taken under self._lock
        self._server = LoopbackServer((host, port), self._handler_class())
        use_quota = harsh if cpu_quota is None else cpu_quota
        self.quota = CpuQuota() if use_quota and CpuQuota.available() else None
        self.queue: AsyncQueue | None = None
        if harsh:
            self.queue = AsyncQueue(
                account_concurrency=account_concurrency, settings=self._queue_settings,
                reserved_total=lambda region: self.catalog.reserved_total(region)[0],
                run=self._run_queued, drop=self._drop_queued, time_scale=time_scale)

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> str:
        self._server.start("lambda-endpoint")
        return self.url

    def stop(self) -> None:
        self._server.stop()
        if self.queue is not None:
            self.queue.stop()
        with self._lock:
            pools = [pool for _, pool in self._pools.values()]
            fleets = [fleet for _, fleet in self._fleets.values()]
            self._pools.clear()
            self._fleets.clear()
        for pool in pools:
            pool.close()
        for fleet in fleets:
            fleet.close()
        if self.quota is not None:
            self.quota.stop()
        if self._task_root_dir is not None:
            shutil.rmtree(self._task_root_dir, ignore_errors=True)

    @property
    def _task_root(self) -> str:
        """LAMBDA_TASK_ROOT and the sandboxes' working directory (on their sys.path, as
        /var/task is): an empty directory, made when the first sandbox needs it."""
        with self._task_root_lock:
            if self._task_root_dir is None:
                self._task_root_dir = tempfile.mkdtemp(prefix="lambdafutures-task-")
                # Also gone at exit for an endpoint nobody stopped.
                weakref.finalize(self, shutil.rmtree, self._task_root_dir, True)
            return self._task_root_dir

    # -- sandboxes ------------------------------------------------------------------------------

    def _environment(self, function: FunctionSettings) -> dict[str, str]:
        return lambda_environment(
            function_name=function.name, memory_mb=function.memory, region=function.region,
            moto_url=self.moto_url, lambda_url=self.url, task_root=self._task_root,
            function_variables=function.variables, extra=self.worker_env)

    def _pool(self, function: FunctionSettings) -> WorkerPool:
        """The fast setting's worker pool for the function, new when its settings changed."""
        key = (function.region, function.name)
        with self._lock:
            known = self._pools.get(key)
            if known is not None and known[0] == function.sandbox_key:
                return known[1]
            pool = WorkerPool(
                self.concurrency, timeout=function.timeout, on_frame=lambda frame: None,
                on_failure=lambda event, kind, message: self._pool_failure(function, event,
                                                                           kind, message),
                blas_threads=self.blas_threads,
                env=without_host(self._environment(function)),
                name=f"endpoint-{function.name}")
            self._pools[key] = (function.sandbox_key, pool)
        if known is not None:  # settings changed: new sandboxes, as Lambda does
            threading.Thread(target=known[1].close, daemon=True).start()
        return pool

    def _fleet(self, function: FunctionSettings) -> Fleet:
        """The harsh setting's sandboxes for the function, new when its settings changed."""
        key = (function.region, function.name)
        with self._lock:
            known = self._fleets.get(key)
            if known is not None and known[0] == function.sandbox_key:
                return known[1]
            cpus = cpu_share(function.memory) if self.quota is not None else None
            fleet = Fleet(SandboxSpec(function.name, function.arn, function.timeout,
                                      function.memory, self._environment(function), cpus,
                                      self._task_root), self.quota)
            self._fleets[key] = (function.sandbox_key, fleet)
        if known is not None:
            known[1].retire()
        return fleet

    def _queue_settings(self, region: str, name: str) -> QueueSettings:
        function = self.catalog.get(region, name, fresh=False)
        return QueueSettings(function.reserved, function.max_event_age_s, function.max_retries)

    def _run_queued(self, event: QueuedEvent, done: Any) -> None:
        function = self.catalog.get(event.region, event.function, fresh=False)
        self._fleet(function).run(Invocation(event.body, done, request_id=event.request_id))

    def _drop_queued(self, event: QueuedEvent, condition: str) -> None:
        function = self.catalog.get(event.region, event.function, fresh=False)
        outcome = event.last_outcome
        log.debug("lambda endpoint: %s event %s dropped (%s)", function.name, event.request_id,
                  condition)
        self._post_record(function, failure_record(
            request_id=event.request_id, function_arn=function.arn, condition=condition,
            invoke_count=event.invokes, request_payload=request_payload(event.body),
            response_payload=outcome.body if outcome is not None else None))

    def _pool_failure(self, function: FunctionSettings, event: dict, kind: str,
                      message: str) -> None:
        """A fast-setting worker's event ended badly: the record Lambda would post."""
        request_id = str(uuid.uuid4())
        if kind == protocol.TIMEOUT:
            outcome = Outcome(TIMEOUT, {"errorType": "Sandbox.Timedout",
                                        "errorMessage": f"RequestId: {request_id} Error: Task "
                                        f"timed out after {function.timeout:.2f} seconds"})
        elif kind == protocol.CRASH:
            outcome = Outcome(CRASH, {"errorType": "Runtime.ExitError",
                                      "errorMessage": f"RequestId: {request_id} Error: Runtime "
                                      f"exited with error: {message}"})
        else:
            error_type, _, error_message = message.partition(": ")
            outcome = Outcome(CRASH, {"errorType": error_type, "errorMessage": error_message})
        self._post_record(function, failure_record(
            request_id=request_id, function_arn=function.arn, condition="RetriesExhausted",
            invoke_count=1, request_payload=event, response_payload=outcome.body))

    def _post_record(self, function: FunctionSettings, record: dict) -> None:
        if function.failure_queue_url is None:
            log.warning("function %s has no on-failure destination; dropping a %s record",
                        function.name, record["requestContext"]["condition"])
            return
        self.catalog.client("sqs", function.region).send_message(
            QueueUrl=function.failure_queue_url, MessageBody=json.dumps(record))

    # -- HTTP -----------------------------------------------------------------------------------

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
                if _ACCOUNT_SETTINGS_PATH.match(urlparse(self.path).path):
                    endpoint._account_settings(self)
                else:
                    endpoint._forward(self, b"")

            def do_DELETE(self) -> None:
                endpoint._forward(self, b"")

            def do_PUT(self) -> None:
                endpoint._forward(self, read_body(self))

        return Handler

    def _region(self, request: Any) -> str:
        match = _REGION_IN_AUTH.search(request.headers.get("Authorization", ""))
        return match.group(1) if match else self.region

    def _invoke(self, request: Any, name: str, body: bytes) -> None:
        region = self._region(request)
        try:
            function = self.catalog.get(region, name)
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
        request_id = str(uuid.uuid4())
        if self.run and self.queue is not None:
            request_id = self.queue.accept(region, function.name, body)
        elif self.run:
            self._pool(function).invoke(event)
        with self._lock:
            self.accepted += 1
        request._reply(202, b"", {"x-amzn-RequestId": request_id})

    def _account_settings(self, request: Any) -> None:
        """GetAccountSettings, which moto does not serve: the limits this endpoint keeps."""
        try:
            reserved, count = self.catalog.reserved_total(self._region(request))
        except Exception as exc:  # noqa: BLE001 - answered as a service error
            request._reply(500, json.dumps({"message": str(exc)}).encode(),
                           {"x-amzn-ErrorType": "ServiceException"})
            return
        body = {
            "AccountLimit": {
                "TotalCodeSize": 80530636800, "CodeSizeUnzipped": 262144000,
                "CodeSizeZipped": 52428800, "ConcurrentExecutions": self.account_concurrency,
                "UnreservedConcurrentExecutions": max(0, self.account_concurrency - reserved),
            },
            "AccountUsage": {"TotalCodeSize": 0, "FunctionCount": count},
        }
        request._reply(200, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                        "x-amzn-RequestId": str(uuid.uuid4())})

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
