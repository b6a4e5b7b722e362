"""Observability: the timeline and throughput PNGs, the cost summary, benchmarks/dgemm.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lambdafutures import LambdaExecutor
from lambdafutures.observe import collect, stats_of, summary, throughput, timeline

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent


def _square(x):
    return x * x


def _fail(x):
    raise ValueError(f"bad {x}")


@pytest.fixture(scope="module")
def futures():
    """Six tasks that return and two that raise, on two local workers."""
    with LambdaExecutor(max_workers=2, backend="local") as executor:
        done = [executor.submit(_square, x) for x in range(6)]
        done += [executor.submit(_fail, x) for x in range(2)]
        for future in done:
            future.exception()  # waits; the failures are expected
    return done


def _assert_png(path: Path) -> None:
    assert path.exists()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # a drawn figure, not an empty canvas


def test_timeline_writes_a_png(futures, tmp_path):
    path = tmp_path / "timeline.png"
    assert timeline(futures, path, title="six and two") == str(path)
    _assert_png(path)


@pytest.mark.parametrize("flops", [None, 1e9])
def test_throughput_writes_a_png(futures, tmp_path, flops):
    path = tmp_path / "throughput.png"
    assert throughput(futures, str(path), flops_per_task=flops) == str(path)
    _assert_png(path)


def test_plots_need_futures_with_stats(tmp_path):
    from concurrent.futures import Future

    with pytest.raises(ValueError, match="stats"):
        timeline([Future()], tmp_path / "nothing.png")


def test_plots_without_matplotlib_say_how_to_install_it(futures, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'lambdafutures\[plots\]'"):
        throughput(futures, tmp_path / "no.png")


def test_summary_counts(futures):
    stats = collect(futures)
    assert len(stats) == 8 and all(stats_of(f) is not None for f in futures)
    result = summary(futures)
    assert (result["tasks"], result["ok"], result["error"]) == (8, 6, 2)
    assert result["statuses"] == {"ok": 6, "error": 2}
    assert result["requests"] == 8
    # Two workers, each cold once (unless one of them got every task).
    assert 1 <= result["cold_starts"] <= 2
    assert result["cold_starts"] + result["warm_starts"] == 8
    for phase in ("queue_time", "setup_time", "run_time", "total_time"):
        figures = result[phase]
        assert figures["count"] == 8
        assert 0 <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]
    # Local workers have no memory limit: no GB-seconds, said so, and requests still cost.
    assert result["gb_seconds"] == 0
    assert result["tasks_without_memory_limit"] == 8
    assert result["billed_ms"] > 0
    assert result["cost_usd"]["requests"] == pytest.approx(8 * 0.20 / 1e6)
    assert result["cost_usd"]["total"] == pytest.approx(result["cost_usd"]["requests"])


def test_summary_prices_and_gb_seconds():
    from concurrent.futures import Future

    from lambdafutures.observe.stats import TaskStats, attach

    def task(number, billed_ms, memory_mb, attempt=0):
        future = Future()
        future.set_result(None)
        attach(future, TaskStats(
            task=number, attempt=attempt, calls=1, host_submit=0.0, invoked=0.0,
            job_start=0.1, setup_done=0.2, job_done=1.2, result_received=1.3,
            worker_id="w", cold_start=number == 0, billed_ms=billed_ms,
            memory_limit_mb=memory_mb, peak_memory_mb=50.0, status="ok"))
        return future

    done = [task(0, 1000, 1024), task(1, 2000, 2048, attempt=1), task(2, 500, None)]
    result = summary(done)
    assert result["gb_seconds"] == pytest.approx(1.0 + 4.0)
    assert result["tasks_without_memory_limit"] == 1
    assert result["requests"] == 4  # the retried task was invoked twice
    assert result["cost_usd"]["compute"] == pytest.approx(5.0 * 0.0000166667)
    arm = summary(done, architecture="arm64")
    assert arm["cost_usd"]["compute"] == pytest.approx(5.0 * 0.0000133334)
    custom = summary(done, prices={"gb_second": 1.0, "per_million_requests": 1e6})
    assert custom["cost_usd"] == pytest.approx({"compute": 5.0, "requests": 4.0,
                                                "total": 9.0})
    with pytest.raises(ValueError):
        summary(done, prices={"gb_sec": 1.0})


def test_dgemm_benchmark_runs(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dgemm.py"), "--backend", "local",
         "--n", "64", "--loops", "1", "--tasks", "4", "--workers", "2", "--out", str(out),
         "--compare-ppe"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1  # the JSON line alone on stdout; the table goes to stderr
    record = json.loads(lines[0])
    for key in ("effective_gflops", "peak_gflops_in_flight", "task_gflops_inprocess",
                "gemm_gflops_per_core", "efficiency", "gap_to_gemm_ceiling", "tasks",
                "workers", "wall_s", "backend", "n", "loops", "ppe_efficiency"):
        assert key in record, key
    assert (record["tasks"], record["workers"], record["n"], record["loops"]) == (4, 2, 64, 1)
    assert record["backend"] == "local"
    assert "efficiency" in run.stderr
    for name in ("timeline.png", "gflops.png"):
        _assert_png(out / name)
