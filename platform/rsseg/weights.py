"""Released weights in (``platform weights import``) and out (``export``).

A method declares the formats it can read (`Method.importers`: format -> converter); the
converted weights go into the checkpoint store once, under a name, fingerprinted by the source's
hash with its path and format recorded. Runs then refer to them by name (DDPM:
``ddpm.features.weights: NAME`` for frozen features straight from the import, or
``pretrain.init: NAME`` to start pre-training from them).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

from rsseg.errors import CheckpointError, ConfigError
from rsseg.workdir import Workdir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED = ("ema", "raw", "random")


def formats() -> dict[str, tuple[str, Callable[..., dict]]]:
    """format -> (method, converter) over the installed methods."""
    from rsseg.methods import registry

    return {fmt: (m.name, converter) for m in registry().values() for fmt, converter in m.importers}


def source_hash(path: Path) -> str:
    """SHA-256 of a weights file, or of a directory's files (names and contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def import_options(fmt: str, converter: Callable[..., dict], options: dict[str, object]) -> dict[str, object]:
    """The options given for this import (None: not given), checked against what the format's
    converter reads (``--norm-groups`` and ``--schedule`` for ddpm-cd)."""
    import inspect

    given = {k: v for k, v in (options or {}).items() if v is not None}
    accepted = set(inspect.signature(converter).parameters) - {"path"}
    for key in given:
        if key not in accepted:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag}: the {fmt} format does not read it" + (f" (it reads {', '.join('--' + a.replace('_', '-') for a in sorted(accepted))})"
                                                                              if accepted else ""))
    return given


def import_weights(path: Path, fmt: str, name: str, workdir: Workdir | None = None,
                   options: dict[str, object] | None = None) -> tuple[object, bool]:
    """Convert ``path`` once into the store as ``name``; returns (Pretrained, newly imported).
    ``options`` go to the format's converter (e.g. ``norm_groups``, ``schedule``); given ones are
    part of the import's identity (its fingerprint), as the file is."""
    import json

    from rsseg.checkpoints import store

    workdir = workdir or Workdir.resolve()
    known = formats()
    if fmt not in known:
        raise ConfigError(f"--format {fmt!r}: unknown weights format; expected one of {', '.join(sorted(known))}")
    if not NAME_RE.match(name) or name in RESERVED:
        raise ConfigError(f"--name {name!r}: expected letters, digits, '.', '_' or '-' (and not {', '.join(RESERVED)})")
    method, converter = known[fmt]
    given = import_options(fmt, converter, options or {})
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{path}: weights not found")
    sha = source_hash(path)
    if given:  # the same file read another way is other weights
        sha = hashlib.sha256((sha + json.dumps(given, sort_keys=True)).encode()).hexdigest()
    existing = store.imported_fingerprint(workdir, name)
    if existing is not None:
        if existing == "import-" + sha[:16]:
            return store.find_imported(workdir, name), False
        raise CheckpointError(f"--name {name!r}: other weights are already imported under this name ({existing}); "
                              "choose another --name")
    state = converter(path, **given)
    return store.write_imported(workdir, name, method, state, {"source": str(path), "format": fmt, "sha256": sha, "options": given}), True
