"""Torch datasets over the tile index: one rasterio window per item, never the whole scene.

`TileReader` keeps one open handle per scene per process (reopened after a fork: file handles
must not be shared between DataLoader or Ray worker processes). `TileDataset` normalises to
[-1, 1], maps nodata and ignored label values to 255 and applies the paper's augmentation
identically to image and mask.

Items are addressed by an int (no randomness: evaluation) or by ``(index, draw)``: the
augmentation of a draw is a pure function of ``(seed, draw)``, so a training run is
reproducible and resumable from a step number alone.

Augmentation (paper 4.2.2):
- random linear stretch: a cut ``c ~ U(5 %, 15 %)`` of the pixels is clipped, half at each tail
  (per band percentiles ``c/2`` and ``1 - c/2`` of the tile's valid pixels), and the rest
  stretched linearly to [-1, 1];
- rot90 with k in {1, 2, 3} and horizontal / vertical flips, each with probability ``p``.
The geometric part is one of the 8 elements of the dihedral group, reported as ``variant`` (the
feature cache keys on it); the stretch is reported as ``stretched``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rsseg.config.specs import AugmentSpec
from rsseg.data.classes import ClassTable
from rsseg.labels import IGNORE_INDEX
from rsseg.data.scenes import Scene, open_raster
from rsseg.data.pixels import default_value_range, read_error  # noqa: F401 - re-exported
from rsseg.data.tiles import decode_label, read_valid

class TileReader:
    """Windowed reads with one open handle per scene per process."""

    def __init__(self, scenes: Sequence[Scene], table: ClassTable, bands: Sequence[int] | None = None,
                 value_range: tuple[float, float] | None = None):
        self.scenes = list(scenes)
        self.table = table
        self.bands = list(bands) if bands else None
        self.value_range = value_range
        self._handles: dict[tuple[int, str], object] = {}
        self._pid = os.getpid()

    @classmethod
    def of(cls, scenes) -> "TileReader":
        """The reader of a `SceneSet` (its scenes, class table, bands and value range)."""
        return cls(scenes.scenes, scenes.table, scenes.bands, scenes.value_range)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _open(self, scene_idx: int, kind: str):
        if os.getpid() != self._pid:  # forked: the parent's handles are not ours
            self._handles, self._pid = {}, os.getpid()
        key = (scene_idx, kind)
        src = self._handles.get(key)
        if src is None:
            scene = self.scenes[scene_idx]
            src = open_raster(scene.image if kind == "image" else scene.label)
            self._handles[key] = src
        return src

    def close(self) -> None:
        for src in self._handles.values():
            src.close()
        self._handles.clear()

    def range_for(self, scene_idx: int) -> tuple[float, float]:
        if self.value_range is not None:
            return self.value_range
        return default_value_range(self._open(scene_idx, "image").dtypes[0])

    def read_image(self, scene_idx: int, row: int, col: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, size, size) float32 raw values and (size, size) bool validity."""
        from rasterio.windows import Window

        src = self._open(scene_idx, "image")
        win = Window(col, row, size, size)
        try:
            data = src.read(self.bands, window=win) if self.bands else src.read(window=win)
            valid = read_valid(src, win)
        except Exception as exc:  # noqa: BLE001 - rasterio/GDAL raise several types for a broken body
            raise read_error(self.scenes[scene_idx].image, row, col, exc) from None
        return data.astype(np.float32, copy=False), valid

    def read_label(self, scene_idx: int, row: int, col: int, size: int) -> np.ndarray:
        from rasterio.windows import Window

        src = self._open(scene_idx, "label")
        try:
            raw = src.read(window=Window(col, row, size, size))
        except Exception as exc:  # noqa: BLE001
            raise read_error(self.scenes[scene_idx].label, row, col, exc) from None
        return decode_label(raw, self.table, self.scenes[scene_idx].label)


def normalise(raw: np.ndarray, valid: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    lo, hi = value_range
    out = (raw - lo) * (2.0 / (hi - lo)) - 1.0
    np.clip(out, -1.0, 1.0, out=out)
    out[:, ~valid] = 0.0
    return out


def stretch(raw: np.ndarray, valid: np.ndarray, cut: float) -> np.ndarray:
    """Per-band linear stretch clipping ``cut`` of the valid pixels (half per tail) -> [-1, 1]."""
    out = np.zeros_like(raw, dtype=np.float32)
    if not valid.any():
        return out
    for b in range(raw.shape[0]):
        vals = raw[b][valid]
        lo, hi = np.quantile(vals, [cut / 2, 1 - cut / 2])
        if hi - lo < 1e-6:
            hi = lo + 1.0
        band = (raw[b] - lo) * (2.0 / (hi - lo)) - 1.0
        out[b] = np.clip(band, -1.0, 1.0)
    out[:, ~valid] = 0.0
    return out


@dataclass(frozen=True)
class AugmentDraw:
    k: int  # rot90 count (0-3)
    flip: bool  # horizontal flip after rotation
    cut: float | None  # stretch cut, None = no stretch

    @property
    def variant(self) -> int:
        """Index 0-7 of the dihedral-group element (0 = identity)."""
        return self.k + 4 * int(self.flip)


IDENTITY = AugmentDraw(0, False, None)


def draw_augment(spec: AugmentSpec | None, seed: int, draw: int) -> AugmentDraw:
    if spec is None:
        return IDENTITY
    rng = np.random.default_rng([seed, draw, 7])
    u = rng.random(4)
    k = int(rng.integers(1, 4)) if spec.rot90 and u[0] < spec.p else 0
    hflip = spec.flip and u[1] < spec.p
    vflip = spec.flip and u[2] < spec.p
    if vflip:  # vflip = rot180 o hflip: canonical form keeps one flip
        k, hflip = (k + 2) % 4, not hflip
    cut = float(rng.uniform(*spec.stretch_cut)) if spec.stretch and u[3] < spec.p else None
    return AugmentDraw(k, hflip, cut)


def apply_geometry(x: torch.Tensor, variant: int) -> torch.Tensor:
    """Apply dihedral element ``variant`` to the last two dims of ``x`` (image, mask or features)."""
    k, flip = variant % 4, variant >= 4
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    if flip:
        x = torch.flip(x, dims=(-1,))
    return x


class TileDataset(torch.utils.data.Dataset):
    """Tiles of one split (or subset) of a tile index."""

    def __init__(self, reader: TileReader, tiles, augment: AugmentSpec | None = None, seed: int = 0,
                 with_labels: bool = True):
        # `tiles` is a polars frame; keep plain arrays (cheap to pickle to workers).
        self.reader = reader
        self.scene_idx = tiles["scene_idx"].to_numpy().astype(np.int64)
        self.rows = tiles["row"].to_numpy().astype(np.int64)
        self.cols = tiles["col"].to_numpy().astype(np.int64)
        self.sizes = tiles["size"].to_numpy().astype(np.int64)
        self.tile_ids = tiles["tile_id"].to_list()
        self.augment = augment
        self.seed = seed
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getitem__(self, key) -> dict:
        if isinstance(key, (tuple, list)):
            i, draw = int(key[0]), int(key[1])
            aug = draw_augment(self.augment, self.seed, draw)
        else:
            i, aug = int(key), IDENTITY
        s, r, c, size = int(self.scene_idx[i]), int(self.rows[i]), int(self.cols[i]), int(self.sizes[i])
        raw, valid = self.reader.read_image(s, r, c, size)
        if aug.cut is not None:
            image = stretch(raw, valid, aug.cut)
        else:
            image = normalise(raw, valid, self.reader.range_for(s))
        item = {"image": apply_geometry(torch.from_numpy(image), aug.variant), "index": i,
                "variant": aug.variant, "stretched": aug.cut is not None}
        if self.with_labels:
            labels = self.reader.read_label(s, r, c, size)
            labels = np.where(valid, labels, IGNORE_INDEX)
            item["mask"] = apply_geometry(torch.from_numpy(labels.astype(np.int64)), aug.variant)
        return item


def collate(items: list[dict]) -> dict:
    out = {"image": torch.stack([it["image"] for it in items]),
           "index": torch.tensor([it["index"] for it in items]),
           "variant": torch.tensor([it["variant"] for it in items]),
           "stretched": torch.tensor([it["stretched"] for it in items])}
    if "mask" in items[0]:
        out["mask"] = torch.stack([it["mask"] for it in items])
    return out
