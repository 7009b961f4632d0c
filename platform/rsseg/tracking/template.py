"""The empty SQLite store a fresh work directory copies instead of replaying MLflow's schema
migrations (seconds of every first command); a cache, so every failure to use it is silent."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def template_path() -> Path:
    """An empty SQLite store at this MLflow version's schema head, kept per user
    (``$RSSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/rsseg`` or ``~/.cache/rsseg``). A fresh work
    directory copies it instead of replaying MLflow's schema migrations, seconds of every first
    command (docs/benchmarks.md, CLI start-up). An empty store holds nothing of a work directory:
    the Default experiment's artifacts are the proxied ``mlflow-artifacts:/0`` of every store."""
    from importlib.metadata import version

    root = os.environ.get("RSSEG_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rsseg")
    return Path(root) / f"mlflow-{version('mlflow')}-empty.db"


def copy_to(db: Path) -> bool:
    """Put the template store at ``db`` (atomically); False when there is none to copy."""
    import shutil

    from rsseg.atomic import atomic_path

    template = template_path()
    if not is_current(template):
        return False
    try:
        with atomic_path(db) as tmp:
            shutil.copyfile(template, tmp)
    except OSError:
        return False
    return True


def is_current(template: Path) -> bool:
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


def save_from(db: Path) -> None:
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
