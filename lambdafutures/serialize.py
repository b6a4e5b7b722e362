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

import builtins
import dis
import functools
import inspect
import io
import logging
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

from lambdafutures_handler import exceptions as worker_exceptions
from lambdafutures_handler import protocol

from . import shared
from .errors import SerializationError

log = logging.getLogger("lambdafutures")

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


# -- naming what cannot be pickled ------------------------------------------------------------

_CULPRIT_DEPTH = 4
_CULPRIT_ITEMS = 100  # items of a container looked at one by one


def _culprit_of_call(fn: Any, calls: list[tuple[tuple, dict]], batch: bool) -> str | None:
    """Which part of a call failed to pickle, in words: "positional argument 1 (a
    _thread.lock)", "attribute 'lock' of global 'state' (a _thread.lock)". Only run once
    pickling has failed: it pickles the parts one by one."""
    for number, (args, kwargs) in enumerate(calls):
        of_call = f" of call {number} in the chunk" if batch else ""
        labelled = [(f"positional argument {index}{of_call}", value)
                    for index, value in enumerate(args)]
        labelled += [(f"keyword argument {name!r}{of_call}", value)
                     for name, value in kwargs.items()]
        for label, value in labelled:
            found = _culprit(value, 0)
            if found is not None:
                return _say(label, *found)
    found = _culprit(fn, 0)
    if found is not None and found[0]:
        return _say("", *found)
    return None


def _say(label: str, path: list[str], culprit: Any) -> str:
    words = " of ".join([*reversed(path), label] if label else reversed(path))
    kind = type(culprit)
    name = kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}")
    return f"{words} (a {name})"


def _culprit(obj: Any, depth: int) -> tuple[list[str], Any] | None:
    """None when `obj` pickles; else the path of labels to the innermost part that does not
    (empty when it is `obj` itself, or when none of its parts fails alone) and that part."""
    try:
        _dumps(obj)
        return None
    except Exception:  # noqa: BLE001 - any failure: look inside
        pass
    if depth < _CULPRIT_DEPTH:
        try:
            parts = list(_parts(obj))
        except Exception:  # noqa: BLE001 - an object that cannot be looked into
            parts = []
        for label, part in parts:
            found = _culprit(part, depth + 1)
            if found is not None:
                return [label, *found[0]], found[1]
    return [], obj


def _parts(obj: Any) -> Iterable[tuple[str, Any]]:
    """The labelled parts that pickling `obj` pickles in turn, as far as we can tell."""
    kind = type(obj)
    if kind is types.FunctionType:
        names = cloudpickle.cloudpickle._extract_code_globals(obj.__code__)
        yield from ((f"global {name!r}", obj.__globals__[name])
                    for name in names if name in obj.__globals__)
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            value = _cell_value(cell)
            if value is not _EMPTY_CELL:
                yield f"closure variable {name!r}", value
        arguments = obj.__code__.co_varnames[:obj.__code__.co_argcount]
        defaults = obj.__defaults__ or ()
        for name, value in zip(arguments[len(arguments) - len(defaults):], defaults,
                               strict=False):
            yield f"default of {name!r}", value
        yield from ((f"default of {name!r}", value)
                    for name, value in (obj.__kwdefaults__ or {}).items())
    elif isinstance(obj, functools.partial):
        yield "the partial's function", obj.func
        yield from ((f"the partial's argument {index}", value)
                    for index, value in enumerate(obj.args))
        yield from ((f"the partial's keyword {name!r}", value)
                    for name, value in obj.keywords.items())
    elif kind is types.MethodType:
        yield "the method's function", obj.__func__
        yield "the method's instance", obj.__self__
    elif kind is types.ModuleType or isinstance(obj, type):
        where = "module attribute" if kind is types.ModuleType else "class attribute"
        yield from ((f"{where} {name!r}", value) for name, value in vars(obj).items()
                    if name not in ("__builtins__", "__dict__", "__weakref__"))
    elif kind in (list, tuple, set, frozenset):
        yield from ((f"item {index}", value)
                    for index, value in enumerate(list(obj)[:_CULPRIT_ITEMS]))
    elif kind is dict:
        yield from ((f"key {key!r}", value)
                    for key, value in list(obj.items())[:_CULPRIT_ITEMS])
    elif isinstance(getattr(obj, "__dict__", None), dict):
        yield from ((f"attribute {name!r}", value) for name, value in vars(obj).items())


def loads_result(data: bytes) -> Any:
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"result cannot be unpickled on the host: "
                                 f"{type(exc).__name__}: {exc}") from exc


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"function {name!r}"
