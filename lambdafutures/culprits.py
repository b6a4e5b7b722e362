"""Naming what cannot be pickled: the argument, global, closure variable or default (and
the attribute inside it) that made a call fail to pickle, with its type."""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable
from typing import Any

import cloudpickle

from .pickler import _EMPTY_CELL, _cell_value, _dumps

# -- ------------------------------------------------------------

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
