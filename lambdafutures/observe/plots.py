"""PNG figures from task stats: a per-task timeline and throughput over time.

These are the two figures of the seed's (PyWren's) blog post. matplotlib is an optional
extra (`pip install 'lambdafutures[plots]'`); it is imported inside the functions, so
importing this module costs nothing.

Times on the x axis are seconds since the first task was submitted.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from .stats import TaskStats, collect

log = logging.getLogger("lambdafutures")

# Colours per phase (colour-blind friendly: Okabe-Ito).
_WAITING = "#c8c8c8"
_COLD = "#d55e00"
_SETUP = "#e69f00"
_RUNNING = "#0072b2"
_RETURNING = "#009e73"
_ERROR = "#cc0000"


def _figure(width: float, height: float, layout: str = "tight") -> Any:
    """A matplotlib Figure drawn by the Agg backend, without touching pyplot's global state
    (so a notebook's or application's own matplotlib backend is left alone)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "lambdafutures' plots need matplotlib: pip install 'lambdafutures[plots]'"
        ) from exc
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _stats(futures: Iterable[Future]) -> list[TaskStats]:
    stats = collect(futures)
    if not stats:
        raise ValueError("none of these futures has stats (are they done, and from a "
                         "LambdaExecutor?)")
    return sorted(stats, key=lambda s: (s.host_submit, s.task))


def _save(fig: Any, path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=120)
    log.debug("wrote %s", path)
    return path


def timeline(futures: Iterable[Future], path: str | os.PathLike[str],
             title: str | None = None) -> str:
    """Draw one row per task (sorted by submit time) and write it as a PNG to `path`.

    Each row shows the task's phases as coloured segments: waiting (host submit to job
    start, with a sandbox's cold start in its own colour), setup (loading the payload),
    running (the function itself) and returning (job done to result received on the host).
    Failed tasks end in a red cross. Returns the path."""
    stats = _stats(futures)
    height = min(12.0, max(3.5, 2.0 + 0.25 * len(stats)))
    fig = _figure(10, height, layout="constrained")
    from matplotlib.lines import Line2D

    t0 = stats[0].host_submit

    def rel(value: float | None) -> float | None:
        return None if value is None else value - t0

    segments: dict[str, tuple[list[int], list[float], list[float]]] = {
        name: ([], [], []) for name in ("waiting", "cold", "setup", "running", "returning")
    }

    def add(name: str, row: int, start: float | None, end: float | None) -> None:
        if start is not None and end is not None and end >= start:
            ys, starts, ends = segments[name]
            ys.append(row)
            starts.append(start)
            ends.append(end)

    failed: tuple[list[int], list[float]] = ([], [])
    for row, s in enumerate(stats):
        submit, start = rel(s.host_submit), rel(s.job_start)
        setup, done, received = rel(s.setup_done), rel(s.job_done), rel(s.result_received)
        if s.cold_start and s.invoked is not None and start is not None:
            # The cold start is the time from handing the event over until the handler ran.
            add("waiting", row, submit, rel(s.invoked))
            add("cold", row, rel(s.invoked), start)
        else:
            add("waiting", row, submit, start if start is not None else received)
        add("setup", row, start, setup)
        add("running", row, setup, done)
        add("returning", row, done if done is not None else start, received)
        if s.status != "ok":
            failed[0].append(row)
            failed[1].append(received)

    ax = fig.subplots()
    # Bars as thick lines: one draw call per phase, fine for thousands of tasks.
    width = max(1.0, min(10.0, 0.6 * 72 * (height - 1.6) / max(1, len(stats))))
    styles = [
        ("waiting", _WAITING, "waiting (submit \u2192 job start)"),
        ("cold", _COLD, "cold start (invoke \u2192 job start)"),
        ("setup", _SETUP, "setup (job start \u2192 setup done)"),
        ("running", _RUNNING, "running (setup done \u2192 job done)"),
        ("returning", _RETURNING, "returning (job done \u2192 result received)"),
    ]
    handles = []
    for name, colour, label in styles:
        ys, starts, ends = segments[name]
        if not ys:
            continue
        ax.hlines(ys, starts, ends, colors=colour, linewidth=width)
        handles.append(Line2D([0], [0], color=colour, linewidth=6, label=label))
    if failed[0]:
        ax.scatter(failed[1], failed[0], marker="x", color=_ERROR, s=30, zorder=3)
        handles.append(Line2D([0], [0], marker="x", color=_ERROR, linestyle="none",
                              label=f"failed ({len(failed[0])})"))

    ax.set_xlabel("time since first submit (s)")
    ax.set_ylabel("task (in submit order)")
    ax.set_ylim(len(stats) - 0.5, -0.5)  # first task on top
    ax.set_xlim(left=0)
    if len(stats) <= 20:
        ax.set_yticks(range(len(stats)))
    ax.grid(axis="x", alpha=0.3)
    cold = sum(1 for s in stats if s.cold_start)
    ax.set_title(title or f"Task timeline: {len(stats)} tasks, {cold} cold starts")
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize="small",
               frameon=False)
    return _save(fig, path)


def step_in_flight(stats: Sequence[TaskStats], weight: float | None = None
                   ) -> tuple[list[float], list[float]]:
    """The running tasks' combined rate as a step function of time since the first submit.

    A task is running from its setup_done to its job_done. With `weight` (work per task,
    e.g. flops), each running task contributes weight / run_time (work per second); without,
    each contributes 1 (the count of tasks running). Returns (times, values) where values[i]
    holds from times[i] until times[i + 1]."""
    if not stats:
        return [0.0], [0.0]
    t0 = min(s.host_submit for s in stats)
    events: list[tuple[float, float]] = []
    for s in stats:
        if s.setup_done is None or s.job_done is None:
            continue
        run = s.job_done - s.setup_done
        if run <= 0:
            continue
        value = 1.0 if weight is None else weight / run
        events.append((s.setup_done - t0, value))
        events.append((s.job_done - t0, -value))
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


def _binned_max(times: list[float], values: list[float], end: float, bins: int
                ) -> tuple[list[float], list[float]]:
    """A step function's maximum over each of `bins` equal bins of [0, end]: what one pixel
    column would show, without the comb that millisecond dips (one task ending, the next
    starting) draw at full height. Returns (left edges plus end, values plus a final 0)."""
    width = end / bins if end > 0 else 1.0
    peaks = [0.0] * bins
    for i, value in enumerate(values):
        start = times[i]
        stop = times[i + 1] if i + 1 < len(times) else end
        first = min(bins - 1, max(0, int(start / width)))
        # A segment ending exactly on a bin edge does not reach into the next bin.
        last = min(bins - 1, max(first, int(math.ceil(stop / width)) - 1))
        for b in range(first, last + 1):
            if value > peaks[b]:
                peaks[b] = value
    edges = [width * b for b in range(bins)] + [width * bins]
    return edges, peaks + [0.0]


def _completion_rate(stats: Sequence[TaskStats], weight: float, grid: list[float]
                     ) -> list[float]:
    """Work completed (results on the host) by each time in grid, per second elapsed."""
    t0 = min(s.host_submit for s in stats)
    done = sorted(s.result_received - t0 for s in stats if s.status == "ok")
    return [weight * bisect.bisect_right(done, t) / t if t > 0 else 0.0 for t in grid]


def throughput(futures: Iterable[Future], path: str | os.PathLike[str],
               flops_per_task: float | None = None, title: str | None = None) -> str:
    """Draw throughput over time and write it as a PNG to `path`.

    With `flops_per_task`, plots GFLOPS: "effective" (flops of the results received so
    far / seconds since the first submit) and "peak in flight" (sum over the tasks
    running at each instant of flops_per_task / their run time). Without, plots tasks
    completed per second (same definition) and the number of tasks running. The in-flight
    line shows its maximum over each of 600 time bins, so the millisecond gaps between one
    task ending and the next starting on a worker do not draw a comb. Returns the path."""
    stats = _stats(futures)
    fig = _figure(10, 5.5, layout="constrained")
    t0 = stats[0].host_submit
    end = max(s.result_received for s in stats) - t0
    steps = 600
    grid = [end * i / steps for i in range(1, steps + 1)]
    # Also evaluate just before and at each completion, so the sawtooth's peaks are exact.
    for s in stats:
        t = s.result_received - t0
        grid.extend((t * (1 - 1e-9), t))
    grid.sort()

    ax = fig.subplots()
    if flops_per_task is not None:
        scale = 1e-9
        effective = [v * scale for v in _completion_rate(stats, flops_per_task, grid)]
        times, flight = step_in_flight(stats, flops_per_task)
        times, flight = _binned_max(times, [v * scale for v in flight], end, steps)
        ax.plot(grid, effective, color=_COLD, linewidth=2,
                label=f"effective: flops of results so far / elapsed "
                      f"(final {effective[-1]:.1f} GFLOPS)")
        ax.step(times, flight, where="post", color=_RUNNING, linewidth=1.5,
                label=f"peak in flight: tasks running now (max {max(flight):.1f} GFLOPS)")
        ax.set_ylabel("GFLOPS")
        ax.set_title(title or f"Throughput: {len(stats)} tasks, "
                              f"{flops_per_task * 1e-9:.3g} GFLOP each")
        lines = ax.get_lines()
    else:
        effective = _completion_rate(stats, 1.0, grid)
        times, flight = _binned_max(*step_in_flight(stats), end, steps)
        ax.plot(grid, effective, color=_COLD, linewidth=2,
                label=f"completed per second: results so far / elapsed "
                      f"(final {effective[-1]:.2f})")
        ax.set_ylabel("tasks completed per second")
        right = ax.twinx()
        right.step(times, flight, where="post", color=_RUNNING, linewidth=1.5,
                   label=f"tasks running (max {max(flight):.0f})")
        right.set_ylabel("tasks running")
        right.set_ylim(bottom=0, top=max(1.0, max(flight)) * 1.15)
        right.yaxis.get_major_locator().set_params(integer=True)
        lines = ax.get_lines() + right.get_lines()
        ax.set_title(title or f"Throughput: {len(stats)} tasks")
    fig.legend(lines, [line.get_label() for line in lines], loc="outside lower center",
               ncol=2, fontsize="small", frameon=False)
    ax.set_xlabel("time since first submit (s)")
    ax.set_xlim(0, end * 1.02 if end > 0 else 1.0)
    top = max([*effective, *(flight if flops_per_task is not None else [])], default=0.0)
    ax.set_ylim(bottom=0, top=max(top, 1e-9) * 1.15)
    ax.grid(alpha=0.3)
    return _save(fig, path)
