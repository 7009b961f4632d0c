"""Object storage (``s3://``, ``gs://``, any pyarrow filesystem URI) as the shared storage, through
a node-local mirror.

The platform reads and writes shared things as files under ``Workdir.shared``. With a mounted
storage (NFS, or the work directory on one machine) that *is* the storage, and everything here
is a no-op. With object storage (``--storage s3://bucket/prefix``) ``Workdir.shared`` is a mirror
in each node's work directory (``<workdir>/storage``): a writer *pushes* what it wrote, a reader
*pulls* what it is about to read. Shared objects are written once under names that say what they
are (a checkpoint's step, a pre-training's or a model's fingerprint / run id), so a local copy
that exists is that object and is not downloaded again; what is rewritten in place (a trial's
resume state, DONE.json of a rebuilt pre-training) is pulled ``fresh``.

Endpoint and options travel in the URI (pyarrow's syntax, e.g.
``s3://bucket/prefix?endpoint_override=10.0.0.5:9000&scheme=http``); credentials come from the
environment of each node (an instance role, or ``AWS_ACCESS_KEY_ID`` ... where ``ray start`` runs),
never from the URI, and are not copied into Ray's job settings.
"""

from __future__ import annotations

from pathlib import Path

from rsseg.workdir import Workdir, filesystem


def _remote_of(path: Path):
    """(filesystem, remote path) of a local path in this process's storage mirror, else None."""
    wd = Workdir.resolve()
    if wd.remote is None:
        return None
    try:
        rel = Path(path).resolve().relative_to(wd.shared)
    except ValueError:
        return None
    fs, base = filesystem(wd.remote)
    return fs, f"{base.rstrip('/')}/{rel.as_posix()}" if str(rel) != "." else base


def _download(fs, remote: str, local: Path) -> None:
    from rsseg.atomic import atomic_path

    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(local) as tmp, fs.open_input_stream(remote) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)


def pull(path: Path, *, fresh: bool = False, pattern: str | None = None) -> None:
    """Make the local copy of ``path`` (a file, or a folder and what it holds) current: download
    what is missing (everything with ``fresh``). ``pattern``: a folder's files matching this glob
    (relative to it) only. Absent remotely: nothing happens (the reader then finds nothing)."""
    found = _remote_of(path)
    if found is None:
        return
    from pyarrow import fs as pafs

    fs, remote = found
    info = fs.get_file_info(remote)
    if info.type == pafs.FileType.File:
        if fresh or not Path(path).exists():
            _download(fs, remote, Path(path))
        return
    if info.type != pafs.FileType.Directory:
        return
    for item in fs.get_file_info(pafs.FileSelector(remote, recursive=True)):
        if item.type != pafs.FileType.File:
            continue
        rel = item.path[len(remote):].lstrip("/")
        local = Path(path) / rel
        if pattern is not None and not Path(rel).match(pattern):
            continue
        if fresh or not local.exists():
            _download(fs, item.path, local)


def push(path: Path) -> None:
    """Upload ``path`` (a file, or a folder's files) from the mirror to the storage."""
    found = _remote_of(path)
    if found is None:
        return
    fs, remote = found
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        target = remote if p == path else f"{remote}/{p.relative_to(path).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(p, "rb") as src, fs.open_output_stream(target) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)


def remove(path: Path) -> None:
    """Delete ``path``'s object from the storage (the local copy is the caller's)."""
    found = _remote_of(path)
    if found is None:
        return
    from pyarrow import fs as pafs

    fs, remote = found
    if fs.get_file_info(remote).type == pafs.FileType.File:
        fs.delete_file(remote)


def ray_location(workdir, *parts: str) -> tuple[str, object | None]:
    """Ray Train's / Tune's ``storage_path`` and ``storage_filesystem`` for ``parts`` under the
    storage's ``ray/`` folder: a local path and None, or the object store's path and filesystem."""
    if workdir.remote is None:
        return str(workdir.ray_storage.joinpath(*parts)), None
    fs, base = filesystem(workdir.remote)
    return "/".join([base.rstrip("/"), "ray", *parts]), fs
