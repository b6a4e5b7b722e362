"""A small emulator of the Lambda Runtime API (version 2018-06-01), for tests.

It lets AWS's real runtime interface client (`python -m awslambdaric module.handler`) run the
worker as it would inside a Lambda sandbox: point the client at it with
AWS_LAMBDA_RUNTIME_API=<emulator.address>, queue invoke events with `invoke`, and read what
the runtime posted back with `wait_outcome`.

Endpoints, as the real Runtime API serves them (and as awslambdaric's native client, built on
aws-lambda-cpp, calls them):

    GET  /2018-06-01/runtime/invocation/next          blocks until an event is queued; 200
         with the event as the body and the headers Lambda-Runtime-Aws-Request-Id,
         Lambda-Runtime-Deadline-Ms (epoch ms), Lambda-Runtime-Invoked-Function-Arn,
         Lambda-Runtime-Trace-Id
    POST /2018-06-01/runtime/invocation/{id}/response  the handler's return value; 202
    POST /2018-06-01/runtime/invocation/{id}/error     a JSON error (errorMessage, errorType,
         stackTrace; the type may also come in Lambda-Runtime-Function-Error-Type); 202
    POST /2018-06-01/runtime/init/error                the handler failed to load; 202

An unknown request id gets 400 and a second outcome for the same id 400, as in the real API.
Everything binds to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import collections
import json
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lambdafutures.testing.loopback import read_body

PREFIX = "/2018-06-01/runtime"
_RESULT_PATH = re.compile(rf"^{PREFIX}/invocation/(?P<id>[^/]+)/(?P<kind>response|error)$")

ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"


@dataclass
class Invocation:
    """One queued event and what became of it."""

    request_id: str
    body: bytes
    timeout_s: float
    content_type: str = "application/json"
    function_arn: str = ""
    trace_id: str = ""
    deadline_ms: int | None = None       # set when the runtime picks the event up
    delivered_at: float | None = None    # time.time() of that moment


@dataclass
class Outcome:
    """What the runtime posted for one invocation: kind is "response" or "error"."""

    request_id: str
    kind: str
    body: bytes
    headers: dict[str, str]
    received_at: float = field(default_factory=time.time)

    def json(self) -> Any:
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A runtime killed mid-request resets its connection; that is no server error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RuntimeAPI:
    """The emulator. Use as a context manager, or call start() and stop()."""

    def __init__(self, function_name: str = "lambdafutures-test",
                 region: str = "us-east-1", account: str = "123456789012") -> None:
        self.function_arn = f"arn:aws:lambda:{region}:{account}:function:{function_name}"
        self._cond = threading.Condition()
        self._queue: collections.deque[Invocation] = collections.deque()
        self._invocations: dict[str, Invocation] = {}
        self._outcomes: dict[str, Outcome] = {}
        self.init_errors: list[Outcome] = []
        self.next_calls = 0
        self._stopping = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> RuntimeAPI:
        handler = type("_Handler", (_Handler,), {"api": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="runtime-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> RuntimeAPI:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """host:port, the value for AWS_LAMBDA_RUNTIME_API."""
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    # -- test side -------------------------------------------------------------------------

    def invoke(self, event: Any = None, *, body: bytes | None = None, timeout_s: float = 30.0,
               request_id: str | None = None) -> str:
        """Queue an event (JSON-encoded, or raw `body`); returns its request id. The deadline
        header is `timeout_s` after the runtime picks the event up, as in Lambda."""
        if body is None:
            body = json.dumps(event).encode()
        invocation = Invocation(
            request_id=request_id or str(uuid.uuid4()),
            body=body,
            timeout_s=timeout_s,
            function_arn=self.function_arn,
            trace_id=(f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};"
                      f"Parent={uuid.uuid4().hex[:16]};Sampled=0"),
        )
        with self._cond:
            self._invocations[invocation.request_id] = invocation
            self._queue.append(invocation)
            self._cond.notify_all()
        return invocation.request_id

    def invocation(self, request_id: str) -> Invocation:
        with self._cond:
            return self._invocations[request_id]

    def wait_delivered(self, request_id: str, timeout: float) -> Invocation | None:
        """Wait until the runtime has picked up the event; None on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            invocation = self._invocations[request_id]
            while invocation.delivered_at is None:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return invocation

    def wait_outcome(self, request_id: str, timeout: float) -> Outcome | None:
        """Wait for the runtime's response or error for `request_id`; None on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while request_id not in self._outcomes:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.1))
            return self._outcomes[request_id]

    def outcome(self, request_id: str) -> Outcome | None:
        with self._cond:
            return self._outcomes.get(request_id)

    # -- server side -----------------------------------------------------------------------

    def _next(self, gone: Callable[[], bool]) -> Invocation | None:
        """Block until an event is queued; stamp its deadline. None when stopping or when
        the poller went away (a killed runtime must not swallow the next event)."""
        with self._cond:
            self.next_calls += 1
            while not self._queue:
                if self._stopping or gone():
                    return None
                self._cond.wait(0.1)
            invocation = self._queue.popleft()
            invocation.delivered_at = time.time()
            invocation.deadline_ms = int((invocation.delivered_at + invocation.timeout_s)
                                         * 1000)
            self._cond.notify_all()
            return invocation

    def _record(self, request_id: str, kind: str, body: bytes,
                headers: dict[str, str]) -> int:
        with self._cond:
            invocation = self._invocations.get(request_id)
            if invocation is None or invocation.delivered_at is None:
                return 400
            if request_id in self._outcomes:
                return 400  # the real API rejects a second outcome for one request
            self._outcomes[request_id] = Outcome(request_id, kind, body, headers)
            self._cond.notify_all()
            return 202

    def _record_init_error(self, body: bytes, headers: dict[str, str]) -> int:
        with self._cond:
            self.init_errors.append(Outcome("", "init_error", body, headers))
            self._cond.notify_all()
            return 202


class _Handler(BaseHTTPRequestHandler):
    api: RuntimeAPI  # set on the subclass made in RuntimeAPI.start
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API; every reply has a length
    # Without this the small header/body writes of a reply wait on delayed ACKs (Nagle), and
    # each request takes tens of milliseconds.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _client_gone(self) -> bool:
        """True once the client closed its end (it sends nothing while it waits)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _status(self, status: int) -> None:
        message = {"status": "OK"} if status < 300 else {
            "errorMessage": "invalid request", "errorType": "InvalidRequestID"}
        self._reply(status, json.dumps(message).encode())

    def do_GET(self) -> None:
        if self.path != f"{PREFIX}/invocation/next":
            self._status(404)
            return
        invocation = self.api._next(self._client_gone)
        if invocation is None:  # stopping, or nobody listens: fail the poll
            self._reply(500, b'{"errorMessage": "emulator stopped"}')
            self.close_connection = True
            return
        self._reply(200, invocation.body, content_type=invocation.content_type, headers={
            "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
            "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": invocation.function_arn,
            "Lambda-Runtime-Trace-Id": invocation.trace_id,
        })

    def do_POST(self) -> None:
        body = read_body(self)
        headers = {name: value for name, value in self.headers.items()}
        if self.path == f"{PREFIX}/init/error":
            self._status(self.api._record_init_error(body, headers))
            return
        match = _RESULT_PATH.match(self.path)
        if match is None:
            self._status(404)
            return
        self._status(self.api._record(match["id"], match["kind"], body, headers))
