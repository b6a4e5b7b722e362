"""The pickler for the user's code: which modules go by value, and how they travel.

See serialize.py for the one rule; this module applies it while cloudpickle runs
(`_Pickler.reducer_override`), keeps code's real file names, leaves out a by-value module's
attributes that do not pickle, and names large objects as blobs (shared.py).
"""

from __future__ import annotations

import builtins
import dis
import functools
import inspect
import io
import logging
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

from lambdafutures_handler import exceptions as worker_exceptions

from . import shared

log = logging.getLogger("lambdafutures")

# cloudpickle's own answers to "is this pickled by reference" and "which modules go by
# value"; without them (another cloudpickle), every task pickles its function afresh.
_by_reference = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)
_by_value_modules = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None)
_reuse_possible = _by_reference is not None and isinstance(_by_value_modules, set)
_EMPTY_CELL = object()


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


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
    if path is not None:
        return not _is_installed(path)
    # A namespace package (a directory without __init__.py) is local when all its
    # directories are; a built-in or frozen module has none and is importable by name.
    directories = list(getattr(module, "__path__", None) or ())
    return bool(directories) and not any(map(_is_installed, directories))


def _is_installed(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + os.sep) for root in _INSTALLED_ROOTS)


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
    if type(fn) is types.ModuleType:
        name = fn.__name__
    else:
        name = getattr(fn, "__module__", None) or getattr(type(fn), "__module__", None)
    if not isinstance(name, str) or not name:
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
    """cloudpickle's Pickler that applies the module docstring's rule: it ships by value the
    not-installed package of every module, function and class it meets, not only the module
    of the submitted function; and it keeps the file name of code pickled by value."""

    def reducer_override(self, obj: Any) -> Any:
        # Called for nearly every object pickled: kept to a few type checks and no super().
        kind = type(obj)
        if kind is types.FunctionType or isinstance(obj, type):
            _ship_local_modules(obj)
        elif kind is types.ModuleType:
            _ship_local_modules(obj)
            if _reuse_possible and not _by_reference(obj):
                return _module_reduce_leaving_out_unpicklables(obj)
        elif kind is types.CodeType and _code_reduce is not None:
            return _code_reduce_keeping_file_name(obj)
        return _cloudpickle_reducer_override(self, obj)


    if hasattr(cloudpickle.Pickler, "_dynamic_function_reduce"):
        def _dynamic_function_reduce(self, func: types.FunctionType) -> Any:
            reduced = super()._dynamic_function_reduce(func)
            names = _class_body_names(func.__code__)
            if names:
                _add_class_body_globals(func, reduced, names)
            return reduced


_cloudpickle_reducer_override = cloudpickle.Pickler.reducer_override
_class_body_facts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _class_body_names(code: types.CodeType) -> tuple[str, ...]:
    """The names that class bodies nested in `code` read by LOAD_NAME: a global used in
    the body of a class defined inside the task (`class Point: x = DEFAULT`). cloudpickle
    ships only the names read by LOAD_GLOBAL, so the worker would raise NameError."""
    names = _class_body_facts.get(code)
    if names is None:
        found: set[str] = set()
        pending = [const for const in code.co_consts if isinstance(const, types.CodeType)]
        while pending:
            nested = pending.pop()
            if not nested.co_flags & inspect.CO_NEWLOCALS:  # a class body, not a function
                found.update(instruction.argval for instruction in dis.get_instructions(nested)
                             if instruction.opname == "LOAD_NAME")
            pending.extend(const for const in nested.co_consts
                           if isinstance(const, types.CodeType))
        names = _class_body_facts[code] = tuple(sorted(found))
    return names


def _add_class_body_globals(func: types.FunctionType, reduced: Any,
                            names: tuple[str, ...]) -> None:
    try:
        shipped = reduced[2][1]["__globals__"]
    except (IndexError, KeyError, TypeError):
        return  # another cloudpickle's layout: ship what it ships
    for name in names:
        if name in func.__globals__ and name not in shipped:
            shipped[name] = func.__globals__[name]
_code_reduce = getattr(cloudpickle.cloudpickle, "_code_reduce", None)


def _code_reduce_keeping_file_name(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with `co_filename` put back: cloudpickle
    writes "<dynamic-code>" there (so that pickles do not depend on where a function was
    defined), which leaves remote tracebacks without the user's file. The file name is
    the argument that follows `co_varnames` in every Python's code constructor."""
    constructor, args = _code_reduce(code)
    for index in range(1, len(args)):
        if args[index] == "<dynamic-code>" and args[index - 1] == code.co_varnames:
            args = (*args[:index], code.co_filename, *args[index + 1:])
            break
    return constructor, args


# (module name, attribute name) -> (the value, why it cannot be pickled, or None)
_verdicts: dict[tuple[str, str], tuple[Any, str | None]] = {}
_examining = threading.local()


def _module_reduce_leaving_out_unpicklables(module: types.ModuleType) -> Any:
    """A module by value, as cloudpickle's own reduction but for two things. Its attributes
    that cannot be pickled (a lock, a connection) are left out, so that a task using one
    function of a helper module is not refused for a global it never touches; the module's
    `__getattr__` on the worker explains a left-out name if the task does reach it. And the
    attributes travel as the module's state, after the module itself, so that modules that
    refer to each other (a package and its submodules) do not recurse without end."""
    name = module.__name__
    busy = _examining.__dict__.setdefault("modules", set())
    check = name not in busy  # else a cycle of modules: checked further up the stack
    busy.add(name)
    state: dict[str, Any] = {"__builtins__": builtins}
    left_out: dict[str, str] = {}
    try:
        for attribute, value in list(vars(module).items()):
            if attribute == "__builtins__":
                continue
            reason = _pickling_failure(name, attribute, value) if check else None
            if reason is None:
                state[attribute] = value
            else:
                left_out[attribute] = reason
    finally:
        if check:
            busy.discard(name)
    if left_out:
        log.debug("module %s goes to the worker without %s", name, ", ".join(left_out))
        if "__getattr__" not in state:
            state["__getattr__"] = functools.partial(
                worker_exceptions.module_attribute_left_out, name, left_out)
    return types.ModuleType, (name,), state


def _pickling_failure(module_name: str, attribute: str, value: Any) -> str | None:
    """Why `value` cannot be pickled, or None; remembered while the attribute holds it.
    A value that later stops pickling (a list that gains a lock) still fails the payload
    itself, so a remembered verdict never ships a broken module silently."""
    key = (module_name, attribute)
    known = _verdicts.get(key)
    if known is not None and known[0] is value:
        return known[1]
    try:
        _dumps(value)
        reason = None
    except Exception as exc:  # noqa: BLE001 - any failure: leave the attribute out
        reason = f"{type(exc).__name__}: {exc}"
    _verdicts[key] = (value, reason)
    return reason


_BlobPickler = shared.blob_pickler(_Pickler)


def _dumps(obj: Any) -> bytes:
    refs = shared.current()
    if refs is not None:
        # Within a payload (dumps_call): a first plain pickling stops at a large object or
        # a handle; only then is it pickled again naming those as blobs (shared.py).
        try:
            with shared.SmallOutput() as file:
                _Pickler(file).dump(obj)
                return file.getvalue()
        except shared.BlobsNeeded:
            with io.BytesIO() as file:
                _BlobPickler(file, refs).dump(obj)
                return file.getvalue()
    with io.BytesIO() as file:
        _Pickler(file).dump(obj)
        return file.getvalue()
