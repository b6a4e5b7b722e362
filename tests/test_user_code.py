"""The user's own code on the worker: helper modules it was never given, pickling errors that
say what failed, tracebacks that show the user's source, and exceptions that keep their type.

Every helper module is written into tmp_path under a fresh name: a module that an earlier
test (or another xdist worker's test) has shipped already could hide a first-submit bug.
Workers do not see tmp_path (local workers start without the host's sys.path or cwd).
"""

from __future__ import annotations

import functools
import linecache
import textwrap
import threading
import time
import uuid

import pytest
import tasks

import lambdafutures
from lambdafutures import RemoteError, SerializationError, TaskExited

_LIB = """
import threading

LOCK = threading.Lock()


def double(x):
    return 2 * x


def fail(x):
    y = x + 1
    raise ValueError(f"cannot fit {y}")  # the failing line


def guarded(x):
    with LOCK:
        return x
"""

_PACKAGE_INIT = """
from .tools import triple
"""

_PACKAGE_TOOLS = """
from . import constants


def triple(x):
    return constants.THREE * x
"""

_APP = """
import functools

import {lib}
import {pkg}.tools
from {lib} import double


def by_name(x):
    return {lib}.double(x)


def imported_name(x):
    return double(x)


def through_package(x):
    return {pkg}.tools.triple(x)


def through_package_init(x):
    return {pkg}.triple(x)


def nested(x):
    def inner(y):
        return {lib}.double(y)
    return inner(x)


class Doubler:
    def run(self, x):
        return {lib}.double(x)


def scale(factor, x):
    return factor * {lib}.double(x)
"""


def _fresh(prefix: str) -> str:
    return f"lf_{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """write(source, ...) -> a fresh module of the user's project, importable on the host
    only; {lib} and {pkg} in the app's source name a fresh helper module and package."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write_module(source: str) -> str:
        name = _fresh("lib")
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    def write_package() -> str:
        name = _fresh("pkg")
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(_PACKAGE_INIT)
        (tmp_path / name / "tools.py").write_text(_PACKAGE_TOOLS)
        (tmp_path / name / "constants.py").write_text("THREE = 3\n")
        return name

    class Code:
        @staticmethod
        def lib():
            return __import__(write_module(_LIB))

        @staticmethod
        def app():
            name = write_module(_APP.format(lib=write_module(_LIB), pkg=write_package()))
            return __import__(name)

    return Code


def call_run(obj, x):
    return obj.run(x)


# -- helper modules go by value on the first submit --------------------------------------------


@pytest.mark.parametrize("case, expected", [
    ("by_name", 14), ("imported_name", 14), ("through_package", 21),
    ("through_package_init", 21), ("nested", 14), ("method_of_argument", 14),
    ("bound_method", 14), ("partial", 42),
])
def test_helper_module_reached_on_the_first_submit(make_executor, user_code, case, expected):
    app = user_code.app()
    if case == "method_of_argument":
        submitted = (call_run, app.Doubler(), 7)
    elif case == "bound_method":
        submitted = (app.Doubler().run, 7)
    elif case == "partial":
        submitted = (functools.partial(app.scale, 3), 7)
    else:
        submitted = (getattr(app, case), 7)
    ex = make_executor()
    assert ex.submit(*submitted).result(timeout=60) == expected


def test_helper_module_in_a_closure_and_a_default(make_executor, user_code):
    lib = user_code.lib()

    def through_closure(x):
        return lib.double(x)

    ex = make_executor()
    assert ex.submit(through_closure, 5).result(timeout=60) == 10

    other = user_code.lib()

    def through_default(x, helpers=other):
        return helpers.double(x)

    assert ex.submit(through_default, 6).result(timeout=60) == 12


DEFAULT_WIDTH = 7


def make_box():
    class Box:  # its body reads a global: cloudpickle alone does not send it
        width = DEFAULT_WIDTH

    return Box.width


def test_class_defined_in_the_task_reads_a_global_in_its_body(make_executor):
    assert make_executor().submit(make_box).result(timeout=60) == 7


def test_module_attribute_that_cannot_travel_is_explained_where_it_is_used(make_executor,
                                                                           user_code):
    # The helper module holds a lock: a task using only its functions runs; one that reaches
    # the lock learns why it is missing on the worker.
    lib = user_code.lib()
    ex = make_executor()
    assert ex.submit(lambda x: lib.double(x), 2).result(timeout=60) == 4
    exception = ex.submit(lambda: lib.LOCK).exception(timeout=60)
    assert isinstance(exception, AttributeError)
    assert "LOCK" in str(exception) and "cannot be pickled" in str(exception)


def test_module_imported_from_the_working_directory(make_executor, tmp_path, monkeypatch):
    # As in a notebook: sys.path holds "" and the helper sits in the notebook's directory.
    name = _fresh("nbhelpers")
    (tmp_path / f"{name}.py").write_text(_LIB)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")
    helpers = __import__(name)
    ex = make_executor()
    assert ex.submit(lambda x: helpers.double(x), 4).result(timeout=60) == 8


# -- pickling errors name what failed ----------------------------------------------------------


def test_serialization_error_names_the_argument_and_its_type(make_executor):
    ex = make_executor()
    with pytest.raises(SerializationError, match=r"positional argument 1 \(a _thread\.lock\)"):
        ex.submit(tasks.add, 1, threading.Lock())
    with pytest.raises(SerializationError, match=r"keyword argument 'lock' \(a _thread\.lock\)"):
        ex.submit(tasks.kwargs_of, fine=1, lock=threading.Lock())
    with pytest.raises(SerializationError, match=r"attribute 'guard' of positional argument 0"):
        ex.submit(tasks.identity, _Holder())
    with pytest.raises(SerializationError, match=r"positional argument 0 of call 1 in the chunk"):
        ex.map(tasks.identity, [1, threading.Lock()], chunksize=2)


class _Holder:
    def __init__(self):
        self.guard = threading.Lock()


def test_serialization_error_names_the_global_or_closure_variable(make_executor, user_code):
    ex = make_executor()
    lib = user_code.lib()
    with pytest.raises(SerializationError, match=r"global 'LOCK' \(a _thread\.lock\)"):
        ex.submit(lib.guarded, 1)
    lock = threading.Lock()

    def uses_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError,
                       match=r"uses_lock.*closure variable 'lock' \(a _thread\.lock\)"):
        ex.submit(uses_lock)
    assert ex.submit(tasks.square, 3).result(timeout=60) == 9


# -- tracebacks show the user's files, lines and source ----------------------------------------


def test_traceback_names_the_user_file_line_and_source(make_executor, user_code):
    lib = user_code.lib()
    ex = make_executor()
    with pytest.raises(ValueError, match="cannot fit 3") as info:
        ex.submit(lib.fail, 2).result(timeout=60)
    text = info.value.__cause__.text
    line = _LIB.splitlines().index(
        '    raise ValueError(f"cannot fit {y}")  # the failing line') + 1
    source = 'raise ValueError(f"cannot fit {y}")  # the failing line'
    # As a local traceback shows it: the frame, then its source line once, indented.
    assert f'  File "{lib.__file__}", line {line}, in fail\n    {source}\n' in text
    assert text.count(source) == 1
    assert "<dynamic-code>" not in text


def test_traceback_source_comes_from_the_host_when_the_worker_lacks_it(make_executor):
    # A notebook cell: its code's file exists only in the host's linecache, as IPython does.
    cell = f"/tmp/ipykernel_0/{_fresh('cell')}.py"
    source = "def crunch(x):\n    total = x * 2\n    return total / (x - x)  # cell line 3\n"
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, cell, "exec"), namespace)  # noqa: S102 - it stands for a cell
    ex = make_executor()
    try:
        exception = ex.submit(namespace["crunch"], 5).exception(timeout=60)
    finally:
        linecache.cache.pop(cell, None)
    assert isinstance(exception, ZeroDivisionError)
    text = exception.__cause__.text
    source = "return total / (x - x)  # cell line 3"
    assert f'  File "{cell}", line 3, in crunch\n    {source}\n' in text
    assert text.count(source) == 1


# -- exceptions keep their type ----------------------------------------------------------------


class BadFit(Exception):
    """Its __init__ takes other arguments than it passes on: default unpickling fails."""

    def __init__(self, x, y):
        super().__init__(f"{x}{y}")
        self.x = x


def raise_bad_fit(x, y):
    raise BadFit(x, y)


def test_exception_with_a_custom_init_keeps_its_class(make_executor):
    ex = make_executor()
    try:
        ex.submit(raise_bad_fit, 1, 2).result(timeout=60)
    except BadFit as exception:
        assert exception.args == ("12",)
        assert exception.x == 1
        assert isinstance(exception.__cause__, lambdafutures.RemoteTraceback)
        assert "raise_bad_fit" in exception.__cause__.text
    else:
        pytest.fail("BadFit was not raised")


def raise_unfindable():
    class Unfindable(Exception):  # local, and holding a generator: cannot travel by value
        pending = (n for n in range(3))

    raise Unfindable("nowhere")


def test_exception_whose_class_cannot_be_loaded_becomes_remote_error(make_executor):
    ex = make_executor()
    exception = ex.submit(raise_unfindable).exception(timeout=60)
    assert isinstance(exception, RemoteError)
    assert "Unfindable" in exception.type_name and exception.message == "nowhere"


def test_sys_exit_in_a_task_is_a_typed_error(make_executor):
    ex = make_executor()
    future = ex.submit(tasks.exit_via_sys_exit, 3)
    with pytest.raises(TaskExited, match="SystemExit") as info:
        future.result(timeout=60)
    assert info.value.code == 3 and info.value.type_name == "SystemExit"
    assert ex.submit(tasks.square, 2).result(timeout=60) == 4  # and this process goes on


def interrupt():
    raise KeyboardInterrupt


def sleep_then_square(x):
    time.sleep(0.2)
    return x * x


def test_keyboard_interrupt_in_a_task_leaves_the_other_tasks_running(make_executor):
    with pytest.raises(TaskExited, match="KeyboardInterrupt"):
        with make_executor(max_workers=2) as ex:
            others = [ex.submit(sleep_then_square, i) for i in range(6)]
            ex.submit(interrupt).result(timeout=60)
    assert [future.result(timeout=60) for future in others] == [i * i for i in range(6)]
