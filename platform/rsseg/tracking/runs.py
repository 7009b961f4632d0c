"""Runs: created explicitly with their tags, logged in batches, ended FINISHED, FAILED or KILLED
with the reason (no Ray MLflow callback, no ``setup_mlflow``)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rsseg.tracking.store import client, experiment_id, local_artifact_dir
from rsseg.workdir import Workdir

MAX_PARAM_VALUE = 6000
BATCH = 900  # MLflow's log_batch takes at most 1000 metrics and 100 params per call


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        text = "null" if d is None else str(d) if not isinstance(d, (list, tuple)) else "[" + ", ".join(str(x) for x in d) + "]"
        out[prefix] = text[:MAX_PARAM_VALUE]
    return out


@dataclass
class Run:
    """One MLflow run, logged in batches. Safe to pickle (holds only ids and the URI)."""

    uri: str
    run_id: str
    experiment_id: str

    @property
    def _client(self):
        return client(self.uri)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        if items:
            self._client.log_batch(self.run_id, tags=items)

    def _local_dir(self) -> Path | None:
        return local_artifact_dir(self.uri, self._client.get_run(self.run_id).info.artifact_uri)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        local = self._local_dir()
        if local is None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
            return
        import shutil

        target = local / (artifact_path or "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / Path(path).name)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        local = self._local_dir()
        if local is None:
            self._client.log_artifacts(self.run_id, str(directory), artifact_path)
            return
        import shutil

        shutil.copytree(directory, local / (artifact_path or ""), dirs_exist_ok=True)

    def last_step(self, key: str) -> int | None:
        hist = self._client.get_metric_history(self.run_id, key)
        return max((m.step for m in hist), default=None)

    def end(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def start_run(uri: str, experiment: str, name: str, tags: dict[str, Any], parent_run_id: str | None = None,
              workdir: Workdir | None = None, reuse_tag: tuple[str, str] | None = None, reopen: str | None = None) -> Run:
    """Create a run, or reuse the unfinished one whose tag ``reuse_tag`` matches (resumes), or
    reopen the run ``reopen`` whatever its status (an artifact of it is being rebuilt)."""
    exp_id = experiment_id(uri, experiment, workdir)
    c = client(uri)
    if reopen is not None:
        try:
            old = c.get_run(reopen)
        except Exception:  # noqa: BLE001 - gone (another store, deleted): a new run then
            old = None
        if old is not None and old.info.experiment_id == exp_id:
            c.update_run(reopen, status="RUNNING")
            run = Run(uri, reopen, exp_id)
            run.set_tags({"rebuilt": "true"})
            return run
    if reuse_tag is not None:
        key, value = reuse_tag
        found = c.search_runs([exp_id], filter_string=f"tags.`{key}` = '{value}'", max_results=50,
                              order_by=["attributes.start_time DESC"])
        for r in found:
            if r.info.status in ("RUNNING", "FAILED", "KILLED", "SCHEDULED"):
                c.update_run(r.info.run_id, status="RUNNING")
                run = Run(uri, r.info.run_id, exp_id)
                run.set_tags({"resumed": "true"})
                return run
    all_tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    created = c.create_run(exp_id, tags=all_tags, run_name=name)
    return Run(uri, created.info.run_id, exp_id)


def error_reason(exc: BaseException) -> str:
    """One line for an error tag: the root cause's type and message, not a traceback or a
    wrapper's "Training failed due to worker errors"."""
    from rsseg.errors import RssegError

    seen = exc
    while seen.__cause__ is not None and not isinstance(seen, RssegError):  # our one-line message is the reason
        seen = seen.__cause__
    lines = [line.strip() for line in str(seen).strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        # a remote error's text carries the worker's traceback: its last line is the real error
        return lines[-1][:500]
    wrappers = ("Training failed due to worker errors", "The following worker group", "Worker group")
    lines = [line for line in lines if not line.startswith(wrappers)] or lines
    return f"{type(seen).__name__}: {lines[0] if lines else type(seen).__name__}"[:500]


@dataclass
class Outcome:
    """What a tracked block ends its run with when it returns normally."""

    status: str = "FINISHED"
    tags: dict[str, str] | None = None


@contextlib.contextmanager
def tracked(run: Run) -> Iterator[Outcome]:
    """The one run-lifecycle guard: an exception ends the run FAILED (KILLED on Ctrl-C) with the
    reason as its ``error`` tag and is re-raised; a normal exit ends it with ``outcome.status``
    (FINISHED unless the block says otherwise). A run is never left RUNNING by an error we see."""
    outcome = Outcome()
    try:
        yield outcome
    except BaseException as exc:
        try:
            run.set_tags({"error": error_reason(exc)})
            run.end("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED")
        except Exception as store_error:  # noqa: BLE001 - the store itself failed (a full disk): report, keep the cause
            import sys

            print(f"warning: could not end MLflow run {run.run_id} ({error_reason(store_error)})", file=sys.stderr)
        raise
    if outcome.tags:
        run.set_tags(outcome.tags)
    run.end(outcome.status)


class MetricBuffer:
    """Metric points gathered per step and logged in batches (one ``log_batch`` per flush), so a
    training loop logs every step without one HTTP call per point. Points at or before
    ``logged_up_to`` (already in MLflow before a resume) are dropped."""

    def __init__(self, tracker: Run | None, logged_up_to: int = -1):
        self.tracker = tracker
        self.logged_up_to = logged_up_to
        self.points: list[tuple[int, dict[str, float]]] = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.logged_up_to:
            self.points.append((step, metrics))

    def flush(self) -> None:
        if self.tracker is not None:
            for step, metrics in self.points:
                self.tracker.log_metrics(metrics, step=step)
        self.points.clear()
