"""Lambda's Python runtimes and their end-of-support dates: which host Pythons can deploy.

`deploy` runs the function on the runtime of the host's Python minor (the worker refuses
payloads pickled by another Python), so the host's Python decides. Lambda ends a runtime
in three steps: deprecation (no more patches), then it blocks creating functions on it,
then it blocks updating them. A deploy past a block would end in Lambda's
`InvalidParameterValueException` half-way through; this table refuses it up front.

The dates are AWS's table ("Lambda runtimes", docs.aws.amazon.com/lambda/latest/dg/
lambda-runtimes.html) as published when this file was last edited. AWS has moved dates
before (python3.9's blocks were postponed twice): when they move, edit `PYTHON_RUNTIMES`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

log = logging.getLogger("lambdafutures")

# Warn this long before a runtime's deprecation (Lambda's own notices start 180 days ahead).
WARN_DAYS = 180


@dataclass(frozen=True)
class Runtime:
    """One Lambda Python runtime and its end-of-support dates."""

    identifier: str            # "python3.12"
    operating_system: str      # "Amazon Linux 2023"
    deprecated: dt.date        # no more patches or support
    block_create: dt.date      # CreateFunction refused from this day
    block_update: dt.date      # UpdateFunctionCode / Configuration refused from this day

    @property
    def python(self) -> str:
        return self.identifier.removeprefix("python")


def _d(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


PYTHON_RUNTIMES: tuple[Runtime, ...] = (
    Runtime("python3.9", "Amazon Linux 2", _d("2025-12-15"), _d("2026-08-31"), _d("2026-09-30")),
    Runtime("python3.10", "Amazon Linux 2", _d("2026-10-31"), _d("2026-11-30"), _d("2027-01-10")),
    Runtime("python3.11", "Amazon Linux 2", _d("2027-06-30"), _d("2027-07-31"), _d("2027-08-31")),
    Runtime("python3.12", "Amazon Linux 2023", _d("2028-10-31"), _d("2028-11-30"),
            _d("2029-01-10")),
    Runtime("python3.13", "Amazon Linux 2023", _d("2029-06-30"), _d("2029-07-31"),
            _d("2029-08-31")),
    Runtime("python3.14", "Amazon Linux 2023", _d("2029-06-30"), _d("2029-07-31"),
            _d("2029-08-31")),
)


class RuntimeBlocked(ValueError):
    """Lambda would refuse a function on this runtime (or has no such runtime)."""


def today() -> dt.date:
    """The date the checks use (UTC). Tests replace it to see the future."""
    return dt.datetime.now(dt.timezone.utc).date()


def runtime_for(python: str) -> Runtime | None:
    """The runtime for a Python minor ("3.12"), or None when Lambda has none."""
    return next((r for r in PYTHON_RUNTIMES if r.python == python), None)


def creatable(on: dt.date) -> list[Runtime]:
    """Runtimes a new function may use on that day."""
    return [r for r in PYTHON_RUNTIMES if on < r.block_create]


def _how_to_switch(on: dt.date) -> str:
    choices = creatable(on)
    if not choices:
        return ("no Python runtime in this lambdafutures version's table is open for new "
                "functions; upgrade lambdafutures")
    names = ", ".join(r.identifier for r in choices)
    example = choices[-2].python if len(choices) > 1 else choices[-1].python
    return (f"Lambda accepts new functions on {names}. The runtime follows the Python that "
            f"runs `lambdafutures deploy` (and your executor), so run the host on one of "
            f"them, e.g. `uv venv -p {example} && uv pip install lambdafutures`, or "
            f"`pyenv install {example} && pyenv local {example}`, then deploy again")


def check(python: str, on: dt.date | None = None, *,
          deployed_runtime: str | None = None) -> list[str]:
    """Refuse (RuntimeBlocked) a deploy Lambda would refuse; else the warnings to show.

    `deployed_runtime` is the runtime of the function as it exists now (None: no function
    yet). Lambda keeps accepting updates to an existing function on its runtime until the
    update block; a new function (or a move to this runtime) needs it open for creation.
    """
    on = on or today()
    runtime = runtime_for(python)
    if runtime is None:
        raise RuntimeBlocked(
            f"Lambda has no python{python} runtime (known: "
            f"{', '.join(r.identifier for r in PYTHON_RUNTIMES)}). {_how_to_switch(on)}.")
    updating = deployed_runtime == runtime.identifier
    if on >= runtime.block_update:
        raise RuntimeBlocked(
            f"Lambda blocks {runtime.identifier} since {runtime.block_update} (deprecated "
            f"{runtime.deprecated}): functions on it can be neither created nor updated. "
            f"{_how_to_switch(on)}.")
    if on >= runtime.block_create and not updating:
        raise RuntimeBlocked(
            f"Lambda blocks creating {runtime.identifier} functions since "
            f"{runtime.block_create} (deprecated {runtime.deprecated}; updates of existing "
            f"ones end {runtime.block_update}). {_how_to_switch(on)}.")
    warnings = []
    if on >= runtime.block_create:
        warnings.append(
            f"{runtime.identifier}: Lambda blocks creating functions on it since "
            f"{runtime.block_create} and updating them from {runtime.block_update} "
            f"({(runtime.block_update - on).days} days); this update still goes through. "
            f"{_how_to_switch(on)}.")
    elif on >= runtime.deprecated:
        warnings.append(
            f"{runtime.identifier} is deprecated since {runtime.deprecated} (no security "
            f"patches); Lambda blocks new functions on it from {runtime.block_create} and "
            f"updates from {runtime.block_update}. Move the host to a newer Python.")
    elif (runtime.deprecated - on).days <= WARN_DAYS:
        warnings.append(
            f"{runtime.identifier} is deprecated on {runtime.deprecated} (in "
            f"{(runtime.deprecated - on).days} days); Lambda blocks new functions on it from "
            f"{runtime.block_create} and updates from {runtime.block_update}. Plan a move "
            f"of the host to a newer Python.")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def status_line(python: str, on: dt.date | None = None) -> str:
    """One line for `status`: the deployed runtime's standing on that day."""
    on = on or today()
    runtime = runtime_for(python)
    if runtime is None:
        return f"runtime python{python}: not in this lambdafutures version's table"
    if on >= runtime.block_update:
        return (f"runtime {runtime.identifier}: BLOCKED for updates since "
                f"{runtime.block_update}; {_how_to_switch(on)}")
    if on >= runtime.deprecated:
        return (f"runtime {runtime.identifier}: deprecated since {runtime.deprecated}; "
                f"updates blocked from {runtime.block_update}")
    return (f"runtime {runtime.identifier}: supported until {runtime.deprecated} "
            f"(new functions until {runtime.block_create})")
