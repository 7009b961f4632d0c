"""Scenes: (image path, optional label path) pairs with a class table, and raster checks.

Every raster problem becomes a one-line `DataError` that names the file(s): unreadable TIFF,
image/label size or transform mismatch, a scene smaller than one tile.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rsseg.data.classes import ClassTable
from rsseg.errors import DataError


@dataclass(frozen=True)
class Scene:
    id: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class SceneSet:
    """What a dataset resolves to: labelled and unlabelled scenes sharing one class table."""

    dataset: str
    root: Path
    table: ClassTable
    labelled: tuple[Scene, ...]
    unlabeled: tuple[Scene, ...] = ()
    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    layout: str = ""

    @property
    def scenes(self) -> tuple[Scene, ...]:
        return self.labelled + self.unlabeled


@dataclass(frozen=True)
class RasterMeta:
    path: Path
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, ...]
    nodata: float | None
    all_valid: bool  # no nodata value and no mask: every pixel is valid
    georeferenced: bool
    block_shapes: tuple[tuple[int, int], ...] = ()


def open_raster(path: str | Path):
    """Open a raster for reading; unreadable or corrupt files raise a one-line DataError."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        reason = str(exc).split("\n")[0]
        raise DataError(f"{path}: not a readable GeoTIFF/raster ({reason})") from None


def raster_meta(path: str | Path) -> RasterMeta:
    from rasterio.enums import MaskFlags

    with open_raster(path) as src:
        flags = src.mask_flag_enums
        all_valid = src.nodata is None and all(f == [MaskFlags.all_valid] for f in flags)
        georef = src.crs is not None or not src.transform.is_identity
        return RasterMeta(
            path=Path(path),
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=src.dtypes[0],
            crs=src.crs.to_string() if src.crs else None,
            transform=tuple(src.transform)[:6],
            nodata=src.nodata,
            all_valid=all_valid,
            georeferenced=georef,
            block_shapes=tuple(tuple(b) for b in src.block_shapes),
        )


def check_pair(image: RasterMeta, label: RasterMeta) -> None:
    """An image and its label must share the pixel grid."""
    if (image.width, image.height) != (label.width, label.height):
        raise DataError(
            f"image/label size mismatch: {image.path} is {image.width}x{image.height} but "
            f"{label.path} is {label.width}x{label.height}"
        )
    if image.georeferenced and label.georeferenced:
        if any(abs(a - b) > 1e-6 * max(1.0, abs(a)) for a, b in zip(image.transform, label.transform)):
            raise DataError(
                f"image/label transform mismatch: {image.path} has {_fmt_transform(image.transform)} but "
                f"{label.path} has {_fmt_transform(label.transform)}"
            )
        if image.crs and label.crs and image.crs != label.crs:
            raise DataError(f"image/label CRS mismatch: {image.path} is {image.crs} but {label.path} is {label.crs}")


def check_tile_fits(meta: RasterMeta, tile: int) -> None:
    if meta.width < tile or meta.height < tile:
        raise DataError(
            f"{meta.path}: scene is {meta.width}x{meta.height}, smaller than one {tile}x{tile} tile "
            "(use a smaller data.tile_size or drop the scene)"
        )


def check_bands(meta: RasterMeta, bands: tuple[int, ...] | None) -> None:
    if bands and max(bands) > meta.count:
        raise DataError(f"{meta.path}: has {meta.count} bands, but data.bands asks for band {max(bands)}")


def check_same_bands(metas: list[RasterMeta], bands: tuple[int, ...] | None) -> None:
    """Every image of a dataset gives the network the same channels: without data.bands all have
    the band count of the first; with it, each has the bands it names."""
    for meta in metas:
        check_bands(meta, bands)
    if bands or not metas:
        return
    first = metas[0]
    for meta in metas[1:]:
        if meta.count != first.count:
            raise DataError(f"{meta.path}: has {meta.count} band(s) but {first.path} has {first.count}; every image of a "
                            f"dataset needs the same bands (or set data.bands to read the same ones from each, e.g. "
                            f"data.bands: [{', '.join(str(b) for b in range(1, min(meta.count, first.count) + 1))}])")


def _fmt_transform(t: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:g}" for x in t) + ")"


def strip_suffix(suffixes: tuple[str, ...]) -> Callable[[Path], str]:
    """A stem function: the file name without the first of ``suffixes`` it ends with (else
    ``Path.stem``)."""
    def stem(p: Path) -> str:
        for suffix in suffixes:
            if suffix and p.name.endswith(suffix):
                return p.name[: -len(suffix)]
        return p.stem

    return stem


def pair_by_stem(images: list[Path], labels: list[Path], image_stem: Callable[[Path], str],
                 label_stem: Callable[[Path], str], kind: str = "scene") -> tuple[list[Scene], list[Scene], dict[str, Path]]:
    """Pair images with labels by stem. Returns (labelled, unlabelled) scenes, sorted by id for
    determinism, and the labels without an image (stem -> path; the caller says whether that is
    an error). Two images or two labels with one stem are an error naming both files."""
    label_by_stem: dict[str, Path] = {}
    for lab in labels:
        stem = label_stem(lab)
        if stem in label_by_stem and label_by_stem[stem] != lab:
            raise DataError(f"two labels for {kind} {stem!r}: {label_by_stem[stem]} and {lab}")
        label_by_stem[stem] = lab
    labelled, unlabeled, seen = [], [], {}
    for img in images:
        stem = image_stem(img)
        if stem in seen:
            raise DataError(f"two images for {kind} {stem!r}: {seen[stem]} and {img}")
        seen[stem] = img
        lab = label_by_stem.get(stem)
        (labelled if lab else unlabeled).append(Scene(id=stem, image=img, label=lab))
    orphans = {stem: p for stem, p in sorted(label_by_stem.items()) if stem not in seen}
    return sorted(labelled, key=lambda s: s.id), sorted(unlabeled, key=lambda s: s.id), orphans
