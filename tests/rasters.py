"""Writers of small rasters in the exact naming and format of the real datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from rsseg.data.classes import GID5, GID15


def write_tif(path: Path, data: np.ndarray, crs=None, transform=None, nodata=None, dtype="uint8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=dtype)
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(dtype))
    return path


def minifrance_stem(dept: str, x_km: int, y_km: int, year: int = 2013) -> str:
    return f"{dept}-{year}-{x_km:04d}-{y_km:04d}-LA93-0M50-E080"


def write_minifrance(root: Path, labelled: int = 2, unlabeled: int = 1, size: int = 96, seed: int = 0,
                     layout: str = "dfc2022") -> list[str]:
    """MiniFrance scenes: RGB uint8 `<stem>.jp2.tif` / `BDORTHO/<stem>.tif`, labels `<stem>_UA2012.tif`.

    Labels use codes 0-15 (0 and 15 ignored). Returns the stems, labelled first.
    """
    rng = np.random.default_rng(seed)
    stems = []
    for i in range(labelled + unlabeled):
        stem = minifrance_stem("44" if i % 2 == 0 else "13", 300 + i * 5, 6750 - i * 5)
        stems.append(stem)
        transform = from_origin((300 + i * 5) * 1000.0, (6750 - i * 5) * 1000.0, 0.5, 0.5)
        image = rng.integers(1, 255, size=(3, size, size))
        city = "Nantes_Saint-Nazaire" if i % 2 == 0 else "Marseille_Martigues"
        part = "labeled_train" if i < labelled else "unlabeled_train"
        if layout == "dfc2022":
            img_path = root / part / city / "BDORTHO" / f"{stem}.tif"
            lab_path = root / part / city / "UrbanAtlas" / f"{stem}_UA2012.tif"
        else:
            img_path = root / "images" / f"{stem}.jp2.tif"
            lab_path = root / "labels" / f"{stem}_UA2012.tif"
        write_tif(img_path, image, crs=CRS.from_epsg(2154), transform=transform)
        if i < labelled:
            codes = np.zeros((size, size), dtype=np.uint8)
            # 16 horizontal bands of codes 0..15 (shifted per scene): every code appears, 0 and 15 are ignored.
            for r in range(size):
                codes[r] = (r * 16 // size + i) % 16
            write_tif(lab_path, codes, crs=CRS.from_epsg(2154), transform=transform)
    return stems


def gid_label(size: tuple[int, int], table, rng) -> tuple[np.ndarray, np.ndarray]:
    """A colour-map label with horizontal bands of every class colour plus black rows."""
    h, w = size
    idx = np.zeros((h, w), dtype=np.int64)
    palette = table.palette()
    n = len(palette)
    for r in range(h):
        idx[r] = (r // 8) % (n + 1)  # n = black (unlabelled)
    rgb = np.zeros((3, h, w), dtype=np.uint8)
    for k in range(n):
        rgb[:, idx == k] = palette[k][:, None]
    return rgb, idx


def gid_stem(i: int) -> str:
    return f"GF2_PMS1__L1A00005645{i:02d}-MSS1"


def write_gid(root: Path, fine: int = 2, coarse: int = 3, size: tuple[int, int] = (80, 72), seed: int = 0) -> dict:
    """GID-5 and GID-15 folders (no CRS), RGB and NIR-RGB images, colour-map labels."""
    rng = np.random.default_rng(seed)
    out = {"fine": [], "coarse": []}
    for level, count, table, folder, label_dir in (
        ("coarse", coarse, GID5, "Large-scale Classification_5classes", "label_5classes"),
        ("fine", fine, GID15, "Fine Land-cover Classification_15classes", "label_15classes"),
    ):
        for i in range(count):
            stem = gid_stem(i + (50 if level == "fine" else 0))
            out[level].append(stem)
            nir_rgb = rng.integers(1, 255, size=(4, *size))
            write_tif(root / folder / "image_NirRGB" / f"{stem}.tif", nir_rgb)
            write_tif(root / folder / "image_RGB" / f"{stem}.tif", nir_rgb[1:])
            rgb, _ = gid_label(size, table, rng)
            write_tif(root / folder / label_dir / f"{stem}_label.tif", rgb)
    return out


def write_folder_dataset(root: Path, nodata_half: bool = False, size: int = 64, png_mask: bool = False) -> Path:
    """A user's own data: images/ + masks/ + classes.yaml (codes 1-3, 0 ignored).

    Scene ``a`` (GeoTIFF, optionally with a nodata left half) and scene ``b`` (mask as PNG when
    ``png_mask``); scene ``c`` has no mask (unlabelled).
    """
    rng = np.random.default_rng(3)
    transform = from_origin(1000.0, 2000.0, 1.0, 1.0)
    img = rng.integers(1, 255, size=(3, size, size)).astype(np.uint8)
    if nodata_half:
        img[:, :, : size // 2] = 0
    write_tif(root / "images" / "a.tif", img, crs=CRS.from_epsg(32632), transform=transform, nodata=0 if nodata_half else None)
    mask = (np.arange(size)[None, :] // (size // 4) % 4).repeat(size, 0).astype(np.uint8)  # codes 0..3 by column
    write_tif(root / "masks" / "a.tif", mask, crs=CRS.from_epsg(32632), transform=transform)
    write_tif(root / "images" / "b.tif", rng.integers(1, 255, size=(3, size, size)), crs=CRS.from_epsg(32632), transform=transform)
    if png_mask:
        from PIL import Image

        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / "b.png")
    else:
        write_tif(root / "masks" / "b.tif", mask, crs=CRS.from_epsg(32632), transform=transform)
    write_tif(root / "images" / "c.tif", rng.integers(1, 255, size=(3, size, size)), crs=CRS.from_epsg(32632), transform=transform)
    (root / "classes.yaml").write_text(
        "name: own3\nignore: [0]\nclasses:\n"
        "  - {code: 1, name: building, abbr: Bld, color: [255, 0, 0]}\n"
        "  - {code: 2, name: road, abbr: Rd, color: [128, 128, 128]}\n"
        "  - {code: 3, name: tree, abbr: Tr, color: [0, 128, 0]}\n"
    )
    return root
