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

    store.py     URIs, store initialisation, experiments, artifacts of a local store
    template.py  the empty-store template a fresh work directory copies
    runs.py      a run's lifecycle: start with tags, batched logging, the outcome
"""

from __future__ import annotations

import logging
import os

# "Creating initial MLflow database tables..." / "Updating database tables" whenever a command
# opens a new store: MLflow's business, not the user's (levels only: mlflow is not imported here)
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# With a tracking server MLflow prints two "View run / View experiment" lines per ended run, from
# every trial and worker; the CLI prints the links that matter once (a user's own setting wins)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

# the package's names, whichever module holds them (callers write ``tracking.client(uri)``)
from rsseg.tracking.runs import BATCH, MAX_PARAM_VALUE, MetricBuffer, Outcome, Run, error_reason, flatten, start_run, tracked  # noqa: E402
from rsseg.tracking.store import (  # noqa: E402
    _INITIALISED, FINETUNE_EXPERIMENT, PRETRAIN_EXPERIMENT, PROXIED, VIEW_KEY, VIEW_QUERY, artifact_location, artifacts_root,
    check_reachable, check_sqlite_file, client, download_artifacts, experiment_id, init_store, is_sqlite, list_artifacts,
    local_artifact_dir, resolve_uri, set_sweep_view, sqlite_path,
)
from rsseg.tracking.template import template_path  # noqa: E402

__all__ = [
    "BATCH", "FINETUNE_EXPERIMENT", "MAX_PARAM_VALUE", "PRETRAIN_EXPERIMENT", "PROXIED", "VIEW_KEY", "VIEW_QUERY", "MetricBuffer",
    "Outcome", "Run", "_INITIALISED", "artifact_location", "artifacts_root", "check_reachable", "check_sqlite_file", "client",
    "download_artifacts", "error_reason", "experiment_id", "flatten", "init_store", "is_sqlite", "list_artifacts",
    "local_artifact_dir", "resolve_uri", "set_sweep_view", "sqlite_path", "start_run", "template_path", "tracked",
]
