import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accelprune.schedule import SCHEDULES, SparsitySchedule, sparsity_at

RAMPS = [k for k in SCHEDULES if k != "constant"]


@pytest.mark.parametrize("kind", SCHEDULES)
def test_endpoints_are_hit_exactly(kind):
    kw = dict(final=0.7, t_start=10, t_end=50, kind=kind, initial=0.1)
    assert sparsity_at(0, **kw) == 0.1
    assert sparsity_at(9.5, **kw) == 0.1
    assert sparsity_at(50, **kw) == 0.7
    assert sparsity_at(1000, **kw) == 0.7
    if kind != "constant":
        assert sparsity_at(10, **kw) == 0.1


def test_constant_jumps_at_t_start_and_allows_zero_length():
    assert sparsity_at(4, final=0.5, t_start=5, t_end=5, kind="constant") == 0.0
    assert sparsity_at(5, final=0.5, t_start=5, t_end=5, kind="constant") == 0.5
    assert sparsity_at(6, final=0.5, t_start=5, t_end=20, kind="constant") == 0.5


@pytest.mark.parametrize("kind", SCHEDULES)
@settings(max_examples=30, deadline=None)
@given(initial=st.floats(0, 0.5), extra=st.floats(0, 0.49), t_start=st.integers(-5, 5),
       length=st.integers(1, 300))
def test_monotone_and_within_bounds(kind, initial, extra, t_start, length):
    final = initial + extra
    ts = np.linspace(t_start - 3, t_start + length + 3, 257)
    values = [sparsity_at(float(t), final=final, t_start=t_start, t_end=t_start + length,
                          kind=kind, initial=initial) for t in ts]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))  # pairs: one shorter
    assert min(values) >= initial and max(values) <= final


def test_shapes_match_their_formulas_at_midpoint():
    kw = dict(final=0.8, t_start=0, t_end=100)
    assert sparsity_at(50, kind="linear", **kw) == pytest.approx(0.4)
    assert sparsity_at(50, kind="cubic", **kw) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert sparsity_at(50, kind="sinusoidal", **kw) == pytest.approx(0.4)
    assert sparsity_at(50, kind="exponential", **kw) == pytest.approx(
        0.8 * (1 - math.exp(-2.5)) / (1 - math.exp(-5)))
    # cubic and exponential prune fast early, sinusoidal slowly
    early = {k: sparsity_at(10, kind=k, **kw) for k in RAMPS}
    assert early["sinusoidal"] < early["linear"] < early["cubic"]
    assert early["linear"] < early["exponential"]


def test_schedule_object_matches_function():
    sched = SparsitySchedule(0.9, 0, 20, kind="cubic", initial=0.2)
    for t in range(-2, 25):
        assert sched(t) == sparsity_at(t, final=0.9, t_start=0, t_end=20, kind="cubic", initial=0.2)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(kind="quadratic"), ValueError, "unknown schedule kind"),
    (dict(kind=3), TypeError, "kind"),
    (dict(t_end=10), ValueError, "t_end"),
    (dict(t_end=5), ValueError, "t_end"),
    (dict(final=1.0), ValueError, "final"),
    (dict(final=-0.1), ValueError, "final"),
    (dict(final=float("nan")), ValueError, "final"),
    (dict(final="0.5"), TypeError, "final"),
    (dict(initial=0.6), ValueError, "initial"),
    (dict(t_start=float("inf")), ValueError, "t_start"),
    (dict(rate=0.0, kind="exponential"), ValueError, "rate"),
])
def test_bad_input(kwargs, exc, match):
    kw = dict(final=0.5, t_start=10, t_end=20, kind="linear")
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        sparsity_at(12, **kw)
    with pytest.raises(exc, match=match):
        SparsitySchedule(**kw)


def test_bad_t():
    with pytest.raises(ValueError, match="t must be finite"):
        sparsity_at(float("nan"), final=0.5, t_start=0, t_end=1)
    with pytest.raises(TypeError, match="t must be"):
        sparsity_at(None, final=0.5, t_start=0, t_end=1)
    with pytest.raises(ValueError, match="t_end"):
        sparsity_at(0, final=0.5, t_start=3, t_end=2, kind="constant")
