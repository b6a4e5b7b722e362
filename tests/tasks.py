"""Functions and classes the test suites submit.

This module is not installed, so lambdafutures ships it to workers by value: nothing here
may rely on the worker sharing the host's memory or filesystem (on the "aws" backend it
does not). Keep every function quick unless its name says it sleeps.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

# -- plain values ---------------------------------------------------------------------------

def identity(x):
    return x


def square(x):
    return x * x


def add(*args):
    return sum(args)


def kwargs_of(**kwargs):
    return kwargs


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def fail_at(x, bad):
    """x, unless x == bad: then ValueError."""
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


class Token:
    """A small object whose lifetime the stale-reference tests watch with a weakref."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Token) and other.value == self.value

    def __hash__(self):
        return hash(self.value)


def make_token(value):
    return Token(value)


# -- arrays ---------------------------------------------------------------------------------

def make_array(n, seed):
    return np.random.default_rng(seed).standard_normal(n)


def scale(array, factor):
    return array * factor


# -- exceptions -----------------------------------------------------------------------------

class CustomError(Exception):
    """An exception class of the user's own, with an extra attribute."""

    def __init__(self, message, code=0):
        super().__init__(message)
        self.code = code


class UnpicklableError(Exception):
    """Cannot be pickled at all: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class UnloadableError(Exception):
    """Pickles, but cannot be unpickled: BaseException pickles only `args`, and __init__
    needs two arguments."""

    def __init__(self, message, detail):
        super().__init__(message)
        self.detail = detail


def raise_value_error(message):
    raise ValueError(message)


def raise_custom_error(message, code):
    raise CustomError(message, code)


def raise_unpicklable_error(message):
    raise UnpicklableError(message)


def raise_unloadable_error(message):
    raise UnloadableError(message, "detail")


# -- failures -------------------------------------------------------------------------------

def return_lock():
    return threading.Lock()


def exit_with(code):
    os._exit(code)


def crash_before(deadline, code=3):
    """Crash (exit `code`) when started before the wall-clock `deadline`, after sleeping
    until it has passed; return "survived" when started after it.

    This makes "crash on the first attempt only" without any state shared with the host or
    kept in the worker (a retry may run in a fresh sandbox, on another machine): the first
    attempt starts right after submit, before the deadline, and dies after it, so any retry
    starts after the deadline."""
    now = time.time()
    if now < deadline:
        time.sleep(deadline - now + 0.05)
        os._exit(code)
    return "survived"


def stall_before(deadline, stall=30.0):
    """Sleep `stall` seconds (past any short task timeout) when started before the
    wall-clock `deadline`; return "on time" when started after it. Like `crash_before`,
    this times out on the first attempt only without any shared state."""
    if time.time() < deadline:
        time.sleep(stall)
    return "on time"


class BadStrError(Exception):
    """An exception whose str() itself fails."""

    def __str__(self):
        raise RuntimeError("this exception cannot be printed")


def raise_bad_str_error():
    raise BadStrError("hidden")


def _refuse_to_load():
    raise RuntimeError("this object refuses to be unpickled")


class Unloadable:
    """Pickles fine, but unpickling it fails (wherever that happens)."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def return_unloadable():
    return Unloadable()


def _load_only_in(pid):
    if os.getpid() != pid:
        raise RuntimeError(f"built in process {pid}, cannot be loaded in {os.getpid()}")
    return "loaded"


class HostOnly:
    """Pickles fine, but can be unpickled only in the process that pickled it: an argument
    the worker cannot load."""

    def __reduce__(self):
        return (_load_only_in, (os.getpid(),))


def exit_via_sys_exit(code):
    raise SystemExit(code)


def kill_self(signal_name):
    """Die by a signal, as a segfault (SIGSEGV) or the out-of-memory killer (SIGKILL) would."""
    import signal

    os.kill(os.getpid(), getattr(signal, signal_name))
    time.sleep(10)  # the signal arrives first


SETTING = "a"
COUNT = 0


def read_setting():
    return SETTING


def bump_count():
    """Assigns a module global: every call starts from the host's value at submit."""
    global COUNT
    COUNT += 1
    return COUNT


def append_to(item, acc=[]):  # noqa: B006 - the mutable default is the point
    acc.append(item)
    return list(acc)
