"""A small real labelled `folder` dataset from a real Landsat scene (rasterio's RGB.byte.tif):
``images/`` crops of it, ``masks/`` from a rule, ``classes.yaml``, plus an ``archive/`` of the
other crops for pre-training. For checking the platform on real imagery with a scene split:

    python bench/rgb_folder_dataset.py ../shared/data/RGB.byte.tif /tmp/rgb-folder
    platform sweep sweeps/label_ratio.yaml --profile small \
        --set data.dataset=folder --set data.root=/tmp/rgb-folder --set data.class_table=null \
        --set pretrain.archive.root=/tmp/rgb-folder/archive

The rule labels each pixel from its 9 x 9 neighbourhood mean (not its own colour, so that a
per-pixel colour classifier cannot read the labels off the pixel): water where the neighbourhood
is dark, vegetation where it is greener than the scene's median, bright ground where it is bright, other land
elsewhere; pixels outside the scene's footprint (nodata 0) are 0 (ignored).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

CLASSES = """name: rgb4
ignore: [0]
classes:
  - {code: 1, name: water, abbr: Wat, color: [0, 0, 255]}
  - {code: 2, name: vegetation, abbr: Veg, color: [0, 160, 0]}
  - {code: 3, name: bright ground, abbr: Bri, color: [230, 230, 230]}
  - {code: 4, name: other land, abbr: Oth, color: [160, 110, 60]}
"""
# (row, col) of 256-px crops inside the footprint: 6 labelled scenes, 2 archive crops
LABELLED = [(180, 180), (180, 436), (436, 180), (436, 436), (300, 60), (60, 300)]
ARCHIVE = [(240, 300), (380, 300)]
SIZE = 256


def labels(img: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 -> (H, W) codes 0..4 from the 9 x 9 neighbourhood mean of each band."""
    from scipy.ndimage import uniform_filter

    x = img.astype(np.float32)
    m = np.stack([uniform_filter(b, 9, mode="nearest") for b in x])
    bright, green = m.mean(0), m[1] - m[0]
    valid = ~(img == 0).all(0)
    out = np.full(bright.shape, 4, dtype=np.uint8)
    out[green > np.percentile(green[valid], 50)] = 2
    out[bright > np.percentile(bright[valid], 85)] = 3
    out[bright < np.percentile(bright[valid], 12)] = 1
    out[~valid] = 0
    return out


def write(path: Path, data: np.ndarray, profile: dict, window: Window, src) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = {**profile, "width": SIZE, "height": SIZE, "count": data.shape[0], "dtype": data.dtype.name,
            "transform": src.window_transform(window)}
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)


def main(src_path: str, out: str) -> None:
    root = Path(out)
    with rasterio.open(src_path) as src:
        profile = {"driver": "GTiff", "crs": src.crs, "nodata": 0}
        for i, (r, c) in enumerate(LABELLED):
            w = Window(c, r, SIZE, SIZE)
            img = src.read(window=w)
            write(root / "images" / f"scene{i}.tif", img, profile, w, src)
            write(root / "masks" / f"scene{i}.tif", labels(img)[None], {**profile, "nodata": None}, w, src)
        for i, (r, c) in enumerate(ARCHIVE):
            w = Window(c, r, SIZE, SIZE)
            write(root / "archive" / f"archive{i}.tif", src.read(window=w), profile, w, src)
    (root / "classes.yaml").write_text(CLASSES)
    print(f"wrote {len(LABELLED)} labelled scenes and {len(ARCHIVE)} archive crops under {root}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
