"""The host's side of a task's exception: what the future ends with.

`user_exception` turns the worker's report of an exception raised by the user's function
(the `error` dict {kind, type, message, traceback} and the exception's pickle) into:
- the exception itself, of its own type, whenever its class can be found on the host: from
  its pickle, or from the recipe the worker sends when the pickle would not load back
  (lambdafutures_handler.exceptions), rebuilt without calling `__init__` (as tblib and loky
  do: `cls.__new__(cls)`, then `args` and the attributes);
- `TaskExited` for SystemExit, KeyboardInterrupt and any other BaseException that is not an
  Exception: raising those on the host would end the user's script or interrupt it;
- `RemoteError` with the type name, message and traceback text when the class itself
  cannot be loaded here.
The remote traceback hangs off `__cause__` as a RemoteTraceback. Its text is the worker's,
with the source line added under each frame that lacks one: code pickled by value keeps its
file name, but the worker does not have the file, and the host usually does.
"""

from __future__ import annotations

import importlib
import linecache
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle

from lambdafutures_handler.exceptions import RECIPE_MARK

from . import errors

log = logging.getLogger("lambdafutures")

_FRAME = re.compile(r'^(?P<indent> *)File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def user_exception(error: dict[str, Any],
                   load: Callable[[], Any] | None) -> BaseException:
    """The exception a future ends with. `load()` returns the unpickled exception (or its
    recipe) after checking its signature; None when the worker sent none."""
    text = enrich_traceback(error.get("traceback") or "")
    exception: BaseException | None = None
    if load is not None:
        try:
            loaded = load()
        except errors.SignatureMismatch as exc:
            return exc
        except errors.LambdaFuturesError as exc:  # e.g. its class cannot be imported here
            log.debug("the task's exception could not be unpickled: %s", exc)
            loaded = None
        if _is_recipe(loaded):
            exception = rebuild(loaded)
        elif isinstance(loaded, BaseException):
            exception = loaded
    type_name = error.get("type") or "Exception"
    message = error.get("message") or ""
    if exception is None:
        if type_name in _NOT_EXCEPTIONS:
            exception = errors.TaskExited(type_name, message)
        else:
            exception = errors.RemoteError(type_name, message, text)
    elif not isinstance(exception, Exception):
        exception = errors.TaskExited(type_name, message,
                                      getattr(exception, "code", None)
                                      if isinstance(exception, SystemExit) else None)
    exception.__cause__ = errors.RemoteTraceback(text)
    return exception


# Built-in BaseExceptions that are not Exceptions, by the name the worker reports.
_NOT_EXCEPTIONS = {"SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseExceptionGroup"}


def _is_recipe(value: Any) -> bool:
    return type(value) is dict and value.get("mark") == RECIPE_MARK


def rebuild(recipe: dict[str, Any]) -> BaseException | None:
    """The exception a recipe describes, made without calling its class's `__init__`; None
    when the class cannot be found on the host."""
    cls = _load_class(recipe)
    if cls is None:
        return None
    try:
        exception = cls.__new__(cls)
    except Exception:  # noqa: BLE001 - a __new__ of the user's that wants arguments
        try:
            exception = BaseException.__new__(cls)
        except Exception:  # noqa: BLE001 - not constructible at all: RemoteError instead
            return None
    exception.args = tuple(_unpack(value, "?") for value in recipe.get("args", ()))
    lost = [f"{name} (a {type_name})" for name, type_name in recipe.get("dropped", ())]
    for name, value in (recipe.get("attributes") or {}).items():
        try:
            setattr(exception, name, cloudpickle.loads(value))
        except Exception:  # noqa: BLE001 - one attribute lost, not the exception
            lost.append(name)
    if lost and hasattr(exception, "add_note"):
        exception.add_note("lambdafutures: attributes that could not travel from the worker: "
                           + ", ".join(lost))
    # The chained exceptions, as one-line stand-ins: the remote traceback text shows them in
    # full; __context__ keeps the nearest for code that inspects it.
    for summary in (recipe.get("cause"), recipe.get("context")):
        if summary:
            type_name, message = summary
            exception.__context__ = errors.RemoteError(type_name, message)
            break
    return exception


def _load_class(recipe: dict[str, Any]) -> type | None:
    cls = _unpack(recipe.get("class"), None)
    if cls is None:
        cls = _find_class(recipe.get("module") or "", recipe.get("qualname") or "")
    if isinstance(cls, type) and issubclass(cls, BaseException):
        return cls
    return None


def _find_class(module_name: str, qualname: str) -> Any:
    if "<locals>" in qualname or not module_name:
        return None
    try:
        found: Any = sys.modules.get(module_name) or importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
        return found
    except Exception:  # noqa: BLE001 - not here: RemoteError instead
        return None


def _unpack(data: bytes | None, default: Any) -> Any:
    if data is None:
        return default
    try:
        return cloudpickle.loads(data)
    except Exception:  # noqa: BLE001 - a value the host cannot load
        return default


def enrich_traceback(text: str) -> str:
    """`text` with the source line, from the host's linecache, under every frame that has
    none (the worker lacked the file): as a local traceback would show it."""
    if "File " not in text:
        return text
    lines = text.splitlines(keepends=True)
    enriched = []
    for index, line in enumerate(lines):
        enriched.append(line)
        match = _FRAME.match(line)
        if match is None:
            continue
        indent = match.group("indent") + "  "  # as traceback.StackSummary.format writes it
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if following.startswith(indent) and not _FRAME.match(following):
            continue  # the worker had the source
        source = _source_line(match.group("file"), int(match.group("line")))
        if source:
            enriched.append(f"{indent}{source}\n")
    return "".join(enriched)


def _source_line(file_name: str, line: int) -> str:
    # Regular files only: a name such as /dev/zero must not be read line by line.
    if file_name not in linecache.cache and not os.path.isfile(file_name):
        return ""
    return linecache.getline(file_name, line).strip()
