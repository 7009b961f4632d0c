"""A sweep's own files in the work directory: its state (the Tune experiments of each invocation),
the lock that lets one driver run it, and the private Ray storage --resume unpickles from."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from rsseg.errors import SweepError
from rsseg.workdir import Workdir

log = logging.getLogger(__name__)


def state_path(workdir: Workdir, name: str) -> Path:
    return workdir.sweeps / name / "state.json"


def read_state(workdir: Workdir, name: str) -> dict[str, Any] | None:
    p = state_path(workdir, name)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def write_state(workdir: Workdir, name: str, state: dict[str, Any]) -> None:
    from rsseg.atomic import atomic_write_text

    atomic_write_text(state_path(workdir, name), json.dumps(state, indent=2))


@contextlib.contextmanager
def sweep_lock(workdir: Workdir, name: str):
    """One driver per sweep name and work directory: a second one says who holds the sweep and
    stops (two drivers would run every trial twice and leave neither resumable). A lock whose
    process is gone (this host) is stale and taken over."""
    import socket

    path = workdir.sweeps / name / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                log.warning("sweep %s: taking over a stale lock of pid %s (no longer running)", name, holder.get("pid"))
                path.unlink(missing_ok=True)
                continue
            raise SweepError(f"sweep {name!r} is already running in {workdir.root} (pid {holder.get('pid', '?')} on "
                             f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it or stop it "
                             f"(a lock left by a crash on another host: delete {path})") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": dt.datetime.now().isoformat(timespec="seconds")}))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def private_storage(workdir: Workdir) -> tuple[str, Any]:
    """The sweeps' Ray storage (path, pyarrow filesystem or None), a local one created or re-moded
    0700: Tune's state in it is unpickled on --resume, so no other user may write (or read) it,
    whatever the umask of a shared work dir. (Object storage: its bucket's access policy decides.)"""
    from rsseg import storage as shared

    if workdir.remote is not None:
        return shared.ray_location(workdir, "sweeps")
    storage = workdir.ray_storage / "sweeps"
    storage.mkdir(parents=True, exist_ok=True)
    for p in (workdir.ray_storage, storage):
        os.chmod(p, 0o700)
    return str(storage), None


def check_owner(workdir: Workdir, name: str, tune_names: list[str]) -> None:
    """--resume unpickles Tune's experiment state (tuner.pkl): only from storage this user owns."""
    if workdir.remote is not None:
        return  # object storage has no owner uid: the bucket's access policy is the boundary
    for tune_name in tune_names:
        path = workdir.ray_storage / "sweeps" / tune_name
        if path.exists() and path.stat().st_uid != os.getuid():
            raise SweepError(f"cannot resume sweep {name!r}: {path} belongs to another user (uid {path.stat().st_uid}); resuming "
                             "would run code from their files (docs/sweeps.md, trust boundary)")
