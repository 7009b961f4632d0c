"""The one work directory for everything the platform writes.

Generated data, tile indexes, the feature cache, pre-training checkpoints, the MLflow store and
Ray's storage all live under one directory, so that a user can see, move or delete everything the
platform made. Resolution order: an explicit path (the CLI's global ``--workdir``), then the
``RSSEG_WORKDIR`` environment variable, then ``./rsseg-work``. The path is always made absolute:
Ray trials run in their own working directory, where a relative path means something else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rsseg.errors import ConfigError

ENV_VAR = "RSSEG_WORKDIR"
DEFAULT_NAME = "rsseg-work"


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike | None = None) -> "Workdir":
        raw = explicit if explicit is not None else os.environ.get(ENV_VAR) or DEFAULT_NAME
        return cls(Path(raw).expanduser().resolve())

    def ensure(self) -> "Workdir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def check(self) -> "Workdir":
        """A usable work directory: a directory (or creatable), writable. One-line errors."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--workdir {self.root}: is a file; expected a directory (or a path to create one)")
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"--workdir {self.root}: {existing} is not writable")
        return self

    def sub(self, *parts: str) -> Path:
        """A location in the work directory (not created: a dry run writes nothing; writers
        create what they write into)."""
        return self.root.joinpath(*parts)

    # Named locations, so that every module agrees on the layout.
    @property
    def data(self) -> Path:
        return self.sub("data")

    @property
    def indexes(self) -> Path:
        return self.sub("indexes")

    @property
    def cache(self) -> Path:
        return self.sub("cache")

    @property
    def checkpoints(self) -> Path:
        return self.sub("checkpoints")

    @property
    def ray_storage(self) -> Path:
        return self.sub("ray")

    @property
    def sweeps(self) -> Path:
        return self.sub("sweeps")

    @property
    def artifacts(self) -> Path:
        return self.sub("artifacts")

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    def export(self) -> None:
        """Publish this workdir to child processes (Ray workers inherit the driver's env)."""
        os.environ[ENV_VAR] = str(self.root)


def current() -> Workdir:
    return Workdir.resolve()
