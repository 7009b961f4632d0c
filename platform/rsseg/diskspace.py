"""Free space checks before long writes: a full disk is said up front, in one line, not found
by a training step hours in (and then retried)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rsseg.errors import DiskFullError

MB = 1 << 20


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def require(path: str | os.PathLike, need: int, what: str) -> None:
    """Raise DiskFullError unless ``need`` bytes are free where ``path`` lives."""
    free = free_bytes(path)
    if free < need:
        raise DiskFullError(f"no space left on {path}: {what} needs ~{need / MB:.0f} MB, {free / MB:.0f} MB free; "
                            "free space there or use another --workdir")


def no_space_message(path: str, what: str, resumable: bool = False) -> str:
    return (f"no space left on {path} ({what}); free space there or use another --workdir"
            + (" (complete checkpoints are kept: --resume continues from the last one)" if resumable else ""))
