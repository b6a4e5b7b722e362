"""A progress bar for `as_completed` and `map` loops, without touching the Executor API.

    for future in progress(as_completed(futures), total=len(futures)):
        ...
    for result in progress(executor.map(fn, items), total=len(items)):
        ...

Futures that end with an exception (or are cancelled) are counted in the bar's postfix.
tqdm is an optional extra: `pip install 'lambdafutures[progress]'`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "tasks",
             **tqdm_options: Any) -> Iterator[T]:
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("progress bars need tqdm: pip install 'lambdafutures[progress]'") \
            from None
    try:
        # A notebook's widget bar needs ipywidgets; without it tqdm.auto only warns
        # ("IProgress not found") and draws nothing, so the text bar is the better choice.
        import ipywidgets  # noqa: F401
    except ImportError:
        pass
    else:
        from tqdm.auto import tqdm
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    failed = 0
    with tqdm(total=total, desc=desc, unit="task", **tqdm_options) as bar:
        for item in iterable:
            if isinstance(item, Future) and (item.cancelled() or item.exception() is not None):
                failed += 1
                bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)
            yield item
