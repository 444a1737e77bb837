"""`longctx bench NAME`: benchmarks that print a table and optionally write JSON and a PNG.

Each benchmark is a module `longctx/bench/<name>.py` with:
    DESCRIPTION: str
    add_arguments(parser) -> None        # its own flags (sizes, world size, ...)
    run(ns) -> dict                      # {"rows": [...], "columns": [...], "title": str, ...}
    plot(result, path) -> None           # a PNG for --plot
Performance is measured here, never in timed unit tests.
"""

from __future__ import annotations

import importlib
import json
import math
import os

BENCHMARKS = ("kernels", "cp", "cad", "memory", "train")


def load(name: str):
    """The benchmark module `longctx/bench/<name>.py` (a name in BENCHMARKS)."""
    if name not in BENCHMARKS:
        raise SystemExit(f"longctx: error: unknown benchmark '{name}'; available: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"longctx.bench.{name}")


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells])


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)


def render(result: dict) -> str:
    parts = []
    for table in result.get("tables", [result]):
        if table.get("title"):
            parts.append(table["title"])
        parts.append(format_table(table["rows"], table["columns"]))
        if table.get("notes"):
            parts.append(table["notes"])
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
