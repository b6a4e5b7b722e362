"""The progress helper wraps as_completed and map loops without changing what they yield."""

from __future__ import annotations

import io
from concurrent.futures import as_completed

from tasks import fail_at

from lambdafutures import LambdaExecutor, observe


def test_progress_counts_every_future_and_the_failed_ones():
    out = io.StringIO()
    with LambdaExecutor(max_workers=2, backend="local") as executor:
        futures = [executor.submit(fail_at, i, 3) for i in range(8)]
        seen = list(observe.progress(as_completed(futures), total=len(futures), file=out))
    assert set(seen) == set(futures)
    text = out.getvalue()
    assert "8/8" in text and "failed=1" in text


def test_progress_over_map_yields_results_in_order():
    out = io.StringIO()
    with LambdaExecutor(max_workers=2, backend="local") as executor:
        results = list(observe.progress(executor.map(abs, [-1, -2, -3]), total=3, file=out))
    assert results == [1, 2, 3]
    assert "3/3" in out.getvalue()
