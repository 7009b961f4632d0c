"""GID, the Gaofen Image Dataset (Tong et al. 2020): GID-5 (coarse) and GID-15 (fine).

``Large-scale Classification_5classes/{image_RGB,image_NirRGB,label_5classes}/`` and
``Fine Land-cover Classification_15classes/{image_RGB,image_NirRGB,label_15classes}/``. Images
``<stem>.tif`` (7200 x 6800, uint8, RGB or NIR-R-G-B, usually without CRS), labels
``<stem>_label.tif`` as 3-band colour maps (black = unlabelled), mapped through the palette.

``level: fine`` fine-tunes on the GID-15 images and pre-trains (step 2) on the GID-5 images that
are not among them (the paper's 140 homogeneous images); ``level: coarse`` uses GID-5 labels.
"""

from __future__ import annotations

from pathlib import Path

from rsseg.config.specs import GidSpec
from rsseg.data.classes import ClassTable
from rsseg.data.scenes import Scene, SceneSet, pair_by_stem, strip_suffix
from rsseg.errors import DataError

COARSE_DIR = "Large-scale Classification_5classes"
FINE_DIR = "Fine Land-cover Classification_15classes"
LAYOUT = (
    f"GID layout: <root>/{COARSE_DIR}/{{image_RGB,image_NirRGB,label_5classes}}/ and "
    f"<root>/{FINE_DIR}/{{image_RGB,image_NirRGB,label_15classes}}/ with <stem>.tif images and <stem>_label.tif labels"
)


def _tifs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in (".tif", ".tiff"))


def discover(root: Path, table: ClassTable, gid: GidSpec) -> SceneSet:
    if not root.is_dir():
        raise DataError(f"dataset root {root} not found; expected the {LAYOUT}")
    image_dir = "image_RGB" if gid.image == "rgb" else "image_NirRGB"
    level_dir, label_dir = (FINE_DIR, "label_15classes") if gid.level == "fine" else (COARSE_DIR, "label_5classes")
    images_path = root / level_dir / image_dir
    labels_path = root / level_dir / label_dir
    for p in (images_path, labels_path):
        if not p.is_dir():
            raise DataError(f"dataset root {root}: missing folder {p.relative_to(root)}; expected the {LAYOUT}")
    labelled, unlabeled, _ = pair_by_stem(_tifs(images_path), _tifs(labels_path), strip_suffix((".tif", ".tiff")),
                                          strip_suffix(("_label.tif", "_label.tiff")))
    if not labelled:
        raise DataError(f"{labels_path}: no <stem>_label.tif matches an image in {images_path}")
    if gid.level == "fine":
        # Step-2 (homogeneous) imagery: the coarse-level images not used for fine-tuning.
        coarse_images = root / COARSE_DIR / image_dir
        fine_ids = {s.id for s in labelled}
        if coarse_images.is_dir():
            extra = [Scene(id=p.stem, image=p) for p in _tifs(coarse_images) if p.stem not in fine_ids]
            unlabeled = sorted(list(unlabeled) + extra, key=lambda s: s.id)
    return SceneSet(
        dataset="gid", root=root, table=table, labelled=tuple(labelled), unlabeled=tuple(unlabeled),
        value_range=(0.0, 255.0), layout=LAYOUT,
    )
