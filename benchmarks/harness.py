"""The shared benchmark harness.

Every benchmark script builds a list of :class:`Row` from :func:`measure` calls and hands it to
:func:`report`, which prints a table whose last columns are ``reference / fast`` ratios and
writes the same rows, with the machine's description, as JSON to ``benchmarks/results/``.

Timings are medians of repeats after warm-up: the machine is shared and noisy, and ratios from
one run are what we quote.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from accelprune.tables import format_table

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int


def measure(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
            sync: Callable[[], None] | None = None) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before each clock read, for GPU work.
    """
    return measure_alternating({"fn": fn}, warmup=warmup, repeats=repeats, sync=sync)["fn"]


def measure_alternating(fns: dict[str, Callable[[], object]], *, warmup: int = 1,
                        repeats: int = 5, between: Callable[[], object] | None = None,
                        sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """:func:`measure` of several functions whose ratio is the point, run in turn, round by
    round (``warmup`` rounds first): a slow spell of a shared machine then falls on all of them
    rather than on whichever ran during it. ``between`` runs untimed before every call (e.g.
    ``gc.collect``, so that one function's garbage is not collected inside the next's time)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            if between is not None:
                between()
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: Timing(statistics.median(t), min(t), repeats) for name, t in times.items()}


@dataclasses.dataclass
class Row:
    """One benchmark case: named timings (seconds) plus free-form extra columns."""
    case: str
    timings: dict[str, float]
    extra: dict[str, object] = dataclasses.field(default_factory=dict)


def cpu_model() -> str:
    """The CPU's marketing name (CPU models differ between machines: compare ratios only)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count()),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def report(name: str, rows: list[Row], *, fast: str, references: list[str],
           notes: dict[str, object] | None = None, save: bool = True) -> dict:
    """Print ``rows`` as a table with one ``ref / fast`` ratio column per reference, and save JSON.

    Returns the JSON document (also written to ``benchmarks/results/{name}.json``).
    """
    names = list(dict.fromkeys(k for r in rows for k in r.timings))
    extras = list(dict.fromkeys(k for r in rows for k in r.extra))
    header = ["case", *extras, *names, *(f"{ref} / {fast}" for ref in references)]
    table = []
    for r in rows:
        line = [r.case, *(str(r.extra.get(k, "")) for k in extras)]
        line += [format_time(r.timings[k]) if k in r.timings else "" for k in names]
        for ref in references:
            ok = ref in r.timings and fast in r.timings and r.timings[fast] > 0
            line.append(f"{r.timings[ref] / r.timings[fast]:.1f}x" if ok else "")
        table.append(line)
    print(f"\n== {name} ==")
    print(format_table(header, table))
    doc = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "fast": fast,
        "references": references,
        "notes": notes or {},
        "rows": [
            {
                "case": r.case,
                **r.extra,
                "median_s": r.timings,
                "ratios": {
                    f"{ref} / {fast}": r.timings[ref] / r.timings[fast]
                    for ref in references if ref in r.timings and r.timings.get(fast)
                },
            }
            for r in rows
        ],
    }
    if save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"(saved {path.relative_to(RESULTS_DIR.parent.parent)})")
    return doc
