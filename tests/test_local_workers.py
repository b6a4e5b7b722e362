"""Local worker processes: they end with their host, the store directories of dead hosts are
removed, their number is sized for the machine, a stuck event is ended on time, and the frames
between host and worker arrive whole."""

from __future__ import annotations

import glob
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import lambdafutures
from lambdafutures.backends.local.pool import WorkerPool
from lambdafutures_handler import frames, protocol


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (nobody may reap an orphan here)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


_HOST = textwrap.dedent("""
    import os, sys, time
    import lambdafutures

    def record_pid_then_sleep(directory):
        with open(os.path.join(directory, str(os.getpid())), "w"):
            pass
        time.sleep(120)

    ex = lambdafutures.LambdaExecutor(max_workers=2, backend="local")
    futures = [ex.submit(record_pid_then_sleep, sys.argv[1]) for _ in range(2)]
    time.sleep(600)  # killed long before
""")


def _store_dirs(pid: int) -> list[str]:
    return [path for parent in {"/dev/shm", tempfile.gettempdir()}
            for path in glob.glob(os.path.join(parent, f"lambdafutures-{pid}-*"))]


def test_workers_end_when_their_host_is_killed(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    host = subprocess.Popen([sys.executable, "-c", _HOST, str(pids)])
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(pids)) < 2:
            assert host.poll() is None, "the host script failed"
            assert time.monotonic() < deadline, "the tasks did not start"
            time.sleep(0.02)
        workers = [int(name) for name in os.listdir(pids)]
        assert _store_dirs(host.pid)
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _running(pid)], "workers outlived their host"
    # The next local backend removes the dead host's store directory.
    lambdafutures.LambdaExecutor(max_workers=1, backend="local").shutdown()
    assert not _store_dirs(host.pid)


def _pid() -> int:
    time.sleep(0.2)
    return os.getpid()


def test_max_workers_beyond_the_machine_runs_fewer_processes(caplog, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # four processes at most
    with caplog.at_level(logging.INFO, logger="lambdafutures"):
        with lambdafutures.LambdaExecutor(max_workers=12, backend="local") as ex:
            futures = [ex.submit(_pid) for _ in range(12)]
            assert sum(f.running() for f in futures) == 12  # in flight as asked
            pids = {f.result(timeout=60) for f in futures}
    assert len(pids) <= 4
    capped = [r for r in caplog.records if "worker processes" in r.getMessage()]
    assert len(capped) == 1 and capped[0].levelno == logging.INFO
    assert "max_workers=12" in capped[0].getMessage()


class _Stall:
    """An event part whose unpickling stalls the worker before the handler (and its own
    timeout watchdog) runs: an event only the pool's deadline can end."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self):
        return time.sleep, (self.seconds,)


def test_a_threaded_pool_ends_a_stuck_event_on_a_warm_worker_on_time():
    failures: queue.SimpleQueue = queue.SimpleQueue()
    pool = WorkerPool(1, timeout=1.0, on_frame=lambda frame: None,
                      on_failure=lambda event, kind, message: failures.put(kind),
                      name="test-wake")
    try:
        pool.invoke({"stall": _Stall(0)})  # not a valid event: reported, worker stays warm
        assert failures.get(timeout=60) == protocol.PROTOCOL
        # The pool's thread now waits with no deadline; this event brings one.
        started = time.monotonic()
        pool.invoke({"stall": _Stall(60)})
        assert failures.get(timeout=20) == protocol.TIMEOUT
        assert time.monotonic() - started < 5
    finally:
        pool.close()


def _send_all(sock: socket.socket, bodies: list[bytes]) -> None:
    for body in bodies:
        frames.send(sock, body)


def test_frames_of_every_size_arrive_whole_and_in_order():
    bodies = [b"", b"x", bytes(range(256)) * 300, b"y" * (3 * 1024 * 1024 + 7),
              *[str(n).encode() for n in range(50)], b"z" * 70_000]
    for reading in ("next", "read"):
        host, worker = socket.socketpair()
        sender = threading.Thread(target=_send_all, args=(host, bodies))
        sender.start()
        reader = frames.FrameReader(worker)
        received: list[bytes] = []
        while len(received) < len(bodies):
            if reading == "next":
                received.append(bytes(reader.next()))
            else:
                received.extend(bytes(body) for body in reader.read())
        sender.join()
        host.close()
        assert received == bodies
        assert reader.next() is None  # end of stream
        worker.close()
