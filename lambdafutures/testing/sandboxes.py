"""Local Lambda sandboxes: AWS's runtime interface client against a Runtime API of our own.

Each sandbox is a process running `python -m awslambdaric lambdafutures_handler.worker.handle`,
as Lambda's python runtime runs the deployed function, with Lambda's environment (see
sandbox_env.py) and AWS_LAMBDA_RUNTIME_API pointing at a small Runtime API server that
serves it alone. The client imports the handler (so handler/sandbox.py picks the BLAS
threads from the memory size), polls `/invocation/next`, builds the real LambdaContext from
the headers (deadline included: the worker's watchdog reads it), and posts the handler's
response or error. A sandbox takes one event at a time, stays warm for the next, is killed
at its deadline (Sandbox.Timedout) and is gone if its process exits (Runtime.ExitError).
With a CpuQuota, the process gets its memory size's share of CPU time.

`Fleet` keeps a function's sandboxes: a warm idle one for each event if there is one, else a
new one (a cold start). How many events run at once is its caller's business (concurrency
limits live in async_queue.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from .cpu_quota import CpuQuota
from .loopback import LoopbackServer, read_body
from .sandbox_env import HANDLER

log = logging.getLogger("lambdafutures")

_PREFIX = "/2018-06-01/runtime"
_RESULT_PATH = re.compile(rf"^{_PREFIX}/invocation/(?P<id>[^/]+)/(?P<kind>response|error)$")
# Lambda allows 10 s for a sandbox's init phase; a busy test machine needs more.
INIT_ALLOWANCE_S = 30.0
_SUPERVISE_S = 0.05

OK, ERROR, TIMEOUT, CRASH = "ok", "error", "timeout", "crash"


@dataclass
class Outcome:
    """What became of one invocation: kind is ok, error (the handler raised: `body` is the
    runtime's error JSON), timeout or crash."""

    kind: str
    body: dict[str, Any] | None = None
    message: str = ""


@dataclass
class Invocation:
    body: bytes
    on_done: Callable[[Outcome], None]
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    assigned_at: float = 0.0
    deadline: float | None = None  # monotonic; set when the runtime takes the event
    done: bool = False


@dataclass
class SandboxSpec:
    """What a function's sandboxes are made from (one Fleet per spec)."""

    function_name: str
    function_arn: str
    timeout_s: float
    memory_mb: int
    env: dict[str, str]
    cpus: float | None = None  # CPU share to enforce; None: no limit
    task_root: str = "/tmp"


class Sandbox:
    def __init__(self, spec: SandboxSpec, quota: CpuQuota | None,
                 on_idle: Callable[[Sandbox], None], on_gone: Callable[[Sandbox], None]) -> None:
        self.spec = spec
        self._quota = quota
        self._on_idle = on_idle
        self._on_gone = on_gone
        self._cond = threading.Condition()
        self._current: Invocation | None = None
        self._delivered = False
        self._closing = False
        self._dead = False  # the process has exited: run() refuses events
        self._server = LoopbackServer(("127.0.0.1", 0), self._handler_class())
        self._server.start(f"runtime-api-{spec.function_name}")
        host, port = self._server.server_address[:2]
        env = {**spec.env, "AWS_LAMBDA_RUNTIME_API": f"{host}:{port}"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "awslambdaric", HANDLER], env=env, cwd=spec.task_root,
            stdin=subprocess.DEVNULL, start_new_session=True)
        if quota is not None and spec.cpus is not None:
            quota.limit(self.process.pid, spec.cpus)
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name=f"sandbox-{self.process.pid}")
        self._supervisor.start()

    # -- the fleet's side ---------------------------------------------------------------------

    def run(self, invocation: Invocation) -> bool:
        """Give the sandbox its next event; False if its process has died meanwhile."""
        with self._cond:
            if self._dead:
                return False
            assert self._current is None, "a sandbox runs one event at a time"
            invocation.assigned_at = time.monotonic()
            self._current = invocation
            self._delivered = False
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """Kill the process; an event it was running ends as a crash."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._kill()
        self._supervisor.join(timeout=5)

    # -- supervision --------------------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            code = self.process.poll()
            if code is not None:
                with self._cond:
                    self._dead = True
                self._finish(Outcome(CRASH, _exit_error(code),
                                     f"sandbox process exited: {_describe_exit(code)}"))
                break
            with self._cond:
                invocation = self._current
                limit = None
                if invocation is not None:
                    limit = invocation.deadline or (invocation.assigned_at + INIT_ALLOWANCE_S
                                                    + self.spec.timeout_s)
                if limit is None or time.monotonic() < limit:
                    self._cond.wait(_SUPERVISE_S)
                    continue
            # Past its deadline: Lambda stops the sandbox and reports a timeout.
            with self._cond:
                self._dead = True
            self._kill()
            self._finish(Outcome(TIMEOUT, {
                "errorType": "Sandbox.Timedout",
                "errorMessage": f"RequestId: {invocation.request_id} Error: Task timed out "
                                f"after {self.spec.timeout_s:.2f} seconds"},
                f"task timed out after {self.spec.timeout_s:g} s"))
            break
        if self._quota is not None:
            self._quota.release(self.process.pid)
        self._server.stop()
        self._on_gone(self)

    def _finish(self, outcome: Outcome) -> None:
        with self._cond:
            invocation, self._current = self._current, None
            if invocation is None or invocation.done:
                return
            invocation.done = True
            self._cond.notify_all()
        invocation.on_done(outcome)

    def _kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("sandbox process %d did not die", self.process.pid)

    # -- the Runtime API ----------------------------------------------------------------------

    def _next(self) -> Invocation | None:
        with self._cond:
            while not self._closing and (self._current is None or self._delivered):
                self._cond.wait(1.0)
            if self._closing:
                return None
            invocation = self._current
            assert invocation is not None
            self._delivered = True
            invocation.deadline = time.monotonic() + self.spec.timeout_s
            return invocation

    def _result(self, request_id: str, kind: str, body: bytes) -> int:
        with self._cond:
            invocation = self._current
            if invocation is None or invocation.request_id != request_id or invocation.done:
                return 400
            invocation.done = True
            self._current = None
            self._cond.notify_all()
        if kind == "response":
            outcome = Outcome(OK)
        else:
            error = _error_json(body)
            outcome = Outcome(ERROR, error, _describe_error(error))
        self._on_idle(self)  # back in the fleet before the caller frees its slot
        invocation.on_done(outcome)
        return 202

    def _init_error(self, body: bytes) -> None:
        error = _error_json(body)
        log.warning("sandbox of %s failed to start: %s", self.spec.function_name, error)
        # The runtime exits next; the invocation ends with this error rather than a bare exit.
        self._finish(Outcome(CRASH, error, _describe_error(error)))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sandbox = self

        class RuntimeAPI(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes = b"{}",
                       headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path != f"{_PREFIX}/invocation/next":
                    self._reply(404)
                    return
                invocation = sandbox._next()
                if invocation is None:
                    self.close_connection = True
                    self._reply(500, b'{"errorMessage": "sandbox closing"}')
                    return
                wall_deadline = time.time() + sandbox.spec.timeout_s
                self._reply(200, invocation.body, {
                    "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                    "Lambda-Runtime-Deadline-Ms": str(int(wall_deadline * 1000)),
                    "Lambda-Runtime-Invoked-Function-Arn": sandbox.spec.function_arn,
                    "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-"
                                               f"{uuid.uuid4().hex[:24]};Sampled=0",
                })

            def do_POST(self) -> None:
                body = read_body(self)
                if self.path == f"{_PREFIX}/init/error":
                    sandbox._init_error(body)
                    self._reply(202)
                    return
                match = _RESULT_PATH.match(self.path)
                if match is None:
                    self._reply(404)
                    return
                self._reply(sandbox._result(match["id"], match["kind"], body))

        return RuntimeAPI


class Fleet:
    """A function's sandboxes: warm ones are reused, new ones started as needed."""

    def __init__(self, spec: SandboxSpec, quota: CpuQuota | None) -> None:
        self.spec = spec
        self._quota = quota
        self._lock = threading.Lock()
        self._idle: list[Sandbox] = []
        self._all: set[Sandbox] = set()
        self._closed = False
        self.cold_starts = 0

    def run(self, invocation: Invocation) -> None:
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("fleet is closed")
                sandbox = self._idle.pop() if self._idle else None
                if sandbox is None:
                    self.cold_starts += 1
            if sandbox is None:
                sandbox = Sandbox(self.spec, self._quota, self._idle_again, self._gone)
                with self._lock:
                    self._all.add(sandbox)
            if sandbox.run(invocation):
                return
            # An idle sandbox whose process died before its supervisor noticed: next one.

    def _idle_again(self, sandbox: Sandbox) -> None:
        with self._lock:
            if not self._closed and sandbox in self._all:
                self._idle.append(sandbox)
                return
        threading.Thread(target=sandbox.close, daemon=True).start()

    def _gone(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._all.discard(sandbox)
            if sandbox in self._idle:
                self._idle.remove(sandbox)

    def close(self) -> None:
        """Stop every sandbox (events still running end as crashes)."""
        with self._lock:
            self._closed = True
            sandboxes = list(self._all)
            self._idle.clear()
        for sandbox in sandboxes:
            sandbox.close()

    def retire(self) -> None:
        """Close idle sandboxes now and busy ones once their event ends (settings changed)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sandbox in idle:
            sandbox.close()


def _exit_error(code: int) -> dict[str, str]:
    return {"errorType": "Runtime.ExitError",
            "errorMessage": f"Error: Runtime exited with error: {_describe_exit(code)}"}


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name.lower().replace("sig", "signal: ", 1)
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def _error_json(body: bytes) -> dict[str, Any]:
    try:
        error = json.loads(body)
    except ValueError:
        error = None
    if not isinstance(error, dict):
        error = {"errorType": "Runtime.Unknown", "errorMessage": body.decode(errors="replace")}
    return error


def _describe_error(error: dict[str, Any]) -> str:
    return f"{error.get('errorType')}: {error.get('errorMessage')}"
