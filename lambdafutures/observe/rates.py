"""Throughput figures from task stats, shared by the plots and the benchmarks' JSON lines.

No matplotlib here: benchmarks/dgemm.py computes its numbers with these functions whether
or not it can draw, and the GFLOPS plot draws the same numbers, so the plot's "final"
effective figure and the JSON's `effective_gflops` are one computation.

Times are seconds since `start`: a wall-clock time (`time.time()`) such as the moment the
executor was created; by default, the first task's submit.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from .stats import TaskStats


def start_of(stats: Sequence[TaskStats], start: float | None = None) -> float:
    """The time origin: `start` if given, else the earliest submit."""
    if start is not None:
        return start
    if not stats:
        raise ValueError("no task stats")
    return min(s.host_submit for s in stats)


def end_of(stats: Sequence[TaskStats], start: float | None = None) -> float:
    """Seconds from the origin until the host had the last result."""
    return max(s.result_received for s in stats) - start_of(stats, start)


def completion_rate(stats: Sequence[TaskStats], weight: float, times: Sequence[float],
                    start: float | None = None) -> list[float]:
    """For each time t (seconds since the origin): the work of the successful results the
    host had by t, divided by t. `weight` is the work of one task (1.0 counts tasks)."""
    origin = start_of(stats, start)
    done = sorted(s.result_received - origin for s in stats if s.status == "ok")
    return [weight * bisect.bisect_right(done, t) / t if t > 0 else 0.0 for t in times]


def effective_rate(stats: Sequence[TaskStats], weight: float,
                   start: float | None = None) -> float:
    """Work of the successful results / seconds from the origin to the last result.

    This is the effective curve's last point (computed by the same function), and with
    weight = flops per task it is benchmarks/dgemm.py's `effective_gflops` x 1e9."""
    return completion_rate(stats, weight, [end_of(stats, start)], start)[0]


def step_in_flight(stats: Sequence[TaskStats], weight: float | None = None,
                   start: float | None = None) -> tuple[list[float], list[float]]:
    """The running tasks' combined rate as a step function of time since the origin.

    A task is running from its setup_done to its job_done. With `weight` (work per task,
    e.g. flops), each running task contributes weight / run_time (work per second); without,
    each contributes 1 (the count of tasks running). Returns (times, values) where values[i]
    holds from times[i] until times[i + 1]."""
    if not stats:
        return [0.0], [0.0]
    origin = start_of(stats, start)
    events: list[tuple[float, float]] = []
    for s in stats:
        if s.setup_done is None or s.job_done is None:
            continue
        run = s.job_done - s.setup_done
        if run <= 0:
            continue
        value = 1.0 if weight is None else weight / run
        events.append((s.setup_done - origin, value))
        events.append((s.job_done - origin, -value))
    events.sort()
    times, values = [0.0], [0.0]
    level = 0.0
    for time, change in events:
        level += change
        if times[-1] == time:
            values[-1] = level
        else:
            times.append(time)
            values.append(level)
    values[-1] = 0.0  # guards against float residue after the last task ends
    return times, [max(0.0, v) for v in values]


def binned_max(times: Sequence[float], values: Sequence[float], end: float, bins: int
               ) -> tuple[list[float], list[float]]:
    """A step function's maximum over each of `bins` equal bins of [0, end]: what one pixel
    column would show, without the comb that millisecond dips (one task ending, the next
    starting) draw at full height. Returns (left edges plus end, values plus a final 0)."""
    width = end / bins if end > 0 else 1.0
    peaks = [0.0] * bins
    for i, value in enumerate(values):
        begin = times[i]
        stop = times[i + 1] if i + 1 < len(times) else end
        first = min(bins - 1, max(0, int(begin / width)))
        # A segment ending exactly on a bin edge does not reach into the next bin.
        last = min(bins - 1, max(first, int(math.ceil(stop / width)) - 1))
        for b in range(first, last + 1):
            if value > peaks[b]:
                peaks[b] = value
    edges = [width * b for b in range(bins)] + [width * bins]
    return edges, peaks + [0.0]
