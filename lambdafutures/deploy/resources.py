"""The resources of a deployment, in dependency order, behind one small interface.

Each resource can `inspect()` itself (missing, or present with a list of differences from
what the deployment wants), `ensure()` itself (create, update only what differs, or leave it
alone) and `delete()` itself. `deploy` ensures them in order, `status` inspects them, and
`destroy` deletes them in reverse order, so the three commands cannot disagree about what a
deployment is made of.

Nothing here prints: progress goes to a `progress(message)` callable the CLI provides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

CREATED, UPDATED, UNCHANGED = "created", "updated", "unchanged"

Progress = Callable[[str], None]


def quiet(message: str) -> None:
    """A progress sink that drops messages."""


@dataclass
class State:
    """What `inspect()` found."""

    exists: bool
    differences: list[str] = field(default_factory=list)
    detail: str = ""      # e.g. the layer version in use

    @property
    def ok(self) -> bool:
        return self.exists and not self.differences


@dataclass
class Outcome:
    """What `ensure()` did: CREATED, UPDATED (with what changed) or UNCHANGED."""

    status: str
    changes: list[str] = field(default_factory=list)
    detail: str = ""


class Resource(Protocol):
    kind: str   # "bucket", "role", ... for progress lines
    name: str   # the AWS name

    def inspect(self) -> State: ...

    def ensure(self, progress: Progress = quiet) -> Outcome: ...

    def delete(self, progress: Progress = quiet) -> bool:
        """True when something was deleted, False when it was already gone."""
        ...


def differences(want: dict[str, object], have: dict[str, object]) -> list[str]:
    """'field: have -> want' for every field that differs, in `want`'s order."""
    return [f"{key}: {have.get(key)!r} -> {value!r}"
            for key, value in want.items() if have.get(key) != value]
