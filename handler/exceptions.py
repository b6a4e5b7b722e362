"""The worker's side of a task's exception: its traceback text and its pickle.

An exception travels as cloudpickle bytes when the host can rebuild it from them: the
default reduction of an exception calls `cls(*exc.args)` on loading, which fails for a
class whose `__init__` takes other arguments than it passes to `super().__init__` (and an
exception holding a lock cannot be pickled at all). Rather than lose the type, the worker
then sends a recipe: the class, args and attributes, each pickled on its own so that one
bad value costs only itself, plus one-line summaries of `__cause__` and `__context__`. The
host (lambdafutures.remote) rebuilds the exception from it without calling `__init__`, as
tblib and loky do.

The recipe is a plain dict (marked by RECIPE_MARK), not a class of this package, so that
reading it never depends on how the worker's package is named where it runs.
"""

from __future__ import annotations

import os
import traceback
import types
from typing import Any

import cloudpickle

RECIPE_MARK = "lambdafutures.exception_recipe/1"

_HERE = os.path.dirname(os.path.abspath(__file__))
_SUMMARY_CHARS = 1_000


def format_traceback(exc: BaseException) -> str:
    """The exception's traceback text, from the first frame of the user's code: the
    worker's own frames that called the task say nothing to the user."""
    tb = exc.__traceback__
    while tb is not None and _is_worker_frame(tb):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _is_worker_frame(tb: types.TracebackType) -> bool:
    return os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == _HERE


def pickle_exception(exc: BaseException) -> bytes | None:
    """The exception's pickle if it loads back, else its recipe's; None if neither can be
    made (the host then gets the text form only)."""
    try:
        data = cloudpickle.dumps(exc)
        cloudpickle.loads(data)  # what the host will do: may call the class's __init__
        return data
    except Exception:  # noqa: BLE001 - any failure of user code: send the recipe instead
        pass
    try:
        return cloudpickle.dumps(recipe(exc))
    except Exception:  # noqa: BLE001 - the text form still reaches the host
        return None


def recipe(exc: BaseException) -> dict[str, Any]:
    """What the host needs to rebuild `exc` without calling its `__init__`."""
    cls = type(exc)
    attributes: dict[str, bytes] = {}
    dropped: list[tuple[str, str]] = []
    for name, value in _attributes(exc).items():
        packed = _pack(value)
        if packed is None:
            dropped.append((name, qualified_name(type(value))))
        else:
            attributes[name] = packed
    args = []
    for value in exc.args:
        packed = _pack(value)
        args.append(packed if packed is not None else cloudpickle.dumps(_repr(value)))
    return {
        "mark": RECIPE_MARK,
        "class": _pack(cls),
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "args": args,
        "attributes": attributes,
        "dropped": dropped,
        "cause": _summary(exc.__cause__),
        "context": _summary(exc.__context__),
    }


def _attributes(exc: BaseException) -> dict[str, Any]:
    found = dict(getattr(exc, "__dict__", None) or {})
    for klass in type(exc).__mro__:
        for name in getattr(klass, "__slots__", ()) if klass is not BaseException else ():
            if isinstance(name, str) and name not in ("__dict__", "__weakref__"):
                try:
                    found[name] = getattr(exc, name)
                except AttributeError:
                    pass
    return found


def _pack(value: Any) -> bytes | None:
    try:
        return cloudpickle.dumps(value)
    except Exception:  # noqa: BLE001 - any failure: the value is left out
        return None


def _summary(exc: BaseException | None) -> tuple[str, str] | None:
    if exc is None:
        return None
    return qualified_name(type(exc)), describe(exc)[:_SUMMARY_CHARS]


def _repr(value: Any) -> str:
    try:
        return repr(value)[:_SUMMARY_CHARS]
    except Exception:  # noqa: BLE001 - a user's __repr__ may fail too
        return f"<{qualified_name(type(value))} object>"


def describe(exc: BaseException) -> str:
    """str(exc), or a stand-in when the user's __str__ itself fails."""
    try:
        return str(exc)
    except Exception as failure:  # noqa: BLE001 - any failure of user code
        return f"<str() of {type(exc).__name__} failed: {type(failure).__name__}>"


def qualified_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def module_attribute_left_out(module_name: str, reasons: dict[str, str],
                              attribute: str) -> Any:
    """`__getattr__` of a user's module sent by value without the attributes that could not
    be pickled on the host (lambdafutures.serialize): says why one is missing."""
    if attribute in reasons:
        raise AttributeError(
            f"module {module_name!r} has no attribute {attribute!r} on the worker: it was "
            f"left out when the module was sent, as it cannot be pickled "
            f"({reasons[attribute]})")
    raise AttributeError(f"module {module_name!r} has no attribute {attribute!r}")
