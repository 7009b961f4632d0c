"""The paper's published numbers (Tables 1-5, and the values Section 4.2 states for Fig. 9), as
data: ``baselines/rsseg_baselines/published/paper_tables.csv`` (table, row, column, value,
source, note), typed in from the paper and checked against its text by a test."""

from __future__ import annotations

import csv
import functools
import io
from importlib import resources


@functools.lru_cache(maxsize=1)
def _rows() -> list[dict[str, str]]:
    try:
        text = (resources.files("rsseg_baselines.published") / "paper_tables.csv").read_text()
    except (ModuleNotFoundError, FileNotFoundError):  # the baselines package is not installed
        return []
    return list(csv.DictReader(io.StringIO(text)))


def values(table: str) -> dict[tuple[str, str], float]:
    return {(r["row"], r["column"]): float(r["value"]) for r in _rows() if r["table"] == table}


def source(table: str) -> str:
    srcs = sorted({r["source"] for r in _rows() if r["table"] == table})
    return "; ".join(srcs) if srcs else "not available (install rsseg_baselines)"
