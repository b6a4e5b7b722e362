"""A fault-injecting HTTP proxy for the AWS path: between boto3 and moto / the Lambda endpoint.

    proxy = FaultProxy("http://127.0.0.1:5000", [
        Rule("Lambda.Invoke", THROTTLE, probability=0.2),
        Rule("AmazonSQS.ReceiveMessage", DUPLICATE, every=1),
    ]).start()
    LambdaExecutor(backend="aws", endpoint_urls={"lambda": proxy.url, "sqs": proxy.url})
    ...
    proxy.injected  # Counter: faults injected, by kind

Requests are matched by AWS operation: the `X-Amz-Target` header of JSON-protocol services
(`AmazonSQS.SendMessage`, `AmazonSQS.ReceiveMessage`, ...), or "Lambda.Invoke" for
`POST /2015-03-31/functions/{name}/invocations`; any other request (S3's, say) is
"METHOD /path". A rule's operation may be a shell-style pattern: "*", "GET /bucket/*".
A rule fires with a probability (seeded, reproducible) or on every Nth matching request;
for each request the first rule that fires is applied, and what does not fire is forwarded
unchanged. The faults:

    THROTTLE   answer 429 TooManyRequestsException without forwarding (S3: 503 SlowDown)
    ERROR      answer 500 ServiceException (S3: InternalError) (with after=True: forward
               first, so the request took effect but its caller sees a failure)
    RESET      close the connection with a TCP RST, without an answer (after=True: forward
               first)
    DELAY      wait `delay` seconds, then forward
    DUPLICATE  forward a ReceiveMessage and deliver each of its messages twice: again in the
               same response, or with later=True in the next response for the same queue
               (SQS delivery is at-least-once); the copy has a receipt handle of its own
    DROP       answer a SendMessage with success (a MessageId and the body's real MD5) without
               forwarding it: the message is lost

Small on purpose, for tests and benchmarks; not a general HTTP proxy (no TLS, no CONNECT).
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import logging
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlparse

from lambdafutures.testing.loopback import LoopbackServer, read_body

log = logging.getLogger("lambdafutures")

THROTTLE = "throttle"
ERROR = "error"
RESET = "reset"
DELAY = "delay"
DUPLICATE = "duplicate"
DROP = "drop"
FAULTS = (THROTTLE, ERROR, RESET, DELAY, DUPLICATE, DROP)

_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/[^/]+/invocations$")
_REST_JSON = re.compile(r"^[A-Z]+ /\d{4}-\d{2}-\d{2}/")  # Lambda's API: /2015-03-31/...
# A duplicate's receipt handle: the original's plus this mark, as SQS gives each delivery a
# handle of its own. The proxy takes the mark off again when the handle is used to delete.
_DUPLICATE_MARK = "~duplicate"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    """Inject `fault` into requests for `operation` (a pattern), with `probability` or on
    every `every`-th matching request, at most `limit` times (None: no limit)."""

    operation: str
    fault: str
    probability: float = 0.0
    every: int = 0
    delay: float = 0.2
    after: bool = False
    later: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}, not {self.fault!r}")
        if not (self.probability or self.every):
            raise ValueError("a rule needs a probability or every=N")


def operation_of(method: str, path: str, headers: Any) -> str:
    target = headers.get("X-Amz-Target")
    if target:
        return target
    path = urlparse(path).path
    if method == "POST" and _INVOKE_PATH.match(path):
        return "Lambda.Invoke"
    return f"{method} {path}"



class FaultProxy:
    """Forward HTTP requests to `target_url`, injecting faults by `rules`; start() returns
    the proxy. `reset(rules)` puts new rules in place at any time."""

    def __init__(self, target_url: str, rules: list[Rule] | None = None, *, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0, upstream_timeout: float = 70.0) -> None:
        target = urlparse(target_url)
        if target.scheme != "http":
            raise ValueError(f"FaultProxy forwards to http:// targets only, not {target_url}")
        self.target = target
        self.rules = list(rules or [])
        self.upstream_timeout = upstream_timeout
        self.injected: Counter[str] = Counter()   # faults injected, by kind
        self.requests: Counter[str] = Counter()   # requests seen, by operation
        self._seed = seed
        self._random = random.Random(seed)
        self._seen: Counter[int] = Counter()      # matching requests, by rule
        self._fired: Counter[int] = Counter()
        self._held: dict[str, list[dict]] = defaultdict(list)  # late duplicates, by queue
        self._lock = threading.Lock()
        self._server = LoopbackServer((host, port), self._handler_class())

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> FaultProxy:
        self._server.start("fault-proxy")
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self, rules: list[Rule] | None = None, seed: int | None = None) -> None:
        """New rules, counters back to zero, the random sequence started again."""
        with self._lock:
            self.rules = list(rules or [])
            self._random.seed(self._seed if seed is None else seed)
            self.injected.clear()
            self.requests.clear()
            self._seen.clear()
            self._fired.clear()
            self._held.clear()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- deciding -----------------------------------------------------------------------------

    def _choose(self, operation: str) -> Rule | None:
        with self._lock:
            self.requests[operation] += 1
            for number, rule in enumerate(self.rules):
                if not fnmatch.fnmatchcase(operation, rule.operation):
                    continue
                self._seen[number] += 1
                if rule.limit is not None and self._fired[number] >= rule.limit:
                    continue
                if rule.every:
                    fires = self._seen[number] % rule.every == 0
                else:
                    fires = self._random.random() < rule.probability
                if fires:
                    self._fired[number] += 1
                    return rule
        return None

    def _count(self, fault: str, n: int = 1) -> None:
        with self._lock:
            self.injected[fault] += n

    # -- serving ------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects
            disable_nagle_algorithm = True
            upstream: http.client.HTTPConnection | None = None

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("fault proxy: " + format, *args)

            def do_GET(self) -> None:
                proxy._serve(self)

            do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

            def finish(self) -> None:
                if self.upstream is not None:
                    self.upstream.close()
                super().finish()

        return Handler

    def _serve(self, request: Any) -> None:
        body = read_body(request)
        operation = operation_of(request.command, request.path, request.headers)
        rule = self._choose(operation)
        fault = rule.fault if rule is not None else None
        if fault == DELAY:
            self._count(DELAY)
            time.sleep(rule.delay)
        elif fault == THROTTLE:
            self._count(THROTTLE)
            if _is_rest_xml(operation):
                return _reply_xml_error(request, 503, "SlowDown", "Please reduce your rate")
            return _reply_error(request, 429, "TooManyRequestsException", "Rate exceeded")
        elif fault == DROP:
            self._count(DROP)
            return _reply_sent(request, body)
        elif fault in (ERROR, RESET) and not rule.after:
            self._count(fault)
            return _fail(request, fault, operation)
        body, deduplicated = _own_handles(body)
        try:
            status, headers, data = self._forward(request, body)
        except OSError as exc:
            log.warning("fault proxy: %s %s to %s failed: %s", request.command, request.path,
                        self.target.netloc, exc)
            return _reply_error(request, 502, "ServiceException", f"proxy upstream: {exc}")
        if fault in (ERROR, RESET):  # after=True: the request took effect, the answer is lost
            self._count(fault)
            return _fail(request, fault, operation)
        if fault == DUPLICATE and status == 200:
            data = self._duplicate(body, data, rule.later)
        if deduplicated and status == 200:
            data = _report_deleted(data, deduplicated)
        _reply(request, status, data, headers)

    def _forward(self, request: Any, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = self.target.netloc
        for attempt in (1, 2):
            if request.upstream is None:
                request.upstream = http.client.HTTPConnection(
                    self.target.hostname, self.target.port, timeout=self.upstream_timeout)
            try:
                request.upstream.request(request.command, request.path, body=body,
                                         headers=headers)
                response = request.upstream.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive upstream connection the target had closed: once more, afresh.
                request.upstream.close()
                request.upstream = None
                if attempt == 2:
                    raise
                continue
            passed = [(k, v) for k, v in response.getheaders()
                      if k.lower() not in _HOP_BY_HOP
                      or (request.command == "HEAD" and k.lower() == "content-length")]
            return response.status, passed, data
        raise AssertionError("unreachable")

    def _duplicate(self, request_body: bytes, data: bytes, later: bool) -> bytes:
        """Each message of a ReceiveMessage response twice: now, or in the next response for
        the same queue."""
        try:
            queue_url = json.loads(request_body).get("QueueUrl", "")
            document = json.loads(data)
        except ValueError:
            return data
        messages = document.get("Messages") or []
        with self._lock:
            held, self._held[queue_url] = self._held[queue_url], []
            if later:
                self._held[queue_url].extend(
                    dict(m, ReceiptHandle=m["ReceiptHandle"] + _DUPLICATE_MARK)
                    for m in messages)
        copies = held if later else [dict(m, ReceiptHandle=m["ReceiptHandle"] + _DUPLICATE_MARK)
                                     for m in messages]
        if not copies:
            return data
        self._count(DUPLICATE, len(copies))
        document["Messages"] = messages + copies
        return json.dumps(document).encode()


def _own_handles(body: bytes) -> tuple[bytes, list[str]]:
    """A delete request with the duplicates' receipt handles made the originals' again; the
    batch entries left out because their message is deleted by another entry."""
    if _DUPLICATE_MARK.encode() not in body:
        return body, []
    document = json.loads(body)
    if "ReceiptHandle" in document:  # DeleteMessage, ChangeMessageVisibility
        document["ReceiptHandle"] = document["ReceiptHandle"].replace(_DUPLICATE_MARK, "")
        return json.dumps(document).encode(), []
    entries, seen, left_out = [], set(), []
    for entry in document.get("Entries", []):
        handle = entry.get("ReceiptHandle", "").replace(_DUPLICATE_MARK, "")
        if handle in seen:
            left_out.append(entry["Id"])
            continue
        seen.add(handle)
        entries.append(dict(entry, ReceiptHandle=handle))
    document["Entries"] = entries
    return json.dumps(document).encode(), left_out


def _report_deleted(data: bytes, ids: list[str]) -> bytes:
    document = json.loads(data)
    document.setdefault("Successful", []).extend({"Id": id_} for id_ in ids)
    return json.dumps(document).encode()




def _reply(request: Any, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    request.send_response(status)
    for name, value in headers:
        request.send_header(name, value)
    if not (request.command == "HEAD" and any(k.lower() == "content-length" for k, _ in headers)):
        request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(body)


def _reply_error(request: Any, status: int, code: str, message: str) -> None:
    # Both the rest-json (x-amzn-ErrorType) and json (__type) ways of naming the error.
    body = json.dumps({"__type": code, "message": message, "Type": "Service"}).encode()
    _reply(request, status, body, [
        ("Content-Type", "application/x-amz-json-1.0"),
        ("x-amzn-ErrorType", code),
        ("x-amzn-RequestId", str(uuid.uuid4())),
    ])


def _reply_sent(request: Any, body: bytes) -> None:
    """The answer SQS gives a SendMessage that it accepted (MD5 of the body, as it does)."""
    try:
        message_body = json.loads(body).get("MessageBody", "")
    except ValueError:
        message_body = ""
    answer = {"MessageId": str(uuid.uuid4()),
              "MD5OfMessageBody": hashlib.md5(message_body.encode()).hexdigest()}
    _reply(request, 200, json.dumps(answer).encode(), [
        ("Content-Type", "application/x-amz-json-1.0"),
        ("x-amzn-RequestId", str(uuid.uuid4())),
    ])


def _is_rest_xml(operation: str) -> bool:
    """Neither a JSON-protocol target nor a Lambda call: S3, whose errors are XML."""
    return " " in operation and not _REST_JSON.match(operation)


def _reply_xml_error(request: Any, status: int, code: str, message: str) -> None:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>{uuid.uuid4()}</RequestId></Error>")
    _reply(request, status, body.encode(), [("Content-Type", "application/xml")])


def _fail(request: Any, fault: str, operation: str) -> None:
    if fault == ERROR:
        if _is_rest_xml(operation):
            _reply_xml_error(request, 500, "InternalError", "injected by FaultProxy")
        else:
            _reply_error(request, 500, "ServiceException", "injected by FaultProxy")
        return
    # A TCP RST: close at once with SO_LINGER 0, answering nothing.
    request.close_connection = True
    connection: socket.socket = request.connection
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        socket.close(connection.detach())
    except OSError:
        pass
