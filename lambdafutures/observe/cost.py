"""A summary of a run's task stats: counts, latency percentiles, GB-seconds and cost.

Prices are configuration: pass `prices=` to `summary` to use your region's, or another
architecture's. The defaults are AWS Lambda's published on-demand prices (us-east-1,
first pricing tier).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from .stats import TaskStats, collect

# USD. "gb_second": compute price per GB-second; "per_million_requests": invoke price.
PRICES: dict[str, dict[str, float]] = {
    "x86_64": {"gb_second": 0.0000166667, "per_million_requests": 0.20},
    "arm64": {"gb_second": 0.0000133334, "per_million_requests": 0.20},
}

_PHASES = ("queue_time", "setup_time", "run_time", "total_time")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 to 100) by linear interpolation, as numpy's default; None
    for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _distribution(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def summary(futures: Iterable[Future], prices: Mapping[str, Any] | None = None,
            *, architecture: str = "x86_64") -> dict[str, Any]:
    """Summarise the stats of those futures that have them (done futures of a LambdaExecutor).

    Returns a dict with:
      tasks, ok, error: how many tasks have stats, ended with a result, ended otherwise;
      statuses: the count of each status;
      cold_starts, warm_starts;
      queue_time, setup_time, run_time, total_time: {count, p50, p90, p99, max} in seconds
        (see TaskStats; tasks lacking a phase's stamps are left out of that phase);
      requests: invocations, counting each attempt of a retried task;
      billed_ms: the sum of the tasks' billed durations (the last attempt of each);
      gb_seconds: billed_ms x memory_limit_mb / 1024 / 1000 summed over the tasks whose
        memory limit is known; tasks_without_memory_limit counts the others, which add 0
        (local workers have no memory limit);
      prices: the prices used; cost_usd: {compute, requests, total}.

    `prices` overrides the defaults for `architecture` ("x86_64" or "arm64", see PRICES)
    key by key: {"gb_second": USD per GB-second, "per_million_requests": USD}."""
    if architecture not in PRICES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                         f"{sorted(PRICES)}")
    used = dict(PRICES[architecture])
    unknown = set(prices or {}) - set(used)
    if unknown:
        raise ValueError(f"unknown price keys {sorted(unknown)}; expected {sorted(used)}")
    used.update({key: float(value) for key, value in (prices or {}).items()})

    stats: list[TaskStats] = collect(futures)
    statuses = Counter(s.status for s in stats)
    ok = statuses.get("ok", 0)
    result: dict[str, Any] = {
        "tasks": len(stats),
        "ok": ok,
        "error": len(stats) - ok,
        "statuses": dict(statuses),
        "cold_starts": sum(1 for s in stats if s.cold_start),
        "warm_starts": sum(1 for s in stats if s.cold_start is False),
    }
    for phase in _PHASES:
        values = [getattr(s, phase) for s in stats]
        result[phase] = _distribution([v for v in values if v is not None])

    requests = sum(s.attempt + 1 for s in stats)
    billed_ms = sum(s.billed_ms or 0 for s in stats)
    gb_seconds = sum(s.billed_ms * s.memory_limit_mb / 1024 / 1000 for s in stats
                     if s.billed_ms is not None and s.memory_limit_mb is not None)
    without_limit = sum(1 for s in stats if s.memory_limit_mb is None)
    compute = gb_seconds * used["gb_second"]
    invokes = requests * used["per_million_requests"] / 1e6
    result.update({
        "requests": requests,
        "billed_ms": billed_ms,
        "gb_seconds": gb_seconds,
        "tasks_without_memory_limit": without_limit,
        "architecture": architecture,
        "prices": used,
        "cost_usd": {"compute": compute, "requests": invokes, "total": compute + invokes},
    })
    return result
