"""Which backend an executor uses, and the deployment config file `lambdafutures deploy` writes.

Backend resolution: the `backend=` argument, else LAMBDAFUTURES_BACKEND, else the backend
named in the deployment config file, else "local".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BACKENDS = ("local", "aws")


def config_path() -> Path:
    explicit = os.environ.get("LAMBDAFUTURES_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lambdafutures" / "config.json"


def load_deployment(path: Path | None = None) -> dict[str, Any] | None:
    """The deployment config, or None when there is none."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"deployment config {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"deployment config {path} is not a JSON object")
    return config


def save_deployment(config: dict[str, Any], path: Path | None = None) -> Path:
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path


def resolve_backend(backend: str | None) -> tuple[str, dict[str, Any] | None]:
    """The backend name to use and the deployment config (None when there is none)."""
    deployment = None
    name = backend or os.environ.get("LAMBDAFUTURES_BACKEND")
    if name is None or name == "aws":
        deployment = load_deployment()
        if name is None:
            name = (deployment or {}).get("backend", "local")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name, deployment
