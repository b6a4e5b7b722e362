"""What the futures' stats tell: `from lambdafutures import stats`.

    stats.stats_of(future)                     one task's TaskStats
    stats.summary(futures)                     counts, percentiles, GB-seconds, cost
    stats.timeline(futures, "timeline.png")    per-task timeline (matplotlib)
    stats.throughput(futures, "gflops.png")    throughput over time (matplotlib)
    stats.progress(as_completed(futures))      a progress bar (tqdm)
"""

from .observe.cost import summary
from .observe.plots import throughput, timeline
from .observe.progress import progress
from .observe.stats import TaskStats, collect, stats_of

__all__ = ["TaskStats", "collect", "progress", "stats_of", "summary", "throughput",
           "timeline"]
