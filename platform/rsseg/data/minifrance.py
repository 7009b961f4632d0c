"""MiniFrance (Castillo-Navarro et al. 2022), as released and as re-released (DFC2022).

Images ``<stem>.jp2.tif`` (or ``BDORTHO/<stem>.tif``), 3-band uint8, 0.5 m, EPSG:2154; labels
``<stem>_UA2012.tif``, codes 0-15 on the same grid. The folder layout of the original download
is not certain, so files are discovered recursively and paired by stem; images without a label
are the unlabelled scenes used for pre-training. Stems read
``<dept>-<year>-<X km>-<Y km top>-LA93-0M50-E080``, so the expected transform is
``from_origin(X * 1000, Y * 1000, 0.5, 0.5)``.
"""

from __future__ import annotations

import re
from pathlib import Path

from rsseg.data.classes import ClassTable
from rsseg.data.scenes import SceneSet, pair_by_stem, strip_suffix
from rsseg.errors import DataError

LABEL_SUFFIX = "_UA2012.tif"
STEM_RE = re.compile(r"^(?P<dept>\d{2,3}[AB]?)-(?P<year>\d{4})-(?P<x>\d{4})-(?P<y>\d{4})-LA93-0M50-E080$")
LAYOUT = (
    "MiniFrance layout: <root>/**/<stem>.jp2.tif (or BDORTHO/<stem>.tif) images and "
    "<root>/**/<stem>_UA2012.tif labels, stems like 44-2013-0300-6750-LA93-0M50-E080"
)


def expected_origin(stem: str) -> tuple[float, float] | None:
    """Top-left corner in EPSG:2154 metres implied by a MiniFrance stem (None if not one)."""
    m = STEM_RE.match(stem)
    if not m:
        return None
    return int(m.group("x")) * 1000.0, int(m.group("y")) * 1000.0


image_stem = strip_suffix((".jp2.tif", ".tif", ".tiff"))
label_stem = strip_suffix((LABEL_SUFFIX,))


def discover(root: Path, table: ClassTable) -> SceneSet:
    if not root.is_dir():
        raise DataError(f"dataset root {root} not found; expected the {LAYOUT}")
    tifs = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith((".tif", ".tiff")))
    labels = [p for p in tifs if p.name.endswith(LABEL_SUFFIX)]
    images = [p for p in tifs if not p.name.endswith(LABEL_SUFFIX)]
    if not images:
        raise DataError(f"dataset root {root} holds no image GeoTIFFs; expected the {LAYOUT}")
    labelled, unlabeled, orphans = pair_by_stem(images, labels, image_stem, label_stem, kind="MiniFrance scene")
    if orphans:
        stem = next(iter(orphans))
        raise DataError(f"label {stem}{LABEL_SUFFIX} under {root} has no image {stem}.jp2.tif")
    if not labelled:
        raise DataError(f"dataset root {root}: no image has a {LABEL_SUFFIX} label; expected the {LAYOUT}")
    return SceneSet(
        dataset="minifrance", root=root, table=table, labelled=tuple(labelled), unlabeled=tuple(unlabeled),
        value_range=(0.0, 255.0), layout=LAYOUT,
    )
