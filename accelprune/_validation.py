"""Input checks shared by every public function.

Bad input gets a ValueError or TypeError that names the argument and the problem, before any
work is done and without touching the caller's data.
"""
from __future__ import annotations

import numbers

import numpy as np


def as_float64_array(x, name: str, *, ndim: int | tuple[int, ...]) -> np.ndarray:
    """``x`` as a C-contiguous float64 array (a copy when needed), checked for shape and finiteness.

    Accepts numpy arrays, lists and torch tensors (any device) of any real floating or integer
    dtype, bfloat16 included.
    """
    arr = as_real_array(x, name, ndim=ndim)
    return np.asarray(arr, dtype=np.float64, order="C")  # ascontiguousarray would make 0-d 1-d


def as_float_array(x, name: str, *, ndim: int | tuple[int, ...],
                   finite: bool = True) -> np.ndarray:
    """The checks of :func:`as_float64_array`, keeping float32 and float64 as they are (a view of
    the caller's memory where it can be; other dtypes become float64): for consumers that read
    either, such as the native Ward engine, so that no float64 copy of a weight is made.
    ``finite=False`` leaves the values unchecked, for a consumer that checks them as it reads
    them (one pass over a large weight instead of two)."""
    arr = as_real_array(x, name, ndim=ndim, finite=finite)
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)


def as_real_array(x, name: str, *, ndim: int | tuple[int, ...],
                  finite: bool = True) -> np.ndarray:
    """The checks of :func:`as_float64_array` without its conversion: ``x`` as a numpy array of
    its own real dtype (a view where it can be). ``finite=False``: the values are not checked."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = _tensor_to_numpy(x, name)
    arr = np.asarray(x)
    real = np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    if arr.dtype == object or not real:
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {arr.shape}")
    if finite and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def _tensor_to_numpy(t, name: str) -> np.ndarray:
    """A torch tensor's values as a numpy array. Floating dtypes numpy has no type for (bfloat16,
    float8) go through float32 first, exactly (float32 holds every value they can)."""
    t = t.detach()
    if getattr(t, "is_meta", False):
        raise ValueError(f"{name} is on the meta device and has no values")
    t = t.cpu()
    if t.is_complex():
        raise TypeError(f"{name} must be a real numeric array, got dtype {t.dtype}")
    try:
        return t.numpy()
    except TypeError:
        if t.is_floating_point():
            return t.float().numpy()
        raise TypeError(f"{name} must be a real numeric array, got dtype {t.dtype}") from None


def as_int_array(x, name: str, *, ndim: int) -> np.ndarray:
    """``x`` as an int64 array; floats, bools and other dtypes are rejected (no silent casts)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return np.asarray(arr, dtype=np.int64, order="C")


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer within [low, high] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_fraction(value, name: str, *, allow_zero: bool = True, allow_one: bool = False) -> float:
    """A finite float in [0, 1) by default; the bounds' openness is configurable."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok_low = value > 0 or (allow_zero and value == 0)
    ok_high = value < 1 or (allow_one and value == 1)
    if not (np.isfinite(value) and ok_low and ok_high):
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value}")
    return value


def check_saved_state(state, kind: str, settings: dict, defaults: dict | None = None) -> None:
    """The checks every ``load_state_dict`` starts with: ``state`` is a ``kind.state_dict()``
    (format ``accelprune.<kind>``, version 1) made with the same ``settings`` (name → this
    object's value). A setting the state lacks takes its value in ``defaults`` (states saved
    before the setting existed). ValueError otherwise."""
    if not isinstance(state, dict) or state.get("format") != f"accelprune.{kind}":
        raise ValueError(f"state is not a {kind}.state_dict()")
    if state.get("version") != 1:
        raise ValueError(f"unsupported {kind} state version {state.get('version')!r}")
    for key, ours in settings.items():
        theirs = state["config"].get(key, (defaults or {}).get(key))
        if theirs != ours:
            raise ValueError(f"the state was made with {key}={theirs!r}, "
                             f"this {kind} has {key}={ours!r}")
