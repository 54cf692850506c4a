"""The repair ladder for Numba's disk cache (accelprune._numba_cache), step by step, on stand-in
dispatchers that fail a chosen number of times. test_coverage.py damages a real cache."""

import types
import warnings

import pytest

from accelprune._backend import available
from accelprune._numba_cache import KernelsUnavailable, cache_dir, load_or_repair

needs_numba = pytest.mark.skipif(not available("numba"), reason="numba is not installed")


class StandInCache:
    def __init__(self, log, flush_fails=False):
        self._cache_path = "/somewhere/__pycache__"
        self.log, self.flush_fails = log, flush_fails

    def flush(self):
        if self.flush_fails:
            raise PermissionError("read-only directory")
        self.log.append("flush")


def stand_in_kernels(log, flush_fails=False):
    """What ``make`` returns: two dispatcher-like objects, new ones on every call."""
    log.append("make")
    return tuple(types.SimpleNamespace(py_func=types.SimpleNamespace(__name__=name),
                                       _cache=StandInCache(log, flush_fails))
                 for name in ("_first_py", "_second_py"))


def failing_check(times):
    """A check that raises the first ``times`` calls (a damaged cache), then passes."""
    calls = []

    def check(kernels):
        calls.append(kernels)
        if len(calls) <= times:
            raise EOFError("truncated cache file")
    return check, calls


def test_a_good_cache_is_used_as_it_is():
    log = []
    check, calls = failing_check(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels = load_or_repair(lambda: stand_in_kernels(log), check, "accelprune.test")
    assert kernels is calls[0] and log == ["make"]


def test_a_damaged_cache_is_flushed_and_rebuilt_with_one_warning():
    log = []
    check, calls = failing_check(1)
    with pytest.warns(RuntimeWarning) as record:
        kernels = load_or_repair(lambda: stand_in_kernels(log), check, "accelprune.test")
    assert len(record) == 1
    message = str(record[0].message)
    for part in ("accelprune.test", "/somewhere/__pycache__", "_first_py, _second_py",
                 "EOFError: truncated cache file", "recompiling and rewriting it"):
        assert part in message
    assert log == ["make", "flush", "flush", "make"]  # both indexes emptied, then new kernels
    assert kernels is calls[1]


@needs_numba
@pytest.mark.parametrize("flush_fails", [False, True])
def test_when_rebuilding_fails_too_the_kernels_compile_without_a_cache(flush_fails):
    from numba.core.caching import NullCache

    log = []
    check, calls = failing_check(1 if flush_fails else 2)
    with pytest.warns(RuntimeWarning):
        kernels = load_or_repair(lambda: stand_in_kernels(log, flush_fails), check, "t")
    assert kernels is calls[-1]
    assert all(isinstance(kernel._cache, NullCache) for kernel in kernels)


@needs_numba
def test_kernels_unavailable_when_nothing_compiles():
    log = []
    check, calls = failing_check(10)
    with pytest.warns(RuntimeWarning), pytest.raises(KernelsUnavailable, match="EOFError"):
        load_or_repair(lambda: stand_in_kernels(log), check, "accelprune.test")
    assert len(calls) == 3  # as loaded, after the flush, without a cache


def test_cache_dir_of_a_kernel_without_a_cache():
    assert cache_dir(types.SimpleNamespace()) == "(no cache directory)"
    assert cache_dir(stand_in_kernels([])[0]) == "/somewhere/__pycache__"
