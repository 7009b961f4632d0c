"""MLflow -> polars: the finished, tagged fine-tuning runs behind the paper's tables.

One row per run: the tags the tables are queries on (``table``, ``method``, ``label_ratio``,
``frozen``, ``timesteps``, ...), the metrics in percent (``mIoU``, ``IoU/<class>``) and the
trainable-parameter count. Only FINISHED runs are read: a FAILED, KILLED or still RUNNING run
never reaches a table.

Re-runs do not double-count: a trial is identified by its ``trial_key`` tag (the fingerprint of
its resolved config, seed included), and only the latest finished run of each key is kept.
Different seeds have different keys, so they all count and are aggregated (mean, std, n).
A run without a ``trial_key`` (tagged by hand) counts once as itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rsseg import tracking
from rsseg.errors import RssegError
from rsseg.runtags import RunTags



TEST_MIOU = "test/mIoU"


class TablesError(RssegError):
    pass


@dataclass
class Store:
    """What was read: the runs (a polars DataFrame) and where from."""

    uri: str
    runs: Any  # polars.DataFrame, one row per kept run
    experiments: list[str]
    skipped: dict[tuple[str, str], int]  # (table, why) -> how many runs were not kept
    warning: str | None = None


def _empty_frame():
    import polars as pl

    cols = {"run_id": pl.Utf8, "experiment": pl.Utf8, "end_time": pl.Int64, **{c: pl.Utf8 for c in RunTags.columns()},
            "trainable_params": pl.Float64}
    return pl.DataFrame(schema=cols)


def read_runs(uri: str, experiments: list[str] | None = None) -> Store:
    """Every finished run tagged ``table=...`` in ``experiments`` (default: all) of the store."""
    import polars as pl

    tracking.check_reachable(uri)
    if tracking.is_sqlite(uri) and not tracking.sqlite_path(uri).exists():
        return Store(uri, _empty_frame(), [], {}, f"no MLflow store at {tracking.sqlite_path(uri)} (run a sweep first)")
    c = tracking.client(uri)
    try:
        all_exps = c.search_experiments()
    except Exception as exc:  # noqa: BLE001 - any backend failure reads the same to the user
        raise TablesError(f"MLflow tracking store {uri} cannot be read: {str(exc).splitlines()[0]}") from None
    by_name = {e.name: e for e in all_exps}
    if experiments:
        missing = [n for n in experiments if n not in by_name]
        if missing:
            raise TablesError(f"--experiment {missing[0]!r}: no such experiment in {uri} "
                              f"(have: {', '.join(sorted(by_name)) or 'none'})")
        exps = [by_name[n] for n in experiments]
    else:
        exps = list(all_exps)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    names = {e.experiment_id: e.name for e in exps}
    if exps:
        runs = c.search_runs([e.experiment_id for e in exps], filter_string="tags.table != '' and tags.kind = 'finetune'", max_results=50000)
        for r in runs:
            why = r.info.status.lower() if r.info.status != "FINISHED" else ("incomplete (no test/mIoU)" if TEST_MIOU not in r.data.metrics else None)
            if why:
                k = (r.data.tags.get("table", ""), why)
                skipped[k] = skipped.get(k, 0) + 1
                continue
            row: dict[str, Any] = {"run_id": r.info.run_id, "experiment": names[r.info.experiment_id],
                                   "end_time": int(r.info.end_time or r.info.start_time or 0)}
            row.update({c: "" for c in RunTags.columns()} | RunTags.from_tags(r.data.tags).row())
            row["trainable_params"] = r.data.metrics.get("params/trainable")
            for k, v in r.data.metrics.items():
                if k == TEST_MIOU or k.startswith("test/IoU/"):
                    row[k[len("test/"):]] = 100.0 * float(v)
                elif k.startswith("reference/") and k.endswith("/mIoU"):  # reference/<name>/mIoU -> ref_<name>
                    row[f"ref_{k.split('/')[1]}"] = 100.0 * float(v)
            rows.append(row)
    if not rows:
        frame = _empty_frame()
    else:
        frame = pl.DataFrame(rows, infer_schema_length=None)
    frame = dedupe(frame)
    used = sorted(set(frame["experiment"].to_list())) if frame.height else []
    warning = None if frame.height else f"no finished runs tagged table=... in {uri}"
    return Store(uri, frame, used, skipped, warning)


def dedupe(frame):
    """Latest finished run per (table, trial_key); runs without a key are kept as they are."""
    import polars as pl

    if frame.height == 0:
        return frame
    key = pl.when(pl.col("trial_key") == "").then(pl.col("run_id")).otherwise(pl.col("trial_key"))
    return (frame.with_columns(_key=key).sort("end_time", descending=True)
            .unique(subset=["table", "_key"], keep="first", maintain_order=True).drop("_key")
            .sort("end_time"))
