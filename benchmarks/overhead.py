"""Per-task overhead: many tiny tasks, then tasks that return 1 MB arrays.

Runs the same tasks, with the same worker count, through

    LambdaExecutor(backend="local")   lambdafutures' local backend
    ProcessPoolExecutor(workers)      the baseline every ratio is taken against
    ThreadPoolExecutor(workers)       no pickling, no processes: a floor for overhead
    Lithops localhost                 when lithops is importable (else skipped, with a note)

Each executor is started and warmed with one round of `workers` no-op tasks first (its
cold start, reported apart), so worker start-up is excluded for all of them alike. Then,
`--repeat` times and in turn across the executors (so that noise from the rest of the
machine falls on all of them alike):

    no-op    `--noop-tasks` calls of a function that returns None
    array    `--array-tasks` calls that each return a fresh `--array-mb` MB numpy array

each as submit() of every task, then result() of every future; the time runs from the
first submit to the last result. Reported per executor and kind (median over repeats):
tasks/s, time to first result (from the first submit until the first future is done) and
tasks/s as a ratio to ProcessPoolExecutor's; also the best round's tasks/s and its ratio,
which other load on the machine disturbs less. One JSON line on stdout, a table on stderr.

    python benchmarks/overhead.py [--noop-tasks 2000] [--array-tasks 200] [--array-mb 1]
                                  [--workers N] [--repeat 5] [--lithops-tasks 20]
                                  [--timeout S] [--only local,ppe,threads,lithops]

`--timeout` gives LambdaExecutor a per-task time limit (the others have none): what the
worker's watchdog costs.
"""

import os

# One BLAS thread everywhere (the local backend's default too): the array tasks only fill
# memory, and the comparison should not depend on how many threads numpy starts.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                  "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402

import lambdafutures  # noqa: E402


def noop():
    return None


def make_array(nbytes):
    # Fresh memory every call (not a shared constant), like a real task's result.
    return np.ones(nbytes // 8, dtype=np.float64)


class LithopsAdapter:
    """Lithops' FunctionExecutor behind submit() / result()."""

    def __init__(self, workers):
        import lithops

        self._fexec = lithops.FunctionExecutor(backend="localhost", storage="localhost",
                                               worker_processes=workers)

    def submit(self, fn, *args):
        return self._fexec.call_async(fn, args)

    def shutdown(self, wait=True):
        self._fexec.clean()


def lithops_missing():
    try:
        import lithops  # noqa: F401
    except ImportError as exc:
        return f"lithops is not importable ({exc}); its row is skipped"
    return None


def run_round(executor, fn, args, tasks):
    """Submit `tasks` calls, then take every result; returns (tasks/s, first result s)."""
    firsts = []
    record = firsts.append
    start = time.perf_counter()
    futures = [executor.submit(fn, *args) for _ in range(tasks)]
    can_callback = hasattr(futures[0], "add_done_callback")
    if can_callback:
        # The first future to end, whichever it is; a callback added to a done future runs
        # at once, so none is missed.
        futures[0].add_done_callback(lambda _: record(time.perf_counter()))
        for future in futures[1:]:
            if firsts:
                break
            future.add_done_callback(lambda _: record(time.perf_counter()))
    for i, future in enumerate(futures):
        future.result()
        if i == 0 and not can_callback:
            record(time.perf_counter())
    end = time.perf_counter()
    return tasks / (end - start), min(firsts) - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noop-tasks", type=int, default=2000)
    parser.add_argument("--array-tasks", type=int, default=200)
    parser.add_argument("--array-mb", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lithops-tasks", type=int, default=20,
                        help="task count for Lithops, which runs a few tasks per second")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of local,ppe,threads,lithops")
    parser.add_argument("--timeout", type=float, default=None,
                        help="per-task time limit for LambdaExecutor only")
    args = parser.parse_args(argv)
    workers = args.workers
    nbytes = int(args.array_mb * 2 ** 20)

    makers = {
        "local": lambda: lambdafutures.LambdaExecutor(workers, backend="local",
                                                      timeout=args.timeout),
        "ppe": lambda: ProcessPoolExecutor(workers),
        "threads": lambda: ThreadPoolExecutor(workers),
        "lithops": lambda: LithopsAdapter(workers),
    }
    notes = []
    names = list(makers) if args.only is None else args.only.split(",")
    if "lithops" in names:
        missing = lithops_missing()
        if missing:
            notes.append(missing)
            names.remove("lithops")

    executors, cold = {}, {}
    try:
        for name in names:
            start = time.perf_counter()
            executor = makers[name]()
            for future in [executor.submit(noop) for _ in range(workers)]:
                future.result()
            cold[name] = time.perf_counter() - start
            executors[name] = executor

        rounds = {name: {"noop": [], "array": []} for name in names}
        for _ in range(args.repeat):
            for name, executor in executors.items():
                scale = args.lithops_tasks if name == "lithops" else None
                rounds[name]["noop"].append(
                    run_round(executor, noop, (), scale or args.noop_tasks))
                rounds[name]["array"].append(
                    run_round(executor, make_array, (nbytes,),
                              min(scale, args.array_tasks) if scale else args.array_tasks))
    finally:
        for executor in executors.values():
            executor.shutdown(wait=True)

    results = {}
    for name in names:
        entry = {"cold_start_s": cold[name]}
        for kind in ("noop", "array"):
            measured = rounds[name][kind]
            entry[f"{kind}_tasks_per_s"] = statistics.median(rate for rate, _ in measured)
            entry[f"{kind}_first_result_s"] = statistics.median(first for _, first in measured)
            entry[f"{kind}_tasks_per_s_best"] = max(rate for rate, _ in measured)
            entry[f"{kind}_tasks_per_s_all"] = [round(rate, 1) for rate, _ in measured]
        results[name] = entry
    if "ppe" in results:
        for entry in results.values():
            for kind in ("noop", "array"):
                entry[f"{kind}_ratio_to_ppe"] = (entry[f"{kind}_tasks_per_s"]
                                                 / results["ppe"][f"{kind}_tasks_per_s"])
                entry[f"{kind}_best_ratio_to_ppe"] = (entry[f"{kind}_tasks_per_s_best"]
                                                      / results["ppe"][f"{kind}_tasks_per_s_best"])

    record = {
        "benchmark": "overhead",
        "workers": workers,
        "noop_tasks": args.noop_tasks,
        "array_tasks": args.array_tasks,
        "array_mb": args.array_mb,
        "repeat": args.repeat,
        "timeout": args.timeout,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "executors": results,
        "notes": notes,
    }

    header = (f"{'executor':<8} {'no-op/s':>9} {'ratio':>6} {'best':>6} {'first ms':>9} "
              f"{'array/s':>8} {'ratio':>6} {'best':>6} {'first ms':>9} {'cold s':>7}")
    print(f"{args.noop_tasks} no-op, {args.array_tasks} x {args.array_mb:g} MB arrays, "
          f"{workers} workers, median of {args.repeat}"
          + ("" if args.timeout is None else f", LambdaExecutor timeout {args.timeout:g} s"),
          file=sys.stderr)
    print(header, file=sys.stderr)
    for name, entry in results.items():
        print(f"{name:<8} {entry['noop_tasks_per_s']:>9.0f} "
              f"{entry.get('noop_ratio_to_ppe', float('nan')):>6.2f} "
              f"{entry.get('noop_best_ratio_to_ppe', float('nan')):>6.2f} "
              f"{entry['noop_first_result_s'] * 1e3:>9.2f} "
              f"{entry['array_tasks_per_s']:>8.0f} "
              f"{entry.get('array_ratio_to_ppe', float('nan')):>6.2f} "
              f"{entry.get('array_best_ratio_to_ppe', float('nan')):>6.2f} "
              f"{entry['array_first_result_s'] * 1e3:>9.2f} {entry['cold_start_s']:>7.2f}",
              file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
