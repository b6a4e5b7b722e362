"""Pickling of calls and results: cloudpickle, signatures, and local modules by value.

A function from a module that the worker cannot import (a script's sibling file, a notebook
helper, a package under development that is not installed) is pickled by value; modules
from site-packages and the standard library go by reference, as cloudpickle does by default.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import threading
from collections.abc import Iterable
from typing import Any

import cloudpickle

from .errors import SerializationError

_registered: set[str] = set()
_decided: dict[str, bool] = {}
_lock = threading.Lock()


def _installed_roots() -> tuple[str, ...]:
    roots = set()
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(name)
        if path:
            roots.add(os.path.realpath(path))
    for path in site.getsitepackages() + [site.getusersitepackages()]:
        roots.add(os.path.realpath(path))
    return tuple(sorted(roots))


_INSTALLED_ROOTS = _installed_roots()
_ALWAYS_BY_REFERENCE = ("lambdafutures", "lambdafutures_handler", "cloudpickle")


def _is_local(module_name: str) -> bool:
    """True for a module the worker will not have installed."""
    if module_name in ("__main__", "__mp_main__") or module_name in sys.builtin_module_names:
        return False
    top = module_name.partition(".")[0]
    if top in _ALWAYS_BY_REFERENCE:
        return False
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None)
    if path is None:
        return False  # built-in, frozen or namespace package: importable by name
    real = os.path.realpath(path)
    return not any(real.startswith(root + os.sep) for root in _INSTALLED_ROOTS)


def ship_by_value(module_names: Iterable[str], exclude: Iterable[str] = ()) -> None:
    """Pickle the named modules by value from now on (and never the excluded ones)."""
    with _lock:
        for name in exclude:
            _decided[name.partition(".")[0]] = False
        for name in module_names:
            _register(name.partition(".")[0])


def _register(top: str) -> None:
    if top in _registered:
        return
    module = sys.modules.get(top)
    if module is None:
        __import__(top)
        module = sys.modules[top]
    cloudpickle.register_pickle_by_value(module)
    _registered.add(top)
    _decided[top] = True


def _ship_local_modules(fn: Any) -> None:
    name = getattr(fn, "__module__", None) or getattr(type(fn), "__module__", None)
    if not name:
        return
    top = name.partition(".")[0]
    if top in _decided:
        return
    with _lock:
        if top not in _decided:
            if _is_local(name):
                _register(top)
            else:
                _decided[top] = False


def dumps_call(fn: Any, calls: list[tuple[tuple, dict]], batch: bool) -> bytes:
    """Pickle a payload: the function and its calls. Raises SerializationError."""
    _ship_local_modules(fn)
    try:
        return cloudpickle.dumps((fn, calls, batch))
    except Exception as exc:
        raise SerializationError(f"cannot pickle {_describe(fn)} with its arguments: "
                                 f"{type(exc).__name__}: {exc}") from exc


def loads_result(data: bytes) -> Any:
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"result cannot be unpickled on the host: "
                                 f"{type(exc).__name__}: {exc}") from exc


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"function {name!r}"
