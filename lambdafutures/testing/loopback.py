"""The HTTP server the testing endpoints share."""

import threading
from http.server import ThreadingHTTPServer


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
