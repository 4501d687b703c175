"""Rows of dicts as CSV or markdown text: ``results.csv``, ``test_results.csv/.md``,
``predictions.csv``, ``tune_results.csv/.md``. Each caller keeps its own cell format; the columns
are every key of the rows, in the order they first appear."""

from __future__ import annotations

import csv
import io
from typing import Any, Callable, Mapping, Optional, Sequence

Row = Mapping[str, Any]


def header_of(rows: Sequence[Row]) -> list[str]:
    """Every key of the rows, in the order it first appears."""
    return list(dict.fromkeys(key for row in rows for key in row))


def csv_text(rows: Sequence[Row], cell: Callable[[Any], Any], lineterminator: str = "\n") -> str:
    """The rows as CSV text; ``cell`` formats each value (a missing one is None)."""
    header = header_of(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows({key: cell(row.get(key)) for key in header} for row in rows)
    return text.getvalue()


def markdown_table(rows: Sequence[Row], cell: Callable[[Any], str],
                   bold: Optional[Callable[[Row], bool]] = None) -> str:
    """The rows as a GitHub markdown table; the non-empty cells of a row ``bold`` picks are bold."""
    header = header_of(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [cell(row.get(key)) for key in header]
        if bold is not None and bold(row):
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
