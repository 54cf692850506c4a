"""Progressive sparsity schedules: how much of the network is pruned at step (or epoch) t.

Every schedule ramps from ``initial`` at ``t <= t_start`` to ``final`` at ``t >= t_end`` and is
monotone non-decreasing in between. With p = (t - t_start) / (t_end - t_start) in [0, 1] and
d = final - initial:

    constant     final from t_start on (one-shot pruning at the first event; t_end is unused)
    linear       initial + d * p
    cubic        final - d * (1 - p)**3                 (Zhu & Gupta 2017: fast start, slow end)
    exponential  initial + d * (1 - exp(-r p)) / (1 - exp(-r)),  r = ``rate`` (default 5)
    sinusoidal   initial + d * (1 - cos(pi p)) / 2      (slow start, slow end)

Where this differs from the seed's code (seed 002's ``ProgressiveScheduler``): its "cubic" is
``initial + d * p**3`` (slow start) and its "exponential" is ``final * (1 - (1 - p)**3)``, which
is Zhu & Gupta's cubic with initial fixed at 0. accelprune follows the contract: "cubic" is Zhu
& Gupta's, and "exponential" is a true exponential approach, normalised to hit both endpoints.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

from accelprune._validation import check_fraction

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cubic", "exponential", "sinusoidal")

_RAMPS = {
    "linear": lambda p, rate: p,
    "cubic": lambda p, rate: 1.0 - (1.0 - p) ** 3,
    "exponential": lambda p, rate: -math.expm1(-rate * p) / -math.expm1(-rate),
    "sinusoidal": lambda p, rate: (1.0 - math.cos(math.pi * p)) / 2.0,
}


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_schedule(kind, *, final, t_start, t_end, initial, rate):
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string, got {type(kind).__name__}")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {list(SCHEDULES)}")
    final = check_fraction(final, "final")
    initial = check_fraction(initial, "initial")
    if initial > final:
        raise ValueError(f"initial sparsity ({initial}) must not exceed final sparsity ({final}): "
                         "schedules only ever prune more")
    t_start = _check_real(t_start, "t_start")
    t_end = _check_real(t_end, "t_end")
    # "constant" jumps at t_start, so it has no ramp length to divide by; callers doing one-shot
    # pruning may pass t_end == t_start.
    if kind == "constant" and t_end < t_start:
        raise ValueError(f"t_end ({t_end}) must be >= t_start ({t_start})")
    if kind != "constant" and t_end <= t_start:
        raise ValueError(f"t_end ({t_end}) must be > t_start ({t_start}) for a {kind!r} ramp")
    rate = _check_real(rate, "rate")
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return final, initial, t_start, t_end, rate


def _evaluate(t: float, kind: str, final: float, t_start: float, t_end: float, initial: float,
              rate: float) -> float:
    if kind == "constant":
        return final if t >= t_start else initial
    # Endpoints are returned exactly, not computed, so callers can compare them with ==.
    if t <= t_start:
        return initial
    if t >= t_end:
        return final
    p = (t - t_start) / (t_end - t_start)
    value = initial + (final - initial) * _RAMPS[kind](p, rate)
    # Rounding could step a hair outside [initial, final] next to an endpoint; clamping keeps the
    # sequence monotone.
    return min(max(value, initial), final)


def sparsity_at(t, *, final, t_start, t_end, kind: str = "linear", initial: float = 0.0,
                rate: float = 5.0) -> float:
    """The target sparsity at step/epoch ``t`` of a ``kind`` schedule (see the module docstring).

    t, t_start, t_end: finite real numbers; ramps need ``t_end > t_start``.
    final, initial: sparsities in [0, 1) with ``initial <= final``.
    rate: steepness of the "exponential" schedule (ignored by the others).
    Returns a float in [initial, final]; ``initial`` for ``t <= t_start`` (``final`` from
    ``t_start`` on for "constant") and ``final`` for ``t >= t_end``.
    """
    final, initial, t_start, t_end, rate = _check_schedule(
        kind, final=final, t_start=t_start, t_end=t_end, initial=initial, rate=rate)
    return _evaluate(_check_real(t, "t"), kind, final, t_start, t_end, initial, rate)


@dataclasses.dataclass(frozen=True)
class SparsitySchedule:
    """A schedule checked once and then called per step: ``SparsitySchedule(0.9, 0, 100)(t)``."""
    final: float
    t_start: float
    t_end: float
    kind: str = "linear"
    initial: float = 0.0
    rate: float = 5.0

    def __post_init__(self):
        _check_schedule(self.kind, final=self.final, t_start=self.t_start, t_end=self.t_end,
                        initial=self.initial, rate=self.rate)

    def __call__(self, t) -> float:
        return _evaluate(_check_real(t, "t"), self.kind, float(self.final), float(self.t_start),
                         float(self.t_end), float(self.initial), float(self.rate))
