"""BLAS threads for a Lambda sandbox, chosen before numpy can load.

A Lambda sandbox shows 2 CPUs up to about 3 GB of memory (6 at 10 GB) but gets one vCPU of
time per 1,769 MB. OpenBLAS and friends start one thread per visible CPU, so at the default
2,048 MB a DGEMM runs two threads on 1.16 CPUs of quota and is 1.4-1.8x slower than with
one. This module runs first when the worker package is imported (handler/__init__.py), and
on Lambda (AWS_LAMBDA_FUNCTION_MEMORY_SIZE set) sets the thread-count variables that the
BLAS libraries read once, when they load:

- LAMBDAFUTURES_BLAS_THREADS, if set in the function's environment, wins;
- else, if the user set any of them in the function's environment, all are left as they are;
- else max(1, memory_mb // 1769), capped at the visible CPU count.

Outside Lambda (the host, which imports this package too) nothing changes; the local backend
sets one thread in its workers' environment itself. `blas_threads()` says what is in
effect, for stats and benchmarks.
"""

from __future__ import annotations

import os

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                         "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
OVERRIDE_VARIABLE = "LAMBDAFUTURES_BLAS_THREADS"
# Lambda's documented CPU share: one vCPU-second per second at 1,769 MB.
MB_PER_VCPU = 1769

_chosen: int | None = None


def threads_for_memory(memory_mb: int, cpus: int | None = None) -> int:
    """The BLAS thread count that fits a sandbox of `memory_mb`: whole vCPUs of its share,
    at least one, at most the CPUs it can see."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(cpus, memory_mb // MB_PER_VCPU))


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def configure(environ: os._Environ | dict[str, str] | None = None) -> int | None:
    """Set the BLAS thread variables in `environ` (default os.environ) as described above;
    returns the thread count in effect, or None when not on Lambda and nothing is set."""
    environ = os.environ if environ is None else environ
    override = _positive_int(environ.get(OVERRIDE_VARIABLE))
    memory = _positive_int(environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"))
    if memory is not None and override is not None:
        for variable in BLAS_THREAD_VARIABLES:
            environ[variable] = str(override)
        return override
    if memory is not None and not any(v in environ for v in BLAS_THREAD_VARIABLES):
        wanted = threads_for_memory(memory)
        for variable in BLAS_THREAD_VARIABLES:
            environ[variable] = str(wanted)
    # What OpenBLAS (numpy's wheels) will use: its own variable, else OpenMP's.
    return (_positive_int(environ.get("OPENBLAS_NUM_THREADS"))
            or _positive_int(environ.get("OMP_NUM_THREADS")))


def blas_threads() -> int | None:
    """The BLAS thread count set for this process (by this module, the user, the local
    backend or `set_blas_threads`), or None when nothing was set and the BLAS library
    picks its own."""
    return _chosen


# OpenBLAS's setter as numpy's wheels (scipy-openblas, 64-bit ints) and plain builds name it.
_OPENBLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads")


def set_blas_threads(count: int) -> int:
    """Use `count` BLAS threads from now on, also in a warm sandbox where numpy has loaded
    OpenBLAS already (its setter is called through ctypes, as threadpoolctl does). Returns
    how many loaded OpenBLAS libraries took it (0: none is loaded yet, and the variables
    set here take effect when one loads)."""
    global _chosen
    if count < 1:
        raise ValueError("BLAS threads must be at least 1")
    for variable in BLAS_THREAD_VARIABLES:
        os.environ[variable] = str(count)
    _chosen = count
    applied = 0
    for path in _loaded_openblas():
        import ctypes

        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _OPENBLAS_SETTERS:
            setter = getattr(library, name, None)
            if setter is not None:
                setter(ctypes.c_int(count))
                applied += 1
                break
    return applied


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (Linux; elsewhere none)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "openblas" in line}
    except OSError:
        return []
    return sorted(path for path in paths if path.startswith("/"))


_chosen = configure()
