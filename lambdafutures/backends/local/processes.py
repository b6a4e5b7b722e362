"""Starting, ending and describing local worker processes, and how many a machine runs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading

log = logging.getLogger("lambdafutures")

_BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                          "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

# Like a Lambda sandbox, a worker imports only what is installed: the user's own modules
# reach it by value (serialize.py), so a task that works here also works on Lambda.
_NO_CWD_ON_PATH = ("-P",) if sys.version_info >= (3, 11) else ()

# Local worker processes per CPU at most. Each is a whole interpreter (40-60 MB before the
# task's own data), so `max_workers=500`, natural on Lambda, would start 500 of them and
# exhaust a laptop's memory. Tasks that wait on I/O (the reason to ask for more workers than
# CPUs) still overlap at four per CPU; CPU-bound tasks gain nothing past one.
PROCESSES_PER_CPU = 4


# Send buffer asked for on each end of a worker's socket (a limit, not an allocation): large
# enough to hold an inline event whole while the worker is busy (Linux grants up to
# net.core.wmem_max, 208 KiB by default; macOS up to 8 MiB where its default is 8 KiB).
_SOCKET_BUFFER = 1024 * 1024


def process_cap() -> int:
    """The most worker processes the local backend runs on this machine."""
    return PROCESSES_PER_CPU * (os.cpu_count() or 1)


def worker_env(blas_threads: int | None, extra: dict[str, str | None] | None) -> dict[str, str]:
    """The host's environment, `blas_threads` BLAS threads per worker, and `extra` on top (a
    None value removes a variable)."""
    env = dict(os.environ)
    if blas_threads is not None:
        for variable in _BLAS_THREAD_VARIABLES:
            env[variable] = str(blas_threads)
    return with_changes(env, extra)


def with_changes(env: dict[str, str], changes: dict[str, str | None] | None) -> dict[str, str]:
    """`env` with `changes` applied: a None value removes that variable."""
    for name, value in (changes or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# A fork elsewhere in the host (a ProcessPoolExecutor's, os.fork) while a worker starts would
# hand the child Popen's internal pipe and the worker's socket: Popen would then wait for
# that child to exit, and shutdown() with it. A fork waits for a start in progress instead.
# (Re-entrant: Popen itself forks without running these hooks, but need not be trusted to.)
_starting = threading.RLock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_starting.acquire, after_in_parent=_starting.release,
                        after_in_child=_starting.release)


def start_worker(timeout: float | None,
                 env: dict[str, str]) -> tuple[subprocess.Popen, socket.socket]:
    """Start a worker process; returns it and the host's end of its socket. Returns as soon
    as the process exists: the worker's interpreter starts meanwhile, and an event sent
    before it is ready waits in the socket."""
    with _starting:
        return _start_worker(timeout, env)


def _start_worker(timeout: float | None,
                  env: dict[str, str]) -> tuple[subprocess.Popen, socket.socket]:
    host_end, worker_end = socket.socketpair()
    for end in (host_end, worker_end):
        try:
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        except OSError:
            pass  # the system's default, then: `hold_limit` adapts
    try:
        process = subprocess.Popen(
            [sys.executable, *_NO_CWD_ON_PATH, "-m", "lambdafutures_handler.local_worker",
             str(worker_end.fileno()), "none" if timeout is None else repr(timeout),
             str(os.getpid())],
            pass_fds=(worker_end.fileno(),), env=env, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the host, which then stops its workers
        )
    except BaseException:
        host_end.close()
        raise
    finally:
        worker_end.close()
    log.debug("started worker process %d", process.pid)
    return process, host_end


def hold_limit(sock: socket.socket) -> int:
    """The largest event that may wait in `sock` while its worker is busy: one that the
    socket's buffer holds whole, so that sending it never blocks. A quarter of what the
    system reports: Linux reports twice the size asked for, and counts its bookkeeping."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4


def kill(process: subprocess.Popen) -> None:
    try:
        process.kill()
    except ProcessLookupError:
        pass
    process.wait()


def describe_exit(process: subprocess.Popen) -> str:
    """How a worker whose socket closed ended (killing it, if it has not within 5 s)."""
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        kill(process)
        code = process.returncode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker process {process.pid} was killed by {name}"
    return f"worker process {process.pid} exited with code {code}"
