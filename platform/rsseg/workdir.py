"""The work directory (node-local) and the storage (shared by every node of a cluster).

On one machine everything the platform writes lives under one directory, so that a user can see,
move or delete everything the platform made. Resolution order: an explicit path (the CLI's global
``--workdir``), then the ``RSSEG_WORKDIR`` environment variable, then ``./rsseg-work``. The path is
always made absolute: Ray trials run in their own working directory, where a relative path means
something else.

On a cluster whose nodes share no filesystem (KubeRay pods, cloud VMs) the work directory is each
node's own scratch: generated data, tile indexes, the feature cache, Ray's temp. What another node
must read lives in the *storage* (``--storage`` / ``RSSEG_STORAGE``; a path every node mounts, e.g.
NFS, or object storage such as ``s3://bucket/prefix``, mirrored in each work directory by
`rsseg.storage`): pre-training checkpoints and trunk points, imported weights, trained models, Ray
Train's and Tune's storage, the sweeps' state and the trials' resume state. Without ``--storage``
the storage is the work directory itself: the same layout as ever on a laptop.
`rsseg.clustercheck.preflight` checks, on every node, that the storage is the same one there.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from rsseg.errors import ConfigError

ENV_VAR = "RSSEG_WORKDIR"
STORAGE_ENV_VAR = "RSSEG_STORAGE"
DEFAULT_NAME = "rsseg-work"


def _local_path(raw: str | os.PathLike, option: str, what: str) -> Path:
    """An absolute local path; ``file://`` accepted, any other URI scheme refused in one line (it
    would otherwise become a relative folder named ``s3:``)."""
    text = os.fspath(raw)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme != "file":
            raise ConfigError(f"{option} {text}: {what} is a local path on each node, not a {scheme}:// URI; put what nodes "
                              "share on --storage (docs/cluster.md)")
        text = "/" + rest.lstrip("/")
    return Path(text).expanduser().resolve()


@functools.lru_cache(maxsize=8)
def filesystem(uri: str):
    """(pyarrow filesystem, base path within it) of an object-storage URI; one line when pyarrow
    cannot use it."""
    from pyarrow import fs  # only where object storage is used

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise ConfigError(f"--storage {uri}: not a storage URI pyarrow can open ({str(exc).splitlines()[0]})") from None


def _is_object_storage(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Workdir:
    root: Path
    storage: Path | None = None  # a mounted storage every node sees; None: the work directory (or `remote`)
    remote: str | None = None  # object storage (s3://bucket/prefix...), mirrored under <root>/storage (rsseg.storage)

    @classmethod
    def resolve(cls, explicit: str | os.PathLike | None = None, storage: str | os.PathLike | None = None) -> "Workdir":
        raw = explicit if explicit is not None else os.environ.get(ENV_VAR) or DEFAULT_NAME
        root = _local_path(raw, "--workdir", "the work directory")
        shared = storage if storage is not None else os.environ.get(STORAGE_ENV_VAR) or None
        if shared and _is_object_storage(os.fspath(shared)):
            filesystem(os.fspath(shared))  # one line now when pyarrow cannot open it
            return cls(root, None, os.fspath(shared))
        shared_path = _local_path(shared, "--storage", "the storage") if shared else None
        return cls(root, None if shared_path == root else shared_path)

    @classmethod
    def at(cls, root: str, storage: str | None) -> "Workdir":
        """The driver's work directory and storage as passed to a Ray worker (absolute paths, no
        environment consulted: a worker of a cluster started earlier has another environment)."""
        if storage and _is_object_storage(storage):
            return cls(Path(root), None, storage)
        return cls(Path(root), Path(storage) if storage else None)

    @property
    def shared(self) -> Path:
        """Where what every node reads lives: the storage, its local mirror (object storage), or
        the work directory on one machine."""
        return self.storage or (self.root / "storage" if self.remote else self.root)

    @property
    def storage_arg(self) -> str | None:
        """The storage as passed to another process (``--storage``, ``RSSEG_STORAGE``), None: none."""
        return self.remote or (str(self.storage) if self.storage else None)

    def ensure(self) -> "Workdir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def check(self) -> "Workdir":
        """A usable work directory (and storage): a directory (or creatable), writable. One-line errors."""
        for option, path in (("--workdir", self.root), ("--storage", self.storage)):
            if path is None:
                continue
            if path.exists() and not path.is_dir():
                raise ConfigError(f"{option} {path}: is a file; expected a directory (or a path to create one)")
            existing = next((p for p in (path, *path.parents) if p.exists()), None)
            if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(f"{option} {path}: {existing} is not writable")
        return self

    def sub(self, *parts: str) -> Path:
        """A location in the work directory (not created: a dry run writes nothing; writers
        create what they write into)."""
        return self.root.joinpath(*parts)

    # Named locations, so that every module agrees on the layout. Node-local scratch:
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
    def ray_local(self) -> Path:
        """Ray's temp and the records of local clusters this work directory started."""
        return self.sub("ray")

    # Shared (the storage):
    @property
    def checkpoints(self) -> Path:
        return self.shared / "checkpoints"

    @property
    def ray_storage(self) -> Path:
        """Ray Train's and Tune's ``storage_path``."""
        return self.shared / "ray"

    @property
    def sweeps(self) -> Path:
        return self.shared / "sweeps"

    @property
    def models(self) -> Path:
        return self.shared / "models"

    @property
    def artifacts(self) -> Path:
        return self.sub("artifacts")

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    def export(self) -> None:
        """Publish this workdir (and storage) to child processes (Ray workers inherit the driver's env)."""
        os.environ[ENV_VAR] = str(self.root)
        if self.storage_arg is not None:
            os.environ[STORAGE_ENV_VAR] = self.storage_arg
        else:
            os.environ.pop(STORAGE_ENV_VAR, None)


def current() -> Workdir:
    return Workdir.resolve()
