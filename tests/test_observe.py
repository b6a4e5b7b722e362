"""Observability: the timeline and throughput figures, the cost summary, benchmarks/dgemm.py."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

from lambdafutures import LambdaExecutor
from lambdafutures.observe import collect, stats_of, summary, throughput, timeline
from lambdafutures.observe.stats import TaskStats, attach

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402

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


def _artists(fig, gid: str) -> list:
    return fig.findobj(lambda artist: artist.get_gid() == gid)


def synthetic(count: int, workers: int, run_s: float = 10.0, seed: int = 0
              ) -> tuple[list[Future], float]:
    """Done futures with the stats of `count` tasks submitted at 600/s to `workers`
    sandboxes (each cold once), with a few stragglers and failures; and the time the
    executor would have been created."""
    rng = random.Random(seed)
    created = 1_700_000_000.0
    free_at = [created] * workers
    futures = []
    for task in range(count):
        submit = created + 0.2 + task / 600
        worker = min(range(workers), key=free_at.__getitem__)
        cold = task < workers
        job_start = max(submit, free_at[worker]) + (rng.uniform(0.4, 1.5) if cold else 0.02)
        setup_done = job_start + (0.3 if cold else 0.04)
        job_done = setup_done + rng.gauss(run_s, run_s / 10) * (3 if rng.random() < 0.01 else 1)
        free_at[worker] = job_done + 0.01
        future = Future()
        future.set_result(None)
        attach(future, TaskStats(
            task=task, attempt=0, calls=1, host_submit=submit, invoked=submit + 0.01,
            job_start=job_start, setup_done=setup_done, job_done=job_done,
            result_received=job_done + rng.uniform(0.05, 0.3), worker_id=str(worker),
            cold_start=cold, billed_ms=None, memory_limit_mb=None, peak_memory_mb=None,
            status="error" if rng.random() < 0.005 else "ok"))
        futures.append(future)
    return futures, created


def test_timeline_returns_the_figure_and_writes_a_png(futures, tmp_path):
    path = tmp_path / "timeline.png"
    fig = timeline(futures, path, title="six and two")
    assert isinstance(fig, Figure)
    assert fig.axes[0].get_title() == "six and two"
    _assert_png(path)
    assert _artists(fig, "running") and _artists(fig, "submit")
    assert len(_artists(fig, "failed")[0].get_offsets()) == 2
    assert _artists(fig, "waiting")  # few tasks: hairlines from submit to start


@pytest.mark.parametrize("flops", [None, 1e9])
def test_throughput_returns_the_figure_and_writes_a_png(futures, tmp_path, flops):
    path = tmp_path / "throughput.png"
    fig = throughput(futures, str(path), flops_per_task=flops)
    assert isinstance(fig, Figure)
    _assert_png(path)
    assert _artists(fig, "effective") and _artists(fig, "running")


def test_figures_without_a_path_write_nothing(futures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isinstance(timeline(futures), Figure)
    assert isinstance(throughput(futures), Figure)
    assert list(tmp_path.iterdir()) == []


def test_gflops_plot_has_the_ceiling_and_the_running_count():
    done, created = synthetic(count=40, workers=4, run_s=1.0)
    fig = throughput(done, flops_per_task=2e9, start=created, ceiling_gflops=7.5)
    (ceiling,) = _artists(fig, "ceiling")
    assert set(ceiling.get_ydata()) == {7.5}
    assert "7.50 GFLOPS" in ceiling.get_label()
    (running,) = _artists(fig, "running")
    assert max(running.get_ydata()) == 4  # four workers, each running one task at a time
    assert _artists(fig, "in_flight")
    with pytest.raises(ValueError, match="flops_per_task"):
        throughput(done, ceiling_gflops=7.5)


def _load_dgemm():
    spec = importlib.util.spec_from_file_location("dgemm", ROOT / "benchmarks" / "dgemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gflops_plot_final_figure_is_the_json_effective_gflops():
    dgemm = _load_dgemm()
    done, created = synthetic(count=60, workers=8, run_s=2.0, seed=3)
    flops = 3 * 2.0 * 2048 ** 3
    fields = dgemm.throughput_fields(collect(done), flops, created)
    fig = throughput(done, flops_per_task=flops, start=created)
    (effective,) = _artists(fig, "effective")
    assert effective.get_ydata()[-1] == fields["effective_gflops"]  # exactly, same function
    assert f"final {fields['effective_gflops']:.2f} GFLOPS" in effective.get_label()
    assert effective.get_xdata()[-1] == fields["wall_s"]
    # Counted from the executor's creation, not from the first submit (0.2 s later).
    later = throughput(done, flops_per_task=flops)
    assert _artists(later, "effective")[0].get_ydata()[-1] > fields["effective_gflops"]


def test_timeline_of_1600_tasks_draws_dots_and_thin_lines(tmp_path):
    done, created = synthetic(count=1600, workers=400)
    path = tmp_path / "timeline-1600.png"
    fig = timeline(done, path)
    _assert_png(path)
    # No hairline per wait (1,600 of them fill in as a grey triangle): a dot per submit.
    assert not _artists(fig, "waiting")
    assert len(_artists(fig, "submit")[0].get_offsets()) == 1600
    (running,) = _artists(fig, "running")
    assert len(running.get_segments()) == 1600
    assert max(running.get_linewidths()) <= 1.0
    assert fig.axes[0].get_legend() is None and fig.legends  # the legend sits below


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
    assert record["blas_threads"] == 1  # what the local workers ran with
    for name in ("timeline.png", "gflops.png"):
        _assert_png(out / name)
    assert record["timeline_png"] == str(out / "timeline.png")


def test_dgemm_benchmark_without_matplotlib_still_prints_its_json_line(tmp_path):
    hidden = tmp_path / "hide"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text(
        "raise ImportError('matplotlib hidden by the test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden), env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dgemm.py"), "--backend", "local",
         "--n", "32", "--loops", "1", "--tasks", "2", "--workers", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    (line,) = run.stdout.strip().splitlines()
    record = json.loads(line)
    assert record["tasks"] == 2 and record["effective_gflops"] > 0
    assert record["timeline_png"] is None and record["gflops_png"] is None
    assert "plots skipped" in run.stderr
    assert not out.exists()


def test_a_notebook_shows_each_returned_figure_once(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    setup = (
        "from concurrent.futures import Future\n"
        "from lambdafutures.observe import throughput, timeline\n"
        "from lambdafutures.observe.stats import TaskStats, attach\n"
        "done = []\n"
        "for i in range(30):\n"
        "    f = Future(); f.set_result(i)\n"
        "    attach(f, TaskStats(task=i, attempt=0, calls=1, host_submit=100 + i / 100,\n"
        "        invoked=None, job_start=100.5 + i / 10, setup_done=100.6 + i / 10,\n"
        "        job_done=101 + i / 10, result_received=101.1 + i / 10, worker_id='w',\n"
        "        cold_start=i == 0, billed_ms=None, memory_limit_mb=None,\n"
        "        peak_memory_mb=None, status='ok'))\n"
        "    done.append(f)\n")
    cells = [setup, "timeline(done)",
             f"fig = throughput(done, {str(tmp_path / 'g.png')!r}, flops_per_task=1e9)\nfig",
             "import os\nos.path.exists(" + repr(str(tmp_path / "g.png")) + ")"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    for cell in notebook.cells[1:3]:
        images = [output for output in cell.outputs if "image/png" in output.get("data", {})]
        assert len(images) == 1, cell.outputs  # the returned Figure, not a second copy
    assert notebook.cells[3].outputs[0]["data"]["text/plain"] == "True"
