"""Per-task overhead of the local backend, side by side with ProcessPoolExecutor.

Every row runs the same tasks, with the same worker count, through

    lf      LambdaExecutor(workers, backend="local")
    fork    ProcessPoolExecutor(workers, mp_context=fork): ratios are taken against it
    spawn   ProcessPoolExecutor(workers, mp_context=spawn): cold and memory rows only, unless
            --warm-executors names it
    threads ThreadPoolExecutor(workers): a floor (no pickling, no processes), only if asked

in the same process, `--rounds` times, the executors in turn within each round (in a rotated
order, so that noise from the rest of the machine falls on all of them alike); each figure is
the median over rounds.

Throughput rows run on one warm executor per kind (started and given one round of no-ops
first); the time runs from the first submit to the last result:

    noop_submit      --noop-tasks no-op calls, submit() each, then result() each
    noop_map         the same calls through map()
    map_chunk250     --chunk-tasks no-op calls through map(chunksize=250)
    arg_<size>       --arg-tasks calls taking one argument of <size> bytes (--arg-sizes; one
                     shared object, random bytes, or a numpy array with --arg-kind numpy),
                     each returning len()
    result_1MB       --result-tasks calls each returning a fresh 1 MB numpy array

Also, per row: host CPU per task (this process) and worker CPU per task (every process
descended from this one, from /proc), in microseconds.

Cold rows, a new executor every round (its shutdown not timed):

    first_result     from before the constructor to the first of two concurrent no-ops' result
    second_result    ... to the second one's result (does it wait for another cold worker?)
    cold_map_chunk250  from before the constructor to the last result of map() of
                     --noop-tasks no-op calls with chunksize=250 (a short script's whole run)

Memory row, in a fresh subprocess per executor and round (so no earlier row's heap counts):

    pending_rss      both workers held busy, then 500 tasks submitted sharing one 1 MB
                     argument: growth of the host's RSS in MB, 0.5 s after the last submit

Each row's `ratio` is lambdafutures against ProcessPoolExecutor(fork) measured in the same
run, oriented so that >= 1 means lambdafutures is at least as good: tasks/s lf / PPE for
throughput rows, PPE / lf for time and memory rows (memory floored at 1 MB each side).
One JSON line on stdout, a Markdown table on stderr. `--quick` fits in about a minute.

    python benchmarks/overhead.py [--quick] [--rounds 5] [--workers 2]
        [--executors lf,fork,spawn] [--rows noop_submit,...] [--noop-tasks 2000]
        [--chunk-tasks 20000]
        [--arg-tasks 200] [--arg-sizes 1K,100K,1M,10M] [--arg-kind bytes|numpy]
        [--result-tasks 200] [--pending-tasks 500] [--timeout S]

Works against older lambdafutures versions too (it only uses LambdaExecutor(n,
backend="local"), submit, map with chunksize and shutdown).
"""

import os

# One BLAS thread everywhere (the local backend's default too): the comparison should not
# depend on how many threads numpy starts.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                  "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402

import lambdafutures  # noqa: E402

THROUGHPUT_ROWS = ("noop_submit", "noop_map", "map_chunk250", "arg", "result_1MB")
COLD_ROWS = ("first_result", "second_result", "cold_map_chunk250")
ALL_ROWS = THROUGHPUT_ROWS + COLD_ROWS + ("pending_rss",)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- tasks (module level: they travel by reference to PPE's workers) ---------------------------

def noop():
    return None


def noop_one(_):
    return None


def length(data):
    return len(data)


def make_array(nbytes):
    # Fresh memory every call (not a shared constant), like a real task's result.
    return np.ones(nbytes // 8, dtype=np.float64)


def wait_for_file(path, limit_s):
    # Holds a worker busy until the parent creates `path` (bounded, should the parent die).
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


# -- measuring ----------------------------------------------------------------------------------

def make_executor(kind, workers, timeout):
    if kind == "lf":
        if timeout is None:
            return lambdafutures.LambdaExecutor(workers, backend="local")
        return lambdafutures.LambdaExecutor(workers, backend="local", timeout=timeout)
    if kind in ("fork", "spawn"):
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(kind))
    if kind == "threads":
        return ThreadPoolExecutor(workers)
    raise ValueError(f"unknown executor {kind!r}")


def descendants_cpu_s():
    """CPU seconds (user + system) of every live process descended from this one."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    mine, total, grew = {os.getpid()}, 0, True
    while grew:
        grew = False
        for pid, (ppid, ticks) in parents.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                total += ticks
                grew = True
    return total / CLOCK_TICKS


def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(executor, tasks, run):
    """Run `run(executor)`; tasks/s, host and worker CPU per task in microseconds."""
    host0, workers0 = time.process_time(), descendants_cpu_s()
    start = time.perf_counter()
    run(executor)
    wall = time.perf_counter() - start
    host, workers = time.process_time() - host0, descendants_cpu_s() - workers0
    return {"value": tasks / wall, "host_cpu_us": host / tasks * 1e6,
            "worker_cpu_us": workers / tasks * 1e6}


def throughput_rows(args):
    """name -> (task count, run(executor)) for the warm-executor rows asked for."""
    rows = {}
    n = args.noop_tasks
    if "noop_submit" in args.rows:
        rows["noop_submit"] = (n, lambda ex: [f.result() for f in
                                              [ex.submit(noop) for _ in range(n)]])
    if "noop_map" in args.rows:
        rows["noop_map"] = (n, lambda ex: list(ex.map(noop_one, range(n))))
    if "map_chunk250" in args.rows:
        c = args.chunk_tasks
        rows["map_chunk250"] = (c, lambda ex: list(ex.map(noop_one, range(c), chunksize=250)))
    if "arg" in args.rows:
        for label in args.arg_sizes.split(","):
            size = parse_size(label)
            data = (np.frombuffer(os.urandom(size), dtype=np.uint8) if args.arg_kind == "numpy"
                    else os.urandom(size))
            count = args.arg_tasks

            def run(ex, data=data, count=count):
                futures = [ex.submit(length, data) for _ in range(count)]
                assert all(f.result() == len(data) for f in futures)

            rows[f"arg_{label}"] = (count, run)
    if "result_1MB" in args.rows:
        m = args.result_tasks
        rows["result_1MB"] = (m, lambda ex: [f.result() for f in
                                             [ex.submit(make_array, 2 ** 20) for _ in range(m)]])
    return rows


def cold_map(kind, workers, timeout, tasks):
    start = time.perf_counter()
    executor = make_executor(kind, workers, timeout)
    try:
        list(executor.map(noop_one, range(tasks), chunksize=250))
        return time.perf_counter() - start
    finally:
        executor.shutdown(wait=True)


def cold_round(kind, workers, timeout):
    start = time.perf_counter()
    executor = make_executor(kind, workers, timeout)
    try:
        first, second = executor.submit(noop), executor.submit(noop)
        first.result()
        first_s = time.perf_counter() - start
        second.result()
        second_s = time.perf_counter() - start
    finally:
        executor.shutdown(wait=True)
    return first_s, second_s


def pending_rss_probe(kind, workers, tasks, timeout):
    """In this (fresh) process: host RSS growth, MB, from `tasks` pending calls sharing one
    1 MB argument while every worker is held busy."""
    shared = os.urandom(2 ** 20)
    executor = make_executor(kind, workers, timeout)
    with tempfile.TemporaryDirectory() as scratch:
        release = os.path.join(scratch, "release")
        try:
            [f.result() for f in [executor.submit(noop) for _ in range(workers)]]  # warm
            blockers = [executor.submit(wait_for_file, release, 60) for _ in range(workers)]
            time.sleep(0.3)  # the blockers reach the workers
            before = rss_mb()
            pending = [executor.submit(length, shared) for _ in range(tasks)]
            time.sleep(0.5)  # background threads (signing, storing, feeding) catch up
            after = rss_mb()
            open(release, "w").close()
            for future in blockers + pending:
                future.result()
        finally:
            open(release, "a").close()
            executor.shutdown(wait=True)
    return after - before


def run_pending_rss(kind, args):
    command = [sys.executable, os.path.abspath(__file__), "--rss-probe", kind,
               "--workers", str(args.workers), "--pending-tasks", str(args.pending_tasks)]
    if args.timeout is not None:
        command += ["--timeout", str(args.timeout)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def git_commit(path):
    """HEAD of the checkout the library came from, "+dirty" if its tree has changes."""
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--",
                                "../lambdafutures", "../handler"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def parse_size(label):
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    label = label.upper().removesuffix("B")
    return int(float(label[:-1]) * units[label[-1]]) if label[-1] in units else int(label)


# -- the run ------------------------------------------------------------------------------------

def measure(args):
    kinds = args.executors.split(",")
    samples = {}  # row -> kind -> list of dicts with "value" (and CPU figures)

    def add(row, kind, sample):
        samples.setdefault(row, {}).setdefault(kind, []).append(sample)

    warm_kinds = [kind for kind in args.warm_executors.split(",") if kind in kinds]
    warm, rows = {}, {}
    if any(r in args.rows for r in THROUGHPUT_ROWS):
        rows = throughput_rows(args)
        # ProcessPoolExecutor(fork) forks all its workers at its first submit: do that before
        # LambdaExecutor starts threads. A fork while its pool's thread is inside Popen gives
        # the forked worker the write end of Popen's exec-status pipe, and Popen then waits
        # for that worker to exit (seen here: shutdown() hung joining that thread).
        for kind in sorted(warm_kinds, key=lambda kind: kind == "lf"):
            warm[kind] = make_executor(kind, args.workers, args.timeout)
            [f.result() for f in [warm[kind].submit(noop) for _ in range(args.workers * 4)]]
    try:
        for round_number in range(args.rounds):
            order = kinds[round_number % len(kinds):] + kinds[:round_number % len(kinds)]
            for row, (tasks, run) in rows.items():
                for kind in order:
                    if kind in warm:
                        add(row, kind, timed(warm[kind], tasks, run))
            if "first_result" in args.rows or "second_result" in args.rows:
                for kind in order:
                    first_s, second_s = cold_round(kind, args.workers, args.timeout)
                    add("first_result", kind, {"value": first_s * 1e3})
                    add("second_result", kind, {"value": second_s * 1e3})
            if "cold_map_chunk250" in args.rows:
                for kind in order:
                    add("cold_map_chunk250", kind, {"value": 1e3 * cold_map(
                        kind, args.workers, args.timeout, args.noop_tasks)})
            if "pending_rss" in args.rows and round_number < args.rss_rounds:
                for kind in order:
                    add("pending_rss", kind, {"value": run_pending_rss(kind, args)})
    finally:
        for executor in warm.values():
            executor.shutdown(wait=True)
    return samples


UNITS = {"first_result": "ms", "second_result": "ms", "cold_map_chunk250": "ms",
         "pending_rss": "MB"}


def summarise(samples):
    figures = {}
    for row, by_kind in samples.items():
        unit = UNITS.get(row, "tasks/s")
        entry = {"unit": unit}
        for kind, values in by_kind.items():
            entry[kind] = statistics.median(v["value"] for v in values)
            entry[f"{kind}_all"] = [round(v["value"], 2) for v in values]
            for cpu in ("host_cpu_us", "worker_cpu_us"):
                if cpu in values[0]:
                    entry[f"{kind}_{cpu}"] = statistics.median(v[cpu] for v in values)
        if "lf" in entry and "fork" in entry:
            lf, ppe = entry["lf"], entry["fork"]
            if unit == "tasks/s":
                entry["ratio"] = lf / ppe
            elif unit == "MB":
                entry["ratio"] = max(ppe, 1.0) / max(lf, 1.0)
            else:
                entry["ratio"] = ppe / lf
        figures[row] = entry
    return figures


def markdown(figures, kinds):
    names = {"lf": "lambdafutures", "fork": "PPE fork", "spawn": "PPE spawn",
             "threads": "threads"}
    head = ["row", "unit"] + [names[k] for k in kinds] + ["ratio (>=1: lf as good)",
                                                          "CPU us/task host+workers lf / fork"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, entry in figures.items():
        cells = [row, entry["unit"]]
        cells += [f"{entry[k]:,.1f}" if k in entry else "-" for k in kinds]
        cells.append(f"{entry['ratio']:.2f}" if "ratio" in entry else "-")
        if "lf_host_cpu_us" in entry and "fork_host_cpu_us" in entry:
            cells.append(f"{entry['lf_host_cpu_us']:.0f}+{entry['lf_worker_cpu_us']:.0f} / "
                         f"{entry['fork_host_cpu_us']:.0f}+{entry['fork_worker_cpu_us']:.0f}")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts and 3 rounds: about a minute")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 3)")
    parser.add_argument("--rss-rounds", type=int, default=None,
                        help="rounds of the subprocess memory row (default 3, --quick: 1)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executors", default="lf,fork,spawn")
    parser.add_argument("--warm-executors", default="lf,fork,threads",
                        help="those of --executors that run the throughput rows (a warm "
                             "spawn pool runs as a fork one does)")
    parser.add_argument("--rows", default=",".join(ALL_ROWS),
                        help="comma-separated subset of " + ",".join(ALL_ROWS))
    parser.add_argument("--noop-tasks", type=int, default=None, help="default 2000")
    parser.add_argument("--chunk-tasks", type=int, default=20000)
    parser.add_argument("--arg-tasks", type=int, default=None, help="default 200 (--quick: 40)")
    parser.add_argument("--arg-sizes", default="1K,100K,1M,10M")
    parser.add_argument("--arg-kind", choices=("bytes", "numpy"), default="bytes")
    parser.add_argument("--result-tasks", type=int, default=None, help="default 200")
    parser.add_argument("--pending-tasks", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=None,
                        help="per-task time limit for LambdaExecutor only")
    parser.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_probe:
        print(pending_rss_probe(args.rss_probe, args.workers, args.pending_tasks, args.timeout))
        return 0
    quick = args.quick
    args.rounds = args.rounds or (3 if quick else 5)
    args.rss_rounds = args.rss_rounds if args.rss_rounds is not None else (1 if quick else 3)
    args.noop_tasks = args.noop_tasks or 2000
    args.arg_tasks = args.arg_tasks or (40 if quick else 200)
    args.result_tasks = args.result_tasks or (100 if quick else 200)
    args.rows = args.rows.split(",")

    load_before = os.getloadavg()
    start = time.perf_counter()
    figures = summarise(measure(args))
    kinds = args.executors.split(",")
    record = {
        "benchmark": "overhead",
        "lambdafutures_version": getattr(lambdafutures, "__version__", None),
        "lambdafutures_path": os.path.dirname(lambdafutures.__file__),
        "lambdafutures_commit": git_commit(os.path.dirname(lambdafutures.__file__)),
        "workers": args.workers, "rounds": args.rounds, "rss_rounds": args.rss_rounds,
        "noop_tasks": args.noop_tasks, "arg_tasks": args.arg_tasks,
        "arg_kind": args.arg_kind, "result_tasks": args.result_tasks,
        "pending_tasks": args.pending_tasks, "timeout": args.timeout, "quick": quick,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "seconds": time.perf_counter() - start,
        "rows": figures,
    }
    print(f"{args.workers} workers, median of {args.rounds} rounds "
          f"(memory: {args.rss_rounds}), load {load_before[0]:.2f} -> "
          f"{os.getloadavg()[0]:.2f}, {record['seconds']:.0f} s", file=sys.stderr)
    print(markdown(figures, kinds), file=sys.stderr)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
