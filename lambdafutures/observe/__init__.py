"""Task stats and what is drawn from them: timeline and throughput PNGs, a cost summary.

matplotlib (the `plots` extra) is imported only when a plot is drawn.
"""

from .cost import summary
from .plots import throughput, timeline
from .stats import TaskStats, collect, stats_of

__all__ = ["TaskStats", "collect", "stats_of", "summary", "throughput", "timeline"]
