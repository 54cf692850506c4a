"""Numba kernels cached on disk, with a damaged cache repaired rather than failing the call.

A kernel compiled with ``cache=True`` is loaded from ``__pycache__`` (or ``NUMBA_CACHE_DIR``). A
cache file that was truncated or overwritten fails on loading in many ways (UnpicklingError,
EOFError, LLVM errors), so every failure is handled alike, by one ladder:

1. load or compile the kernels and check them;
2. warn, naming the cache directory; empty each function's cache index (Numba's ``flush``) and
   try again, which compiles and rewrites the cache;
3. try again without a cache (e.g. the directory is not writable);
4. raise :class:`KernelsUnavailable`: the caller takes its slower path, with a warning of its own.

Numba is imported only by the steps that need it, so importing this module costs nothing.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["KernelsUnavailable", "cache_dir", "load_or_repair"]

Kernels = TypeVar("Kernels", bound=Sequence)


class KernelsUnavailable(RuntimeError):
    """Numba could neither load nor compile the kernels (the caller falls back)."""


def cache_dir(kernel) -> str:
    """The directory of a Numba dispatcher's on-disk cache, for messages."""
    cache = getattr(kernel, "_cache", None)
    return str(getattr(cache, "_cache_path", "(no cache directory)"))


def load_or_repair(make: Callable[[], Kernels], check: Callable[[Kernels], None], owner: str,
                   *, stacklevel: int = 2) -> Kernels:
    """``make()`` the kernels (Numba dispatchers) and ``check`` them, climbing the ladder above
    when that raises; returns the kernels that passed.

    ``check`` is whatever loads them: compiling a signature, or running a small instance and
    comparing with a reference (which also catches wrong machine code). ``make`` may return new
    dispatchers each time (a failed load can leave one half set up) or the same ones.
    ``owner`` starts the warning ("accelprune.coverage"). Raises :class:`KernelsUnavailable`
    when even an uncached compile fails.
    """
    kernels = make()
    try:
        check(kernels)
        return kernels
    except Exception as exc:  # noqa: BLE001  (a damaged cache fails in many ways)
        names = ", ".join(kernel.py_func.__name__ for kernel in kernels)
        warnings.warn(f"{owner}: Numba's cache in {cache_dir(kernels[0])} could not be used "
                      f"for {names} ({type(exc).__name__}: {exc}); recompiling and rewriting it",
                      RuntimeWarning, stacklevel=stacklevel + 1)
    try:
        for kernel in kernels:
            kernel._cache.flush()  # an empty index: the next compile rewrites the cache
        kernels = make()
        check(kernels)
        return kernels
    except Exception:  # noqa: BLE001  (e.g. an unwritable cache directory)
        pass
    try:
        from numba.core.caching import NullCache

        kernels = make()
        for kernel in kernels:
            kernel._cache = NullCache()  # last resort: compile in memory only
        check(kernels)
        return kernels
    except Exception as exc:  # noqa: BLE001
        raise KernelsUnavailable(f"{type(exc).__name__}: {exc}") from exc
