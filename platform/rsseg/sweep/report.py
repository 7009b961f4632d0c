"""The sweep's answer on its parent run, readable in the MLflow UI without `platform tables`:
``sweep_table.json`` (MLflow's table format: one row per trial, its axis values, status,
validation and test mIoU, the winner marked) and ``sweep_chart.png`` (the swept axis against
validation and test mIoU, mean and spread over the other axes, e.g. seeds)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

TABLE = "sweep_table.json"
CHART = "sweep_chart.png"


def table(trials: list[dict[str, Any]], axes: list[str], best_id: str | None) -> dict[str, list]:
    """MLflow's table layout (pandas' ``orient="split"`` without an index), mIoU in %."""
    def pct(v):
        return None if v is None else round(100 * float(v), 2)

    columns = axes + ["status", "val mIoU", "test mIoU", "best (val)", "run_id"]
    rows = [[str(t["values"].get(a, "")) for a in axes]
            + [t["status"], pct(t.get("val/mIoU")), pct(t.get("mIoU")), t["run_id"] == best_id, t["run_id"]]
            for t in sorted(trials, key=lambda t: str(t["values"]))]
    return {"columns": columns, "data": rows}


def chart_axis(axes: list[str]) -> str | None:
    """The axis the chart's x shows: the first that is not the seed (None: only seeds vary)."""
    return next((a for a in axes if a != "seed"), None)


def chart(trials: list[dict[str, Any]], axis: str, out: Path, title: str, order: list[str] | None = None) -> Path | None:
    """Validation and test mIoU (%) per value of ``axis`` (in ``order``, the sweep file's grid
    order, where given): the mean over the trials sharing the value (seeds), with their range as
    error bars; None when no trial finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [t for t in trials if t["status"] == "FINISHED" and t.get("mIoU") is not None]
    if not done:
        return None
    seen = {str(t["values"].get(axis, "")) for t in done}
    values = [v for v in (order or []) if v in seen] + sorted(seen - set(order or []))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(values) + 2), 3.6))
    x = np.arange(len(values))
    for key, label, offset, colour in (("val/mIoU", "validation", -0.08, "#2272b4"), ("mIoU", "test", 0.08, "#c83243")):
        groups = [[100 * t[key] for t in done if str(t["values"].get(axis, "")) == v and t.get(key) is not None] for v in values]
        mean = np.array([np.mean(g) if g else np.nan for g in groups])
        lo = mean - np.array([min(g) if g else np.nan for g in groups])
        hi = np.array([max(g) if g else np.nan for g in groups]) - mean
        ax.errorbar(x + offset, mean, yerr=[lo, hi], fmt="o-", capsize=3, label=label, color=colour)
    ax.set_xticks(x, values, rotation=20 if max(len(v) for v in values) > 8 else 0, ha="right" if max(len(v) for v in values) > 8 else "center")
    ax.set_xlabel(axis)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def log(parent_run, trials: list[dict[str, Any]], axes: list[str], best_id: str | None, name: str,
        orders: dict[str, list[str]] | None = None) -> None:
    """Both artifacts on the parent run; the table is registered as one (``mlflow.loggedArtifacts``)
    so that the UI shows it as a table."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / TABLE
        path.write_text(json.dumps(table(trials, axes, best_id)))
        parent_run.log_artifact(path)
        axis = chart_axis(axes)
        if axis is not None:
            drawn = chart(trials, axis, Path(d) / CHART, f"{name}: mIoU per {axis.split('.')[-1]} (mean, range over the other axes)",
                          (orders or {}).get(axis))
            if drawn is not None:
                parent_run.log_artifact(drawn)
    parent_run.set_tags({"mlflow.loggedArtifacts": json.dumps([{"path": TABLE, "type": "table"}])})
