"""Provenance: every artifact carries its resolved config, git commit and package version."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import rsseg


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the source tree rsseg runs from (``unknown`` outside a checkout).

    A dirty tree is marked ``+dirty`` so that a number is never attributed to a commit that did
    not produce it.
    """
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return os.environ.get("RSSEG_GIT_COMMIT", "unknown")
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src, capture_output=True, text=True, timeout=10,
        )
        suffix = "+dirty" if dirty.stdout.strip() else ""
        return commit.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("RSSEG_GIT_COMMIT", "unknown")


def package_version() -> str:
    return rsseg.__version__


def stamp() -> dict[str, str]:
    return {"git_commit": git_commit(), "rsseg_version": package_version()}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj: Any, length: int = 16) -> str:
    """Content hash of a JSON-able object (sorted keys): equal specs, equal fingerprints."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]
