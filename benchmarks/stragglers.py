"""Tail time with and without speculative execution, on the local backend.

Each task sleeps `--task-s`; with probability `--straggle` its worker is slow and it sleeps
`--slow-s` instead (a noisy neighbour; a backup attempt draws again). Stragglers are random,
so each configuration runs `--repeat` times, alternating, and the means are compared.
Prints one JSON line and a short table.

    python benchmarks/stragglers.py --tasks 40 --workers 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from lambdafutures import LambdaExecutor, Speculation


def work(i: int, task_s: float, slow_s: float, straggle: float) -> int:
    time.sleep(slow_s if random.random() < straggle else task_s)
    return i


def run(args: argparse.Namespace, speculation: Speculation | None) -> float:
    started = time.perf_counter()
    with LambdaExecutor(max_workers=args.workers, backend="local",
                        speculation=speculation) as executor:
        n = args.tasks
        results = list(executor.map(work, range(n), [args.task_s] * n, [args.slow_s] * n,
                                    [args.straggle] * n))
    assert results == list(range(n))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--task-s", type=float, default=0.1)
    parser.add_argument("--slow-s", type=float, default=3.0)
    parser.add_argument("--straggle", type=float, default=0.1)
    parser.add_argument("--after", type=float, default=0.5)
    parser.add_argument("--slower-than", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    policy = Speculation(after=args.after, slower_than=args.slower_than)
    runs_without, runs_with = [], []
    for _ in range(args.repeat):
        runs_without.append(run(args, None))
        runs_with.append(run(args, policy))
    without = sum(runs_without) / len(runs_without)
    with_ = sum(runs_with) / len(runs_with)
    print(json.dumps({"benchmark": "stragglers", "tasks": args.tasks, "workers": args.workers,
                      "straggle": args.straggle, "slow_s": args.slow_s,
                      "wall_s_without": without, "wall_s_with": with_,
                      "runs_without": runs_without, "runs_with": runs_with,
                      "speedup": without / with_}))
    print(f"without speculation {without:6.2f} s (mean of {args.repeat})\n"
          f"with speculation    {with_:6.2f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
