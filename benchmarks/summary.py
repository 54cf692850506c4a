"""Markdown tables of the saved benchmark results (``benchmarks/results/*.json``).

The README's benchmark tables are this script's output: ``python -m benchmarks.summary``.
"""
from __future__ import annotations

import json
import sys

from accelprune.tables import format_table
from benchmarks.harness import RESULTS_DIR, format_time

ORDER = ["ward", "coverage", "reprune", "kernels_csgd_cpu", "kernels_importance_cpu", "csgd",
         "kmeans", "groups", "large"]


def table(doc: dict) -> str:
    timings = list(dict.fromkeys(k for r in doc["rows"] for k in r["median_s"]))
    ratios = list(dict.fromkeys(k for r in doc["rows"] for k in r["ratios"]))
    header = ["case", *timings, *ratios]
    rows = []
    for r in doc["rows"]:
        cells = [r["case"]]
        cells += [format_time(r["median_s"][k]) if k in r["median_s"] else "" for k in timings]
        cells += [f"**{r['ratios'][k]:.1f}x**" if k in r["ratios"] else "" for k in ratios]
        rows.append(cells)
    return format_table(header, rows, markdown=True)


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or ORDER
    for name in names:
        path = RESULTS_DIR / f"{name}.json"
        if not path.is_file():
            print(f"(no results for {name}: run python -m benchmarks.bench_{name.split('_')[0]})\n")
            continue
        doc = json.loads(path.read_text())
        machine = doc["machine"]
        device = machine.get("gpu") or f"{machine['cpus']} CPU cores"
        print(f"**{doc['benchmark']}** ({device}, {doc['date'][:10]})\n")
        print(table(doc))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
