"""Pickling of calls and results: cloudpickle, signatures, and local modules by value.

The one rule for the user's own code: while a payload is pickled, every module, function
and class met on the way whose top-level package the worker could not import by name (its
file lies outside the standard library and site-packages; lambdafutures and cloudpickle
excepted) has that whole top-level package registered to go by value, before cloudpickle
decides how to pickle the object. It is met however the submitted function reaches it: a
global name bound to the module (`import mylib` ... `mylib.double(x)`), a name imported
from it (`from mylib import double`), an attribute chain (`mylib.sub.f`), a class and the
globals of its methods, default arguments, closure cells, nested functions (their globals
are the enclosing function's), a functools.partial, a bound method, or the class of an
argument. So it holds on the first submit, in any order, for a script's sibling module, a
package under development, and a module imported from a notebook's directory. Modules from
site-packages and the standard library go by reference, as cloudpickle does by default;
`ship_by_value` overrides the rule either way. What the rule cannot see is an `import`
statement run inside the task: the worker imports that name itself.

A module reached as an object (`mylib.double`, not `from mylib import double`) travels
whole, with every attribute that pickles, in each payload that reaches it: a large global
of such a module costs every task. Attributes that do not pickle (a lock) are left out,
and the worker's module explains a missing one if the task reads it. Globals read in the
body of a class defined inside a function are shipped too (cloudpickle ships only those
that functions read).

Code pickled by value keeps its real file name (cloudpickle would write "<dynamic-code>"),
so that remote tracebacks name the user's file and line; the host adds the source lines
(lambdafutures.remote).

When a call cannot be pickled, SerializationError names the part that failed: the
positional argument's index or the keyword's name, or the global, closure variable or
default of the function (and the attribute inside it), with the offending type.

A payload holds the function's pickle apart from the calls' (protocol.pack_payload). A plain
function's pickle is kept and reused for later tasks as long as everything it captures (the
globals it names, closure cells, defaults) is the very same immutable object as before:
pickling a function by value (one in `__main__`, say) costs far more than a no-op task.
"""

from __future__ import annotations

import dis
import operator
import sys
import types
import weakref
from typing import Any

import cloudpickle

from lambdafutures_handler import protocol

from . import shared
from .culprits import _culprit_of_call
from .errors import SerializationError
from .pickler import (
    _EMPTY_CELL,
    _by_reference,
    _by_value_modules,
    _cell_value,
    _dumps,
    _reuse_possible,
    _ship_local_modules,
)
from .pickler import ship_by_value as ship_by_value


def dumps_call(fn: Any, calls: list[tuple[tuple, dict]], batch: bool,
               initializer: bytes | None = None,
               blobs: shared.BlobRegistry | None = None) -> bytes:
    """Pickle a payload: the function and its calls (and the executor's pickled initializer,
    see `dumps_initializer`). With the executor's `blobs`, large objects and `Shared` handles
    are named by digest and kept there, once (shared.py). Raises SerializationError."""
    _ship_local_modules(fn)
    refs = None if blobs is None else shared.PayloadBlobs(blobs)
    try:
        with shared.naming(refs):
            fn_pickle, flags = _function_pickle(fn)
            calls_pickle = _dumps((calls, batch))
        return protocol.pack_payload(fn_pickle, calls_pickle, flags, initializer,
                                     list(refs.digests) if refs is not None else ())
    except Exception as exc:
        if refs is not None:
            blobs.release(refs.digests)  # no task will name them
        with shared.naming(None if refs is None else shared.PayloadBlobs(None)):
            culprit = _culprit_of_call(fn, calls, batch)
        where = f"{culprit}: " if culprit else ""
        raise SerializationError(f"cannot pickle {_describe(fn)} with its arguments: "
                                 f"{where}{type(exc).__name__}: {exc}") from exc


def dumps_initializer(initializer: Any, initargs: tuple) -> bytes:
    """Pickle an executor's (initializer, initargs) once. Raises SerializationError."""
    _ship_local_modules(initializer)
    try:
        return _dumps((initializer, initargs))
    except Exception as exc:
        raise SerializationError(f"cannot pickle the initializer {_describe(initializer)} "
                                 f"with its initargs: {type(exc).__name__}: {exc}") from exc


# -- reusing a function's pickle ----------------------------------------------------------------


# function -> (capture, by-value modules, len(sys.modules), pickle); see _capture.
_pickles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_code_facts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ABSENT = object()
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
    # A pickle that names blobs is not kept: its blobs belong to one executor's registry.
    stable = all(map(_stable, capture[_FIXED:])) and shared.BLOB_TAG not in data
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
