"""The HTTP server the testing endpoints share."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    """A threading HTTP server for busy local endpoints, served from a daemon thread."""

    # The default backlog of 5 resets connections when dozens of invoker threads connect
    # at once, as boto3's pools do on a busy host.
    request_queue_size = 256
    daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self, name: str) -> str:
        threading.Thread(target=self.serve_forever, name=name, daemon=True).start()
        return self.url

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def read_body(request: BaseHTTPRequestHandler) -> bytes:
    """A request's body, sized by Content-Length or sent chunked (as awslambdaric and some
    botocore uploads do)."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            size = int(request.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while request.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    length = int(request.headers.get("Content-Length") or 0)
    return request.rfile.read(length) if length else b""
