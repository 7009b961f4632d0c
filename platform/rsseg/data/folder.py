"""A user's own data: ``<root>/images/`` + ``<root>/masks/`` + a class table (docs/own-data.md).

Images and masks are GeoTIFF or PNG, paired by file stem (``images/a.tif`` with ``masks/a.png``
is fine). Images without a mask are used unlabelled (pre-training). The class table is
``data.class_table`` (a named table or a YAML path relative to the root), else
``<root>/classes.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from rsseg.data.classes import ClassTable
from rsseg.data.scenes import SceneSet, pair_by_stem
from rsseg.errors import DataError

EXTS = (".tif", ".tiff", ".png")
LAYOUT = "folder layout: <root>/images/*.tif|png, <root>/masks/*.tif|png paired by stem, <root>/classes.yaml"


def _stem(p: Path) -> str:
    return p.stem


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTS)


def discover(root: Path, table: ClassTable) -> SceneSet:
    if not root.is_dir():
        raise DataError(f"dataset root {root} not found; expected the {LAYOUT}")
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir():
        raise DataError(f"dataset root {root}: missing images/ folder; expected the {LAYOUT}")
    masks = _files(masks_dir) if masks_dir.is_dir() else []
    labelled, unlabeled, orphans = pair_by_stem(_files(images_dir), masks, _stem, _stem, kind="scene")
    if orphans:
        stem, mask = next(iter(orphans.items()))
        raise DataError(f"mask {mask} has no image with stem {stem!r} in {images_dir}")
    if not labelled:
        raise DataError(f"dataset root {root}: no image in images/ has a mask in masks/; expected the {LAYOUT}")
    return SceneSet(dataset="folder", root=root, table=table, labelled=tuple(labelled), unlabeled=tuple(unlabeled), layout=LAYOUT)


def default_table_path(root: Path) -> Path:
    return root / "classes.yaml"
