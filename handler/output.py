"""A task's output: what it prints to stdout and stderr, and its logging records.

While a task runs, `sys.stdout` and `sys.stderr` write into one bounded buffer that keeps the
last `limit` characters (a traceback's or a progress line's end is what matters), and a
handler on the root logger writes its records there too. The text returns to the host with
the completion (`lambdafutures.output_of(future)`). On Lambda the output also still goes to
the sandbox's own stdout, that is CloudWatch; a local worker keeps it off the host's terminal,
where the host prints it with a task prefix if asked to (`echo_output=True`).

Only Python-level writes are captured: a C library writing to file descriptor 1 directly
goes to the sandbox's stdout as before.
"""

from __future__ import annotations

import io
import logging
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

DEFAULT_LIMIT = 64 * 1024


class TailBuffer(io.TextIOBase):
    """A text stream that keeps the last `limit` characters written to it, optionally
    copying every write to `tee` as well."""

    def __init__(self, limit: int, tee: TextIO | None = None) -> None:
        self._limit = limit
        self._tee = tee
        self._parts: deque[str] = deque()
        self._size = 0
        self.dropped = 0  # characters that fell off the front

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self._tee is not None:
            try:
                self._tee.write(text)
            except (OSError, ValueError):
                pass  # the sandbox's own stdout is gone; the buffer still has it
        self._parts.append(text)
        self._size += len(text)
        while self._size > self._limit and self._parts:
            extra = self._size - self._limit
            head = self._parts[0]
            if len(head) <= extra:
                self._parts.popleft()
                self._size -= len(head)
                self.dropped += len(head)
            else:
                self._parts[0] = head[extra:]
                self._size -= extra
                self.dropped += extra
        return len(text)

    def flush(self) -> None:
        if self._tee is not None:
            try:
                self._tee.flush()
            except (OSError, ValueError):
                pass

    def text(self) -> str:
        body = "".join(self._parts)
        if self.dropped:
            return f"[... {self.dropped} earlier characters dropped ...]\n{body}"
        return body


class _TaskLogHandler(logging.Handler):
    """One handler on the root logger for the process's life, writing to the running task's
    buffer and to nothing between tasks (adding and removing a handler per task costs more
    than a short task)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer: TailBuffer | None = None
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        buffer = self.buffer
        if buffer is not None:
            try:
                buffer.write(self.format(record) + "\n")
            except Exception:  # noqa: BLE001 - as logging.StreamHandler does
                self.handleError(record)


_handler: _TaskLogHandler | None = None


@contextmanager
def captured(limit: int, tee: bool) -> Iterator[TailBuffer | None]:
    """Capture the task's output while the block runs; yields None when `limit` is 0."""
    global _handler
    if limit <= 0:
        yield None
        return
    if _handler is None:
        _handler = _TaskLogHandler()
        logging.getLogger().addHandler(_handler)
    saved_out, saved_err = sys.stdout, sys.stderr
    buffer = TailBuffer(limit, saved_out if tee else None)
    _handler.buffer = buffer
    sys.stdout = sys.stderr = buffer
    try:
        yield buffer
    finally:
        sys.stdout, sys.stderr = saved_out, saved_err
        _handler.buffer = None
