"""Figures from task stats: a per-task timeline and throughput over time.

These are the two figures of the seed's (PyWren's) blog post. Each function returns the
matplotlib Figure (a notebook shows it as the cell's value) and, given a path, also writes
it as a PNG. matplotlib is an optional extra (`pip install 'lambdafutures[plots]'`); it is
imported inside the functions, so importing this module costs nothing. The numbers drawn
come from `rates`, which benchmarks use for their JSON lines without matplotlib.

Times on the x axis are seconds since `start` (a `time.time()` value, e.g. when the
executor was created), by default since the first task was submitted.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import rates
from .rates import step_in_flight  # also public here, as before rates.py existed
from .stats import TaskStats, collect

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("lambdafutures")

# Colours (colour-blind friendly: Okabe-Ito).
_SUBMIT = "#999999"
_COLD = "#cc79a7"
_SETUP = "#e69f00"
_RUNNING = "#0072b2"
_DONE = "#003a63"
_EFFECTIVE = "#d55e00"
_RETURNED = "#009e73"
_ERROR = "#cc0000"
_CEILING = "#000000"

# Up to this many tasks, the wait from submit to start is drawn as a hairline; beyond it,
# thousands of hairlines would fill in as the grey triangle the dots replace.
_WAIT_LINES_UP_TO = 100


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython with a kernel attached)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _figure(width: float, height: float, **layout: Any) -> Figure:
    """A Figure that a notebook shows once, as the value returned, and that opens no window
    in a script.

    In a kernel, pyplot makes the figure, which loads the kernel's backend (inline: it
    teaches IPython to show Figure values, with the user's format settings), then lets go
    of it, so the backend does not show it a second time at the end of the cell.
    Elsewhere the figure gets an Agg canvas of its own, without touching the process-wide
    backend or pyplot's list of figures."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "lambdafutures' plots need matplotlib: pip install 'lambdafutures[plots]'"
        ) from exc
    if _in_notebook():
        import matplotlib.pyplot as pyplot

        fig = pyplot.figure(figsize=(width, height), **layout)
        pyplot.close(fig)
        return fig
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(width, height), **layout)
    FigureCanvasAgg(fig)
    return fig


def _stats(futures: Iterable[Future]) -> list[TaskStats]:
    stats = collect(futures)
    if not stats:
        raise ValueError("none of these futures has stats (are they done, and from a "
                         "LambdaExecutor?)")
    return sorted(stats, key=lambda s: (s.host_submit, s.task))


def _save(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), format="png", dpi=120)
        log.debug("wrote %s", os.fspath(path))
    return fig


def _origin_label(start: float | None) -> str:
    return "time since start (s)" if start is not None else "time since first submit (s)"


def timeline(futures: Iterable[Future], path: str | os.PathLike[str] | None = None,
             title: str | None = None, start: float | None = None) -> Figure:
    """One row per task, sorted by submit time (first on top); returns the Figure and,
    given `path`, writes it as a PNG.

    Each row shows thin segments for setup (job start to setup done, the payload load),
    running (setup done to job done) and a cold start (invoke to job start), with dots at
    the submit, the job's end and the result's arrival on the host; failed tasks end in a
    red cross. Up to 100 tasks, a hairline also joins submit and start. Line widths, dot
    sizes and transparency follow the task count, so 1,600 tasks still read as curves
    (when tasks were submitted, started, finished) rather than a filled area."""
    stats = _stats(futures)
    count = len(stats)
    height = min(8.0, max(3.5, 2.0 + 0.25 * count))
    fig = _figure(10, height, layout="constrained")
    from matplotlib.lines import Line2D

    origin = rates.start_of(stats, start)

    def rel(value: float | None) -> float | None:
        return None if value is None else value - origin

    # Row pitch in points (the axes get about height - 2 inches), and what fits in it.
    pitch = 72.0 * max(1.0, height - 2.0) / count
    # Rows thinner than a pixel (1,600 tasks: about 0.5 px each at the PNG's 120 dpi) are
    # drawn 1 pt wide without antialiasing, so neighbours overlap into an even band instead
    # of a moire of stripes; the dots keep a visible minimum size.
    smooth = pitch >= 1.0
    width = max(1.0, min(8.0, 0.7 * pitch))
    dot = max(1.5, min(30.0, (0.9 * pitch) ** 2))  # marker area in points^2
    alpha = 1.0 if count <= 200 else 0.6

    segments: dict[str, tuple[list[int], list[float], list[float]]] = {
        name: ([], [], []) for name in ("waiting", "cold", "setup", "running")}
    dots: dict[str, tuple[list[float], list[int]]] = {
        name: ([], []) for name in ("submit", "done", "returned", "failed")}

    def add(name: str, row: int, begin: float | None, end: float | None) -> None:
        if begin is not None and end is not None and end >= begin:
            ys, begins, ends = segments[name]
            ys.append(row)
            begins.append(begin)
            ends.append(end)

    def mark(name: str, row: int, at: float | None) -> None:
        if at is not None:
            dots[name][0].append(at)
            dots[name][1].append(row)

    for row, s in enumerate(stats):
        submit, job_start = rel(s.host_submit), rel(s.job_start)
        received = rel(s.result_received)
        if count <= _WAIT_LINES_UP_TO:
            add("waiting", row, submit, job_start if job_start is not None else received)
        if s.cold_start and s.invoked is not None:
            add("cold", row, rel(s.invoked), job_start)
        add("setup", row, job_start, rel(s.setup_done))
        add("running", row, rel(s.setup_done), rel(s.job_done))
        mark("submit", row, submit)
        mark("done", row, rel(s.job_done))
        mark("failed" if s.status != "ok" else "returned", row, received)

    ax = fig.subplots()
    handles = []
    phases = [
        ("waiting", _SUBMIT, 0.5, "waiting (submit \u2192 job start)"),
        ("cold", _COLD, width, "cold start (invoke \u2192 job start)"),
        ("setup", _SETUP, width, "setup (job start \u2192 setup done)"),
        ("running", _RUNNING, width, "running (setup done \u2192 job done)"),
    ]
    # One collection per phase: one draw call each, fine for thousands of tasks.
    for name, colour, linewidth, label in phases:
        ys, begins, ends = segments[name]
        if ys:
            ax.hlines(ys, begins, ends, colors=colour, linewidth=linewidth, alpha=alpha,
                      antialiased=smooth, gid=name, zorder=2)
            handles.append(Line2D([0], [0], color=colour, linewidth=4, label=label))
    events = [
        ("submit", _SUBMIT, "o", dot, "submitted"),
        ("done", _DONE, "o", dot, "job done"),
        ("returned", _RETURNED, "o", dot, "result on the host"),
        ("failed", _ERROR, "x", max(12.0, dot * 2), "failed"),
    ]
    for name, colour, marker, size, label in events:
        xs, ys = dots[name]
        if xs:
            ax.scatter(xs, ys, s=size, marker=marker, color=colour,
                       alpha=1.0 if name == "failed" else alpha,
                       linewidths=0 if marker == "o" else 1.0, gid=name, zorder=3)
            if name == "failed":
                label = f"failed ({len(xs)})"
            handles.append(Line2D([0], [0], marker=marker, color=colour, linestyle="none",
                                  markersize=5, label=label))

    ax.set_xlabel(_origin_label(start))
    ax.set_ylabel("task (in submit order)")
    ax.set_ylim(count - 0.5, -0.5)  # first task on top
    ax.set_xlim(left=0)
    if count <= 20:
        ax.set_yticks(range(count))
    ax.grid(axis="x", alpha=0.3)
    cold = sum(1 for s in stats if s.cold_start)
    ax.set_title(title or f"Task timeline: {count} tasks, {cold} cold starts")
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize="small",
               frameon=False)
    return _save(fig, path)


def _effective_curve(stats: Sequence[TaskStats], weight: float, start: float | None,
                     end: float, steps: int) -> tuple[list[float], list[float]]:
    """The effective rate at `steps` even times, just before and at each completion (so
    the sawtooth's peaks are exact), and at `end` itself, the last point: the value
    `rates.effective_rate` gives."""
    origin = rates.start_of(stats, start)
    grid = [end * i / steps for i in range(1, steps)]
    for s in stats:
        t = s.result_received - origin
        grid.extend((t * (1 - 1e-9), t))
    grid = sorted(t for t in grid if t < end) + [end]
    return grid, rates.completion_rate(stats, weight, grid, start)


def throughput(futures: Iterable[Future], path: str | os.PathLike[str] | None = None,
               flops_per_task: float | None = None, title: str | None = None,
               start: float | None = None, ceiling_gflops: float | None = None,
               ceiling_label: str = "ceiling") -> Figure:
    """Throughput over time above the count of running tasks; returns the Figure and,
    given `path`, writes it as a PNG.

    With `flops_per_task`, the upper panel plots GFLOPS: "effective" (flops of the results
    received so far / seconds since `start`; its final value is
    `rates.effective_rate(stats, flops_per_task, start) / 1e9`, what benchmarks/dgemm.py
    reports as effective_gflops), "peak in flight" (sum over the tasks running at each
    instant of flops_per_task / their run time) and, given `ceiling_gflops` (e.g. workers x
    a bare GEMM's GFLOPS per core), that ceiling as a dashed line labelled `ceiling_label`.
    Without, it plots tasks
    completed per second (same definition). The in-flight and running lines show their
    maximum over each of 600 time bins, so the millisecond gaps between one task ending and
    the next starting on a worker do not draw a comb."""
    if ceiling_gflops is not None and flops_per_task is None:
        raise ValueError("ceiling_gflops needs flops_per_task")
    stats = _stats(futures)
    fig = _figure(10, 6.5, layout="constrained")
    end = rates.end_of(stats, start)
    steps = 600
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])

    weight = 1.0 if flops_per_task is None else flops_per_task
    unit = 1.0 if flops_per_task is None else 1e9
    final = rates.effective_rate(stats, weight, start) / unit
    grid, effective = _effective_curve(stats, weight, start, end, steps)
    effective = [value / unit for value in effective]
    peaks = list(effective)
    if flops_per_task is not None:
        top.plot(grid, effective, color=_EFFECTIVE, linewidth=2, gid="effective",
                 label=f"effective: flops of results so far / elapsed "
                       f"(final {final:.2f} GFLOPS)")
        times, flight = step_in_flight(stats, flops_per_task, start)
        times, flight = rates.binned_max(times, [v / unit for v in flight], end, steps)
        top.step(times, flight, where="post", color=_RUNNING, linewidth=1.5,
                 gid="in_flight",
                 label=f"peak in flight: tasks running now (max {max(flight):.2f} GFLOPS)")
        peaks += flight
        if ceiling_gflops is not None:
            top.axhline(ceiling_gflops, color=_CEILING, linestyle="--", linewidth=1.2,
                        gid="ceiling", label=f"{ceiling_label}: {ceiling_gflops:.2f} GFLOPS")
            peaks.append(ceiling_gflops)
        top.set_ylabel("GFLOPS")
        top.set_title(title or f"Throughput: {len(stats)} tasks, "
                               f"{flops_per_task * 1e-9:.3g} GFLOP each")
    else:
        top.plot(grid, effective, color=_EFFECTIVE, linewidth=2, gid="effective",
                 label=f"completed per second: results so far / elapsed "
                       f"(final {final:.2f})")
        top.set_ylabel("tasks completed per second")
        top.set_title(title or f"Throughput: {len(stats)} tasks")
    top.set_ylim(bottom=0, top=max(max(peaks, default=0.0), 1e-9) * 1.15)
    top.grid(alpha=0.3)

    times, running = rates.binned_max(*step_in_flight(stats, start=start), end, steps)
    bottom.fill_between(times, running, step="post", color=_RUNNING, alpha=0.25,
                        linewidth=0)
    bottom.step(times, running, where="post", color=_RUNNING, linewidth=1.2, gid="running",
                label=f"tasks running (max {max(running):.0f})")
    bottom.set_ylabel("tasks running")
    bottom.set_ylim(bottom=0, top=max(1.0, max(running)) * 1.15)
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.grid(alpha=0.3)
    # Below the panels: inside, it would sit on the curves or on the ceiling line.
    lines = top.get_lines() + bottom.get_lines()
    fig.legend(lines, [line.get_label() for line in lines], loc="outside lower center",
               ncol=2, fontsize="small", frameon=False)
    bottom.set_xlabel(_origin_label(start))
    bottom.set_xlim(0, end * 1.02 if end > 0 else 1.0)
    return _save(fig, path)
