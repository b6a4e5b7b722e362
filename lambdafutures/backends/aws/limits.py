"""The concurrency a function can actually use, read once when an executor starts.

Lambda runs at most this many of the function's events at once; the rest wait in Lambda's
async queue, where time passes against their deadlines though nothing runs. A function with
reserved concurrency gets exactly that; any other shares the account's unreserved pool
(1,000 by default per region, often far less on a new account).
"""

from __future__ import annotations

import logging
from typing import Any

from .retry import CONTROL

log = logging.getLogger("lambdafutures")

# The default number of tasks in flight when the concurrency cannot be read (Lambda's
# default account limit per region).
DEFAULT_MAX_WORKERS = 1000


def available_concurrency(lambda_client: Any, function_name: str) -> int | None:
    """The function's reserved concurrency (GetFunctionConcurrency), else the account's
    UnreservedConcurrentExecutions (GetAccountSettings); None if neither can be read (a
    role without those permissions, an endpoint that does not serve them)."""
    try:
        reserved = CONTROL.call(lambda: lambda_client.get_function_concurrency(
            FunctionName=function_name)).get("ReservedConcurrentExecutions")
    except Exception as exc:  # noqa: BLE001 - a limit we cannot read is not an error
        log.debug("cannot read the reserved concurrency of %s: %s", function_name, exc)
        reserved = None
    if _is_count(reserved):
        return int(reserved)
    try:
        account = CONTROL.call(lambda_client.get_account_settings).get("AccountLimit") or {}
        unreserved = account.get("UnreservedConcurrentExecutions")
    except Exception as exc:  # noqa: BLE001 - as above
        log.debug("cannot read the account's unreserved concurrency: %s", exc)
        unreserved = None
    return int(unreserved) if _is_count(unreserved) else None


def default_max_workers(available: int | None, function_name: str, *,
                        announce: bool = True) -> int:
    """Tasks in flight when the user gives no max_workers: at most what Lambda can run.
    With `announce`, logs the choice (INFO; WARNING when nothing is available)."""
    if available is None:
        chosen, why = DEFAULT_MAX_WORKERS, f"the concurrency available to {function_name} " \
                                           "could not be read"
    else:
        # 0 (reserved concurrency 0: the function is switched off) still needs one slot.
        chosen = max(1, min(DEFAULT_MAX_WORKERS, available))
        why = f"the concurrency available to {function_name} is {available}"
    if announce and available == 0:
        log.warning("aws backend: max_workers=1 (%s): its events will wait in Lambda's "
                    "queue until concurrency is given to it", why)
    elif announce:
        log.info("aws backend: max_workers=%d (%s)", chosen, why)
    return chosen


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
