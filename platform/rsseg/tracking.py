"""MLflow: the system of record. URIs, store initialisation, runs with tags, batched logging.

Default store: SQLite in the work directory (``sqlite:///<workdir>/mlflow.db``, artifacts under
``<workdir>/artifacts``); ``MLFLOW_TRACKING_URI`` or an explicit URI (``--tracking-uri``) point
at a shared ``mlflow server`` instead. Every URI is resolved to an absolute one before a Ray
trial sees it: trials run in their own working directory, where a relative SQLite path would
silently become a new, empty database.

Many processes touching a *fresh* SQLite database at once corrupt its schema migration, so the
driver initialises the store (`init_store`, under a file lock) before any worker writes.

We own the run lifecycle (no Ray MLflow callback, no ``setup_mlflow``): runs are created
explicitly, logged with ``log_batch`` and ended FINISHED or FAILED.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rsseg.errors import TrackingError
from rsseg.workdir import Workdir

# "Creating initial MLflow database tables..." / "Updating database tables" whenever a command
# opens a new store: MLflow's business, not the user's (levels only: mlflow is not imported here)
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# With a tracking server MLflow prints two "View run / View experiment" lines per ended run, from
# every trial and worker; the CLI prints the links that matter once (a user's own setting wins)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

PRETRAIN_EXPERIMENT = "rsseg-pretrain"
FINETUNE_EXPERIMENT = "rsseg-finetune"
MAX_PARAM_VALUE = 6000
BATCH = 900  # MLflow's log_batch takes at most 1000 metrics and 100 params per call


def resolve_uri(explicit: str | None = None, workdir: Workdir | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        workdir = workdir or Workdir.resolve()
        return f"sqlite:///{workdir.mlflow_db}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            uri = f"sqlite:///{path.resolve()}"
    elif "://" not in uri:  # a bare path: a file store is refused by MLflow 3.17; use SQLite there
        path = Path(uri).expanduser().resolve()
        # a store file (store.db, or any existing file) is that SQLite database; a folder holds mlflow.db
        uri = f"sqlite:///{path if path.suffix == '.db' or path.is_file() else path / 'mlflow.db'}"
    return uri


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the URI in the message, before any work starts."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} is not healthy (GET /health -> {resp.status})")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix --tracking-uri / MLFLOW_TRACKING_URI") from None
    elif is_sqlite(uri):
        parent = _sqlite_path(uri).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"MLflow store {uri}: cannot create {parent} ({exc.strerror})") from None
        if not os.access(parent, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: {parent} is not writable")
        check_sqlite_file(uri)


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_file(uri: str) -> None:
    """A SQLite store's file is a SQLite database (or absent, or empty: a new store), else one line
    instead of SQLAlchemy's hundred-line ``file is not a database``."""
    path = _sqlite_path(uri)
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TrackingError(f"MLflow store {path}: cannot be read ({exc.strerror})") from None
    if head and head != SQLITE_HEADER:
        raise TrackingError(f"MLflow store {path}: not a SQLite database (a damaged or foreign file); move it aside, and a new "
                            "store is made there, or point --tracking-uri / MLFLOW_TRACKING_URI at another")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    if is_sqlite(uri):
        check_sqlite_file(uri)
    return MlflowClient(tracking_uri=uri)


_INITIALISED: set[str] = set()


def init_store(uri: str) -> None:
    """Create (and migrate) the store once, from one process, before any concurrent writer
    (once per process and URI: later calls return at once)."""
    if uri in _INITIALISED:
        return
    check_reachable(uri)
    if is_sqlite(uri):
        from filelock import FileLock

        path = _sqlite_path(uri)
        with FileLock(str(path) + ".lock"):
            fresh = not path.exists() or path.stat().st_size == 0
            copied = fresh and _copy_template(path)
            client(uri).search_experiments(max_results=1)
            _relative_default_experiment(path)
            if fresh and not copied:
                _save_template(path)
        _INITIALISED.add(uri)
    else:
        try:
            client(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any backend failure is the same for the user
            raise TrackingError(f"MLflow tracking store {uri} cannot be used: {str(exc).splitlines()[0]}") from None
        _INITIALISED.add(uri)


# Artifacts of a local store: ``mlflow-artifacts:/<experiment>/<run id>/artifacts/...`` URIs, kept in
# ``<store dir>/artifacts/`` — relative to the work directory, so a copied or moved work directory
# keeps serving its own artifacts: `platform ui` runs the MLflow server with that directory as its
# artifacts destination, and rsseg reads and writes it directly (no server needed).
PROXIED = "mlflow-artifacts:"


def artifacts_root(uri: str) -> Path:
    return _sqlite_path(uri).parent / "artifacts"


def template_path() -> Path:
    """An empty SQLite store at this MLflow version's schema head, kept per user
    (``$RSSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/rsseg`` or ``~/.cache/rsseg``). A fresh work
    directory copies it instead of replaying MLflow's schema migrations, seconds of every first
    command (docs/benchmarks.md, CLI start-up). An empty store holds nothing of a work directory:
    the Default experiment's artifacts are the proxied ``mlflow-artifacts:/0`` of every store."""
    from importlib.metadata import version

    root = os.environ.get("RSSEG_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rsseg")
    return Path(root) / f"mlflow-{version('mlflow')}-empty.db"


def _copy_template(db: Path) -> bool:
    """Put the template store at ``db`` (atomically); False when there is none to copy."""
    import shutil

    from rsseg.atomic import atomic_path

    template = template_path()
    if not _is_current_template(template):
        return False
    try:
        with atomic_path(db) as tmp:
            shutil.copyfile(template, tmp)
    except OSError:
        return False
    return True


def _is_current_template(template: Path) -> bool:
    """An empty SQLite store at the schema head of the installed MLflow (what MLflow itself
    verifies when it opens a store; anything else is not copied, and a good one replaces it)."""
    import sqlite3

    if not template.is_file():
        return False
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        with contextlib.closing(sqlite3.connect(f"file:{template}?mode=ro", uri=True)) as con:
            revision = con.execute("SELECT version_num FROM alembic_version").fetchall()
            runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        return revision == [(_get_latest_schema_revision(),)] and runs == 0
    except Exception:  # noqa: BLE001 - not a database, another schema, an MLflow without this helper
        return False


def _save_template(db: Path) -> None:
    """Keep the store MLflow just created (still empty) as the template; best effort, atomic."""
    import sqlite3

    from rsseg.atomic import atomic_path

    try:
        with contextlib.closing(sqlite3.connect(db)) as src:
            if src.execute("SELECT COUNT(*) FROM runs").fetchone()[0]:
                return
            with atomic_path(template_path()) as tmp, contextlib.closing(sqlite3.connect(tmp)) as dst:
                src.backup(dst)  # a consistent copy, whatever another reader does meanwhile
    except (OSError, sqlite3.Error):
        pass


def _relative_default_experiment(db: Path) -> None:
    """MLflow creates its Default experiment at ./mlruns (relative to whatever the cwd is): point it
    at the store's artifacts like every other experiment of a local store."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0 AND artifact_location NOT LIKE ?",
                    (f"{PROXIED}/0", f"{PROXIED}%"))


def artifact_location(uri: str, workdir: Workdir, experiment: str) -> str | None:
    """Artifacts of a local store live in the workdir (proxied URIs); a server decides its own."""
    if is_sqlite(uri):
        return f"{PROXIED}/{experiment}"
    return None


def local_artifact_dir(uri: str, artifact_uri: str) -> Path | None:
    """Where a run's artifacts are on disk when the store is local (None: ask the server)."""
    if is_sqlite(uri) and artifact_uri.startswith(PROXIED):
        return artifacts_root(uri) / artifact_uri[len(PROXIED):].lstrip("/")
    return None


def download_artifacts(uri: str, run_id: str, path: str, dst: Path) -> Path:
    """A run's artifact (file or directory) as a local path: the store's own copy for a local
    store, else downloaded from the server into ``dst``."""
    artifact_uri = client(uri).get_run(run_id).info.artifact_uri
    local = local_artifact_dir(uri, artifact_uri)
    if local is not None:
        found = local / path
        if not found.exists():
            raise FileNotFoundError(f"run {run_id} has no artifact {path!r}")
        return found
    return Path(client(uri).download_artifacts(run_id, path, str(dst)))


def list_artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Artifact paths of a run (one level, like MLflow's list_artifacts)."""
    artifact_uri = client(uri).get_run(run_id).info.artifact_uri
    local = local_artifact_dir(uri, artifact_uri)
    if local is None:
        return [a.path for a in client(uri).list_artifacts(run_id, path)]
    base = local / path if path else local
    return sorted(str(p.relative_to(local)) for p in base.iterdir()) if base.is_dir() else []


def experiment_id(uri: str, name: str, workdir: Workdir | None = None, description: str = "") -> str:
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    tags = {"mlflow.experimentKind": "custom_model_development"}  # the UI's model-training view, not GenAI
    if description:
        tags["mlflow.note.content"] = description
    try:
        return c.create_experiment(name, artifact_location=artifact_location(uri, workdir or Workdir.resolve(), name), tags=tags)
    except MlflowException:  # created concurrently
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


VIEW_KEY = "rsseg"  # the experiment's shared view: tag mlflow.sharedViewState.rsseg, URL ?viewStateShareKey=rsseg
VIEW_QUERY = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def set_sweep_view(uri: str, exp_id: str, axes: list[str], metric: str = "val/mIoU", mode: str = "max") -> None:
    """The MLflow UI's view of a sweep's experiment, as the experiment's shared view state (the UI
    loads it from ``?viewStateShareKey=``): the trials (not the parent runs), best on the search
    metric first, with a column per search axis (the trial's ``space.<axis>`` tag) and the
    validation and test mIoU; every run shown. Column keys are the UI's (``metrics.`val/mIoU```)."""
    import json

    def col(kind: str, key: str) -> str:
        return f"{kind}.`{key}`"

    metrics = [metric] + [m for m in ("val/mIoU", "test/mIoU") if m != metric]
    state = {
        "searchFilter": "tags.kind = 'finetune'", "orderByKey": col("metrics", metric), "orderByAsc": mode == "min",
        "selectedColumns": [col("tags", f"space.{a}") for a in axes] + [col("metrics", m) for m in metrics]
                           + [col("attributes", "Duration")],
        "runsHiddenMode": "SHOW_ALL",
    }
    client(uri).set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(state))


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
