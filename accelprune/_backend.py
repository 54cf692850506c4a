"""The one place that knows which fast paths are available.

Every public function that has a fast path takes ``backend="auto" | <fast name> | <reference
name>`` and calls :func:`resolve`. The fast paths are:

* ``"native"``: the C++ extension ``accelprune._native`` (Ward clustering);
* ``"numba"``: Numba-compiled solvers (max coverage);
* ``"triton"``: Triton kernels (importance scores, C-SGD transform), on CUDA tensors or on the
  CPU under ``TRITON_INTERPRET=1``.

Availability is probed lazily and cached, so importing accelprune stays cheap and never
initialises CUDA.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import numbers
import os

_INSTALL_HINT = {
    "native": "the C++ extension accelprune._native is not built; reinstall with "
    "`pip install -e .` (needs a C++17 compiler and pybind11)",
    "numba": "numba is not installed; `pip install numba`",
    "triton": "triton is not installed; it ships with torch on Linux (`pip install triton`)",
}


@functools.cache
def native_module():
    """The compiled extension, or None when it is not built."""
    try:
        return importlib.import_module("accelprune._native")
    except ImportError:
        return None


@functools.cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(fast: str) -> bool:
    """Whether the fast path ``fast`` ("native", "numba", "triton") can run here at all."""
    if fast == "native":
        return native_module() is not None
    if fast in ("numba", "triton"):
        return _has_module(fast)
    raise ValueError(f"unknown fast path {fast!r}")


def resolve(backend: str, *, fast: str, reference: str = "reference") -> str:
    """Map a user's ``backend`` argument to the path that will run.

    ``"auto"`` picks ``fast`` when it is available and ``reference`` otherwise (the fallback is
    only used where both give the same answer). ``"native"`` is accepted as a synonym for the
    fast path of any function. Asking explicitly for a fast path that is missing raises an error
    that says what to install.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == reference:
        return reference
    if backend in (fast, "native"):
        if not available(fast):
            raise RuntimeError(f"backend={backend!r} requested but {_INSTALL_HINT[fast]}")
        return fast
    if backend == "auto":
        return fast if available(fast) else reference
    choices = sorted({"auto", "native", fast, reference})
    raise ValueError(f"unknown backend {backend!r}; expected one of {choices}")


# The most threads any engine is asked for: beyond this a count is a mistake (2**40), not a
# machine. accelprune._native checks the same bound.
MAX_THREADS = 1 << 16


def thread_count(n_threads: int | None) -> int:
    """Validate a thread count and resolve it; None means all cores this process may use.

    Any integer type is accepted (``np.int64(2)`` too), bools are not.
    """
    if n_threads is None:
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    n_threads = int(n_threads)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    if n_threads > MAX_THREADS:
        raise ValueError(f"n_threads must be <= {MAX_THREADS}, got {n_threads}")
    return n_threads
