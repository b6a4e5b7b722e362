"""The HTTP server the testing endpoints share."""

from http.server import ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    """A threading HTTP server for busy local endpoints."""

    # The default backlog of 5 resets connections when dozens of invoker threads connect
    # at once, as boto3's pools do on a busy host.
    request_queue_size = 256
    daemon_threads = True
