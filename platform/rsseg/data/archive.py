"""Archive imagery for step-1 pre-training: any folder of GeoTIFFs, unlabelled."""

from __future__ import annotations

from pathlib import Path

from rsseg.data.classes import ClassTable
from rsseg.data.scenes import Scene, SceneSet
from rsseg.errors import DataError


def discover(root: Path, table: ClassTable, glob: str = "**/*.tif") -> SceneSet:
    if not root.is_dir():
        raise DataError(f"archive root {root} not found; expected a folder of GeoTIFFs ({glob})")
    files = sorted(p for p in root.glob(glob) if p.is_file())
    if not files:
        raise DataError(f"archive root {root}: no files match {glob!r}; expected a folder of GeoTIFFs")
    scenes, seen = [], {}
    for p in files:
        sid = str(p.relative_to(root).with_suffix("")).replace("/", "__")
        seen[sid] = p
        scenes.append(Scene(id=sid, image=p))
    return SceneSet(dataset="archive", root=root, table=table, labelled=(), unlabeled=tuple(scenes), layout="folder of GeoTIFFs")
