"""The one table formatter: reports, the demo, the CLI and the benchmarks print through it."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(header: Sequence, rows: Sequence[Sequence], *, align: str | None = None,
                 markdown: bool = False) -> str:
    """``rows`` under ``header`` as aligned plain text (a rule under the header), or as a
    Markdown table with ``markdown=True``.

    align: one letter per column, ``"l"`` or ``"r"``; by default the first column is left-aligned
    (names) and the others right-aligned (numbers). Cells are formatted with ``str``.
    """
    header = [str(h) for h in header]
    cells = [[str(c) for c in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells for {len(header)} columns")
    if align is None:
        align = "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align must be one 'l' or 'r' per column, got {align!r}")
    if markdown:
        rule = ["---:" if a == "r" else "---" for a in align]
        return "\n".join("| " + " | ".join(r) + " |" for r in [header, rule, *cells])
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(row, widths, align, strict=True)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells)])
