"""The MLflow store: its URI (resolved to an absolute one before a Ray trial sees it), its
initialisation (once, under a file lock: many processes touching a fresh SQLite database at once
corrupt its schema migration), its experiments and the artifacts of a local store."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from rsseg.errors import TrackingError
import rsseg.tracking.template as template
from rsseg.workdir import Workdir

PRETRAIN_EXPERIMENT = "rsseg-pretrain"
FINETUNE_EXPERIMENT = "rsseg-finetune"


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


def sqlite_path(uri: str) -> Path:
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
        parent = sqlite_path(uri).parent
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
    path = sqlite_path(uri)
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

        path = sqlite_path(uri)
        with FileLock(str(path) + ".lock"):
            fresh = not path.exists() or path.stat().st_size == 0
            copied = fresh and template.copy_to(path)
            client(uri).search_experiments(max_results=1)
            _relative_default_experiment(path)
            if fresh and not copied:
                template.save_from(path)
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
    return sqlite_path(uri).parent / "artifacts"


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
