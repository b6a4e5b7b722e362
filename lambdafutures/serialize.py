"""Pickling of calls and results: cloudpickle, signatures, and local modules by value.

A function from a module that the worker cannot import (a script's sibling file, a notebook
helper, a package under development that is not installed) is pickled by value; modules
from site-packages and the standard library go by reference, as cloudpickle does by default.

A payload holds the function's pickle apart from the calls' (protocol.pack_payload). A plain
function's pickle is kept and reused for later tasks as long as everything it captures (the
globals it names, closure cells, defaults) is the very same immutable object as before:
pickling a function by value (one in `__main__`, say) costs far more than a no-op task.
"""

from __future__ import annotations

import dis
import io
import operator
import os
import site
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Iterable
from typing import Any

import cloudpickle

from lambdafutures_handler import protocol

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


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's Pickler that ships by value the not-installed module of every function
    and class it meets (a partial's function, an argument's class), not only the module of
    the submitted function: the worker could not import it by name."""

    def reducer_override(self, obj: Any) -> Any:
        # Called for nearly every object pickled: kept to two type checks and no super().
        if type(obj) is types.FunctionType or isinstance(obj, type):
            _ship_local_modules(obj)
        return _cloudpickle_reducer_override(self, obj)


_cloudpickle_reducer_override = cloudpickle.Pickler.reducer_override


def _dumps(obj: Any) -> bytes:
    with io.BytesIO() as file:
        _Pickler(file).dump(obj)
        return file.getvalue()


def dumps_call(fn: Any, calls: list[tuple[tuple, dict]], batch: bool) -> bytes:
    """Pickle a payload: the function and its calls. Raises SerializationError."""
    _ship_local_modules(fn)
    try:
        fn_pickle, flags = _function_pickle(fn)
        return protocol.pack_payload(fn_pickle, _dumps((calls, batch)), flags)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {_describe(fn)} with its arguments: "
                                 f"{type(exc).__name__}: {exc}") from exc


# -- reusing a function's pickle ----------------------------------------------------------------

# cloudpickle's own answers to "is this pickled by reference" and "which modules go by
# value"; without them (another cloudpickle), every task pickles its function afresh.
_by_reference = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)
_by_value_modules = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None)
_reuse_possible = _by_reference is not None and isinstance(_by_value_modules, set)

# function -> (capture, by-value modules, len(sys.modules), pickle); see _capture.
_pickles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_code_facts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ABSENT = object()
_EMPTY_CELL = object()
_ATOMIC = (type(None), bool, int, float, complex, str, bytes, type(...), range)
_WRITES_GLOBAL = {"STORE_GLOBAL", "DELETE_GLOBAL"}
_WRITES_CELL = {"STORE_DEREF", "DELETE_DEREF"}


def _function_pickle(fn: Any) -> tuple[bytes, int]:
    """The pickle of `fn` and the payload flags: reused while nothing `fn` captures changed."""
    if not _reuse_possible or type(fn) is not types.FunctionType:
        return _dumps(fn), 0
    entry = _pickles.get(fn)
    capture = None
    # Pickling also depends on which modules go by value ...
    if entry is not None and entry[1] == _by_value_modules:
        if entry[0] is None:  # pickled by reference: its pickle is its name
            return entry[3], protocol.FN_REUSABLE
        capture = _capture(fn)
        # ... and on which submodules are imported.
        if (capture is not None and entry[2] == len(sys.modules)
                and len(entry[0]) == len(capture) and all(map(operator.is_, entry[0], capture))):
            if entry[3] is None:  # seen before: it captures something that may change
                return _dumps(fn), 0
            return entry[3], protocol.FN_REUSABLE
    data = _dumps(fn)
    try:
        by_reference = _by_reference(fn)
    except Exception:  # noqa: BLE001 - cloudpickle could not tell: pickle afresh each time
        return data, 0
    modules = set(_by_value_modules)
    if by_reference:
        _pickles[fn] = (None, modules, 0, data)
        return data, protocol.FN_REUSABLE
    capture = capture or _capture(fn)
    if capture is None:
        return data, 0
    stable = all(map(_stable, capture[_FIXED:]))
    _pickles[fn] = (capture, modules, len(sys.modules), data if stable else None)
    return data, protocol.FN_REUSABLE if stable else 0


_FIXED = 8  # the leading items of a capture that are the function's own (always compared)


def _capture(fn: types.FunctionType) -> tuple | None:
    """Everything pickling `fn` by value reads, to compare by identity later; None when a
    call could change what the function captures (it assigns a global or a closure cell),
    so that a worker must not keep it, or when it has attributes of its own."""
    code = fn.__code__
    facts = _code_facts.get(code)
    if facts is None:
        facts = _code_facts[code] = _examine(code)
    names, writes = facts
    if writes or fn.__dict__:
        return None
    namespace = fn.__globals__
    kwdefaults = fn.__kwdefaults__ or {}
    annotations = fn.__annotations__
    return (code, namespace, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__,
            len(kwdefaults), len(annotations),
            *(namespace.get(name, _ABSENT) for name in names),
            *(_cell_value(cell) for cell in fn.__closure__ or ()),
            *(fn.__defaults__ or ()), *kwdefaults.keys(), *kwdefaults.values(),
            *annotations.keys(), *annotations.values())


def _examine(code: types.CodeType) -> tuple[tuple[str, ...], bool]:
    """(every name the code and its nested code may read as a global, whether any of it
    assigns a global or one of the function's closure cells)."""
    names: set[str] = set()
    writes = False
    free = set(code.co_freevars)
    pending = [code]
    while pending:
        current = pending.pop()
        names.update(current.co_names)
        for instruction in dis.get_instructions(current):
            if instruction.opname in _WRITES_GLOBAL or (
                    instruction.opname in _WRITES_CELL and instruction.argval in free):
                writes = True
        pending.extend(const for const in current.co_consts
                       if isinstance(const, types.CodeType))
    return tuple(sorted(names)), writes


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


def _stable(value: Any, depth: int = 0) -> bool:
    """True when `value` cannot change without becoming another object: immutable data, and
    modules, functions and classes that are pickled by reference (by name)."""
    kind = type(value)
    if kind in _ATOMIC or value is _ABSENT or value is _EMPTY_CELL:
        return True
    if kind is tuple or kind is frozenset:
        return depth < 4 and all(_stable(item, depth + 1) for item in value)
    if kind is types.BuiltinFunctionType:
        owner = getattr(value, "__self__", None)
        return owner is None or isinstance(owner, types.ModuleType)
    if kind is types.ModuleType or kind is types.FunctionType or isinstance(value, type):
        try:
            return bool(_by_reference(value))
        except Exception:  # noqa: BLE001 - cloudpickle could not tell: assume it may change
            return False
    return False


def loads_result(data: bytes) -> Any:
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"result cannot be unpickled on the host: "
                                 f"{type(exc).__name__}: {exc}") from exc


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"function {name!r}"
