"""Lambda's CPU share for local sandbox processes, without cgroups.

Lambda gives a sandbox one vCPU of time per 1,769 MB of memory while it shows it 2 CPUs
(up to about 3 GB; 6 at 10 GB): a Linux CFS quota. A two-thread BLAS call at 2,048 MB runs
on 1.16 CPUs' worth of time, and a library that starts one thread per visible CPU pays for
it. `CpuQuota` reproduces that with a supervisor thread: every period (100 ms, as CFS) each
process gets `cpus * period` of CPU time; it is stopped (SIGSTOP) once it has used that and
continued (SIGCONT) at the next period. CPU time is read from /proc (all threads, 10 ms
resolution); what a process overran by between two looks is carried into its next period as
debt, so that its long-run share is exact. Wall-clock time keeps running while a process is
stopped, as Lambda's timeout does under throttling.

Linux only (/proc); elsewhere `CpuQuota.available()` is False and nothing is limited.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("lambdafutures")

MB_PER_VCPU = 1769  # Lambda: one vCPU-second per second at 1,769 MB


def cpu_share(memory_mb: int, cpus: int | None = None) -> float:
    """The CPUs' worth of time Lambda gives a sandbox of `memory_mb`, capped at the CPUs it
    can see (this machine's)."""
    return min(float(cpus or os.cpu_count() or 1), memory_mb / MB_PER_VCPU)


class _Limited:
    __slots__ = ("pid", "cpus", "used", "budget", "stopped")

    def __init__(self, pid: int, cpus: float, used: float, budget: float) -> None:
        self.pid = pid
        self.cpus = cpus
        self.used = used        # CPU seconds at the last look
        self.budget = budget    # CPU seconds left in this period (negative: debt)
        self.stopped = False


class CpuQuota:
    """Duty-cycles registered processes to their CPU share; one thread for all of them."""

    def __init__(self, period_s: float = 0.1, checks_per_period: int = 10) -> None:
        self.period_s = period_s
        self._tick_s = period_s / checks_per_period
        self._ticks_per_period = checks_per_period
        self._clock_ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._lock = threading.Lock()
        self._processes: dict[int, _Limited] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return os.path.exists(f"/proc/{os.getpid()}/stat") and hasattr(signal, "SIGSTOP")

    def limit(self, pid: int, cpus: float) -> None:
        """Hold process `pid` to `cpus` CPUs' worth of time from now on."""
        used = self._cpu_seconds(pid)
        if used is None:
            return  # already gone
        with self._lock:
            self._processes[pid] = _Limited(pid, cpus, used, cpus * self.period_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lambdafutures-cpu-quota",
                                                daemon=True)
                self._thread.start()

    def release(self, pid: int) -> None:
        """Stop limiting `pid` (continuing it if it was stopped)."""
        with self._lock:
            limited = self._processes.pop(pid, None)
        if limited is not None and limited.stopped:
            _signal(pid, signal.SIGCONT)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            limited = list(self._processes.values())
            self._processes.clear()
        for process in limited:
            if process.stopped:
                _signal(process.pid, signal.SIGCONT)

    # -- the supervisor thread ------------------------------------------------------------------

    def _run(self) -> None:
        tick = 0
        next_look = time.monotonic()
        while not self._stopping.is_set():
            next_look += self._tick_s
            tick += 1
            new_period = tick % self._ticks_per_period == 0
            with self._lock:
                processes = list(self._processes.values())
            for process in processes:
                self._look(process, new_period)
            delay = next_look - time.monotonic()
            if delay < 0:  # fell behind (a busy machine): skip, do not catch up in a burst
                next_look = time.monotonic()
                delay = 0
            self._stopping.wait(delay)

    def _look(self, process: _Limited, new_period: bool) -> None:
        used = self._cpu_seconds(process.pid)
        if used is None:
            with self._lock:
                self._processes.pop(process.pid, None)
            return
        process.budget -= used - process.used
        process.used = used
        if new_period:
            # A fresh period's quota; an overrun of the last one is owed (CFS keeps no
            # credit beyond one period, so neither does a process that was idle).
            process.budget = min(process.budget, 0.0) + process.cpus * self.period_s
        if process.budget <= 0 and not process.stopped:
            process.stopped = _signal(process.pid, signal.SIGSTOP)
        elif process.budget > 0 and process.stopped:
            _signal(process.pid, signal.SIGCONT)
            process.stopped = False

    def _cpu_seconds(self, pid: int) -> float | None:
        """User + system CPU time of all of `pid`'s threads, or None once it is gone."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return None
        if fields[0] == b"Z":
            return None
        # Fields after the command name: state is [0], utime [11], stime [12].
        return (int(fields[11]) + int(fields[12])) / self._clock_ticks


def _signal(pid: int, number: int) -> bool:
    try:
        os.kill(pid, number)
        return True
    except (ProcessLookupError, PermissionError):
        return False
