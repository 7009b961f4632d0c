"""The tile index: every usable window of every scene, its split and label-ratio membership.

One polars frame per dataset (cached as parquet under ``<workdir>/indexes``), one row per tile:

======================  =====================================================================
tile_id                 ``<scene>:<row>:<col>``, stable: cache keys and MLflow refer to it
scene, scene_idx        which scene (index into ``SceneSet.scenes``: labelled first)
role                    ``labelled`` or ``unlabeled``
row, col, size          the window (pixels)
valid_fraction          share of valid (not nodata) pixels
split                   train / val / test (labelled scenes), unlabeled
subset_rank             order of train tiles for label-ratio subsets, -1 when not eligible
labelled_pixels         pixels with a class (not ignored)
class_counts            per-class pixel counts (labelled scenes)
======================  =====================================================================

Windows step by ``stride`` from the top-left and stop at the last whole window (a remainder
narrower than a tile is dropped rather than overlapped, so tiles in different splits never share
pixels when ``stride == tile_size``). Windows touching only nodata are skipped.

Splits are a seeded permutation of all labelled tiles: 40 / 10 / 50 % (paper 4.1). Label-ratio
subsets take the first ``round(ratio * n)`` train tiles in a second seeded order (only tiles
with labelled pixels are eligible), so S (2 %) ⊂ M (40 %) ⊂ L (100 %) holds by construction and
for any ratio in (0, 1].

The cache key covers the scene list (paths, sizes, modification times), the tiling parameters,
the split seed, the class table and the bands, so changing any of them rebuilds the index.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rsseg.config.specs import DataSpec, label_ratio_problem
from rsseg.data.pixels import check_image, read_error, sample_windows
from rsseg.data.classes import IGNORE_INDEX, ClassTable, decode_codes, decode_colours
from rsseg.data.scenes import SceneSet, check_bands, check_pair, check_same_bands, check_tile_fits, open_raster, raster_meta
from rsseg.errors import DataError
from rsseg.provenance import fingerprint
from rsseg.workdir import Workdir

if TYPE_CHECKING:
    import polars as pl

INDEX_VERSION = 2
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TilingParams:
    tile_size: int
    stride: int
    min_valid_fraction: float
    split: tuple[float, float, float]
    split_seed: int
    split_by: str = "tile"

    @classmethod
    def from_spec(cls, spec: DataSpec, scenes: SceneSet) -> "TilingParams":
        return cls(spec.tile_size, spec.stride or spec.tile_size, spec.min_valid_fraction, tuple(spec.split), spec.split_seed,
                   split_by(spec, scenes))

    def key(self) -> dict:
        """What the index depends on (``split_by`` only when it is not the default, so tile-split
        indexes keep their keys)."""
        d = dict(self.__dict__)
        if d["split_by"] == "tile":
            d.pop("split_by")
        return d


SCENE_SPLIT_MIN_SCENES = 3


def split_by(spec: DataSpec, scenes: SceneSet) -> str:
    """The split a dataset gets: ``auto`` is by scene for a folder dataset of at least 3 labelled
    scenes (a user's own map: neighbouring tiles share texture, so a by-tile split scores tiles
    that touch training tiles), by tile otherwise (the paper's random split of its datasets)."""
    if spec.split_by != "auto":
        return spec.split_by
    return "scene" if scenes.dataset == "folder" and len(scenes.labelled) >= SCENE_SPLIT_MIN_SCENES else "tile"


def windows(width: int, height: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """(row, col) offsets of whole windows, row-major."""
    rows = range(0, height - tile + 1, stride)
    cols = range(0, width - tile + 1, stride)
    return [(r, c) for r in rows for c in cols]


def read_valid(src, window) -> np.ndarray:
    """(h, w) bool: True where the dataset mask says the pixel holds data."""
    return src.dataset_mask(window=window) > 0


def decode_label(raw: np.ndarray, table: ClassTable, source) -> np.ndarray:
    """A label window as read (bands, h, w) -> class indices (h, w) with IGNORE_INDEX."""
    if table.kind == "colours":
        return decode_colours(raw, table, source)
    return decode_codes(raw[0], table, source)


def _scene_rows(scene_idx: int, scene, role: str, scenes: SceneSet, params: TilingParams) -> list[dict]:
    from rasterio.windows import Window

    meta = raster_meta(scene.image)
    check_tile_fits(meta, params.tile_size)
    check_bands(meta, scenes.bands)
    label_src = None
    if scene.label is not None:
        label_meta = raster_meta(scene.label)
        check_pair(meta, label_meta)
        label_src = open_raster(scene.label)
    nc = scenes.table.num_classes
    rows: list[dict] = []
    size = params.tile_size
    try:
        with open_raster(scene.image) as src:
            for r, c in windows(meta.width, meta.height, size, params.stride):
                win = Window(c, r, size, size)
                if meta.all_valid:
                    valid = None
                    fraction = 1.0
                else:
                    try:
                        valid = read_valid(src, win)
                    except Exception as exc:  # noqa: BLE001
                        raise read_error(scene.image, r, c, exc) from None
                    fraction = float(valid.mean())
                if fraction <= params.min_valid_fraction:
                    continue
                counts = [0] * nc
                labelled = 0
                if label_src is not None:
                    try:
                        raw_label = label_src.read(window=win)
                    except Exception as exc:  # noqa: BLE001 - a broken body: name the file
                        raise read_error(scene.label, r, c, exc) from None
                    labels = decode_label(raw_label, scenes.table, scene.label)
                    if valid is not None:
                        labels = np.where(valid, labels, IGNORE_INDEX)
                    hist = np.bincount(labels.ravel(), minlength=256)
                    counts = [int(x) for x in hist[:nc]]
                    labelled = int(sum(counts))
                rows.append(
                    dict(
                        tile_id=f"{scene.id}:{r}:{c}", scene=scene.id, scene_idx=scene_idx, role=role,
                        row=r, col=c, size=size, valid_fraction=fraction, labelled_pixels=labelled,
                        class_counts=counts,
                    )
                )
    finally:
        if label_src is not None:
            label_src.close()
    return rows


def _assign_splits(frame: "pl.DataFrame", params: TilingParams) -> "pl.DataFrame":
    import polars as pl

    n = frame.height
    lab = frame["role"].to_numpy() == "labelled"
    idx = np.nonzero(lab)[0]
    split = np.array(["unlabeled"] * n, dtype=object)
    rank = np.full(n, -1, dtype=np.int64)
    if len(idx):
        if params.split_by == "scene":
            _split_scenes(frame, idx, params, split)
        else:
            perm = np.random.default_rng([params.split_seed, 1]).permutation(len(idx))
            n_train = int(round(params.split[0] * len(idx)))
            n_val = int(round(params.split[1] * len(idx)))
            order = idx[perm]
            split[order[:n_train]] = "train"
            split[order[n_train : n_train + n_val]] = "val"
            split[order[n_train + n_val :]] = "test"
        train = np.sort(idx[split[idx] == "train"])
        eligible = train[frame["labelled_pixels"].to_numpy()[train] > 0]
        sub_perm = np.random.default_rng([params.split_seed, 2]).permutation(len(eligible))
        rank[eligible[sub_perm]] = np.arange(len(eligible))
    return frame.with_columns(pl.Series("split", split.tolist(), dtype=pl.Utf8), pl.Series("subset_rank", rank))


def _split_scenes(frame: "pl.DataFrame", idx: np.ndarray, params: TilingParams, split: np.ndarray) -> None:
    """Whole scenes to splits: scenes in a seeded order, each to the split whose share of the tiles
    its middle tile falls in (so the shares hold as well as scene sizes allow)."""
    scene = frame["scene_idx"].to_numpy()[idx]
    scenes = np.unique(scene)
    order = scenes[np.random.default_rng([params.split_seed, 1]).permutation(len(scenes))]
    bounds = np.cumsum(params.split)
    done, total = 0, len(idx)
    for s in order:
        members = idx[scene == s]
        middle = (done + len(members) / 2) / total
        split[members] = SPLITS[min(int(np.searchsorted(bounds, middle, side="right")), 2)]
        done += len(members)


@dataclass(frozen=True)
class TileIndex:
    frame: "pl.DataFrame"
    scenes: SceneSet
    params: TilingParams
    key: str
    path: Path | None = None

    @property
    def table(self) -> ClassTable:
        return self.scenes.table

    def split(self, name: str) -> "pl.DataFrame":
        if name not in (*SPLITS, "unlabeled"):
            raise ValueError(f"unknown split {name!r}")
        return self.frame.filter(self.frame["split"] == name)

    def subset_size(self, ratio: float) -> int:
        check_ratio(ratio)
        eligible = int((self.frame["subset_rank"] >= 0).sum())
        return min(eligible, max(1, int(math.floor(ratio * eligible + 0.5)))) if eligible else 0

    def subset(self, ratio: float) -> "pl.DataFrame":
        """Training tiles with labels for a label ratio in (0, 1]; nested across ratios."""
        n = self.subset_size(ratio)
        return self.frame.filter((self.frame["subset_rank"] >= 0) & (self.frame["subset_rank"] < n)).sort("subset_rank")

    def leakage(self, ratio: float) -> dict[str, int]:
        """Test tiles touching a training tile, and a labelled tile of the ``ratio`` subset (0
        under a by-scene split): what `data info` prints and every fine-tuning run tags."""
        test = self.split("test")
        return {"test": test.height, "touch_train": touching(test, self.split("train")),
                "touch_labelled": touching(test, self.subset(ratio))}

    def absent_classes(self) -> list[str]:
        """Classes of the table with no labelled pixel in any split: mIoU leaves them out."""
        counts = sum(self.class_histogram(self.split(s)) for s in SPLITS)
        return [a for a, n in zip(self.table.abbrs, np.atleast_1d(counts)) if n == 0] if self.frame.height else []

    def class_histogram(self, frame: "pl.DataFrame") -> np.ndarray:
        if frame.height == 0 or self.table.num_classes == 0:
            return np.zeros(self.table.num_classes, dtype=np.int64)
        return np.asarray(frame["class_counts"].to_list(), dtype=np.int64).sum(axis=0)


def touching(a: "pl.DataFrame", b: "pl.DataFrame") -> int:
    """How many tiles of ``a`` overlap or touch (share an edge or a corner with) a tile of ``b`` of
    the same scene: under a by-tile split, the test tiles whose neighbour was trained on (they
    share its texture and objects, so they score higher than a new place would)."""
    if a.height == 0 or b.height == 0:
        return 0
    size = int(max(a["size"].max(), b["size"].max()))
    cells: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
    for scene, r, c in b.select("scene", "row", "col").iter_rows():
        cells.setdefault((scene, r // size, c // size), []).append((r, c))
    n = 0
    for scene, r, c in a.select("scene", "row", "col").iter_rows():
        near = (cells.get((scene, r // size + dr, c // size + dc), ()) for dr in (-1, 0, 1) for dc in (-1, 0, 1))
        n += any(abs(r - r2) <= size and abs(c - c2) <= size for group in near for r2, c2 in group)
    return n


def check_ratio(ratio: float) -> None:
    if problem := label_ratio_problem(ratio):
        raise DataError(problem)


def index_key(scenes: SceneSet, params: TilingParams) -> str:
    def stat(p: Path | None):
        if p is None:
            return None
        st = os.stat(p)
        return [str(p), st.st_size, int(st.st_mtime_ns)]

    listing = [[s.id, stat(s.image), stat(s.label)] for s in scenes.scenes]
    return fingerprint(
        {
            "v": INDEX_VERSION, "dataset": scenes.dataset, "scenes": listing, "params": params.key(),
            "table": [scenes.table.name, sorted(scenes.table.mapping.items())], "bands": scenes.bands,
        }
    )


def build_frame(scenes: SceneSet, params: TilingParams) -> "pl.DataFrame":
    import polars as pl

    rows: list[dict] = []
    for i, scene in enumerate(scenes.scenes):
        role = "labelled" if scene.label is not None else "unlabeled"
        rows.extend(_scene_rows(i, scene, role, scenes, params))
    schema = {
        "tile_id": pl.Utf8, "scene": pl.Utf8, "scene_idx": pl.Int32, "role": pl.Utf8, "row": pl.Int32,
        "col": pl.Int32, "size": pl.Int32, "valid_fraction": pl.Float32, "labelled_pixels": pl.Int64,
        "class_counts": pl.List(pl.Int64),
    }
    frame = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    return _assign_splits(frame, params)


def check_pixels(scenes: SceneSet, params: TilingParams, stem: Path, force: bool = False) -> None:
    """The pixel checks of every image (`rsseg.data.pixels`) for this value range and bands, once:
    a marker beside the index records that they passed."""
    from rsseg.atomic import atomic_write_text

    marker = Path(f"{stem}.pixels-{fingerprint({'value_range': scenes.value_range, 'bands': scenes.bands})[:12]}.ok")
    if marker.exists() and not force:
        return
    bands = list(scenes.bands) if scenes.bands else None
    metas = [raster_meta(scene.image) for scene in scenes.scenes]
    check_same_bands(metas, scenes.bands)  # before any pixel is read: a missing band is not a corrupt file
    for scene, meta in zip(scenes.scenes, metas):
        check_tile_fits(meta, params.tile_size)
        with open_raster(scene.image) as src:
            check_image(scene.image, src, sample_windows(windows(meta.width, meta.height, params.tile_size, params.stride)),
                        params.tile_size, bands, scenes.value_range, meta.dtype)
    atomic_write_text(marker, "pixel checks passed\n")


def build(spec: DataSpec, workdir: Workdir | None = None, scenes: SceneSet | None = None, rebuild: bool = False) -> TileIndex:
    """The tile index of a dataset, from the parquet cache when it is current."""
    import polars as pl
    from filelock import FileLock

    from rsseg.atomic import atomic_path
    from rsseg.data.registry import scenes as resolve_scenes

    workdir = workdir or Workdir.resolve()
    scenes = scenes or resolve_scenes(spec, workdir)
    params = TilingParams.from_spec(spec, scenes)
    key = index_key(scenes, params)
    path = workdir.indexes / f"{scenes.dataset}-{key}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists() and not rebuild:
            frame = pl.read_parquet(path)
        else:
            check_pixels(scenes, params, path.with_suffix(""), force=True)
            frame = build_frame(scenes, params)
            with atomic_path(path, suffix=".parquet") as tmp:
                frame.write_parquet(tmp)
        check_pixels(scenes, params, path.with_suffix(""))  # a cached index with another value range or bands
    return TileIndex(frame=frame, scenes=scenes, params=params, key=key, path=path)
