"""What the futures tell, in one place: `from lambdafutures import observe`.

    observe.stats_of(future)                     one task's TaskStats
    observe.output_of(future)                    what the task printed (its tail)
    observe.summary(futures)                     counts, percentiles, GB-seconds, cost
    observe.timeline(futures, "timeline.png")    per-task timeline; returns the Figure
    observe.throughput(futures, "gflops.png")    GFLOPS (or tasks/s) over time; the Figure
    observe.progress(as_completed(futures))      a progress bar (tqdm)

matplotlib (the `plots` extra) is imported only when a figure is drawn, tqdm (the
`progress` extra) only when a bar is.
"""

from .cost import summary
from .plots import throughput, timeline
from .progress import progress
from .stats import TaskStats, collect, output_of, stats_of

__all__ = ["TaskStats", "collect", "output_of", "progress", "stats_of", "summary",
           "throughput", "timeline"]
