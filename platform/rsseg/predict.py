"""Whole scenes out: a saved segmentor slid over GeoTIFFs of any size into georeferenced class maps.

- Windows of the model's tile size step by ``tile - overlap`` (default overlap: a quarter tile),
  the last row and column aligned to the scene's edge; a scene smaller than a tile is padded
  (the padding is nodata). Windows are batched on the model's device.
- Blending: each window's logits are weighted by a separable ramp (1 inside, falling linearly
  over the overlap to 1/(2 overlap) at its border, never 0) and the weighted logits summed and
  divided by the summed weights, so no seams show; `reference_blend` computes the same by brute
  force over the whole scene (tests compare the two).
- Memory does not grow with the scene: the scene is processed in column bands, each band row by
  row of windows with a rolling accumulator one tile high; every finished strip is written at
  once (windowed writes). Windows that straddle a band boundary are computed for both bands
  (the blend is exact: every pixel gets all windows that cover it).
- Output per scene: a single-band uint8 class raster, same CRS, transform and size as the input,
  255 where the input is nodata, tiled and DEFLATE-compressed with overviews (COG layout, GDAL's
  COG driver), with an embedded colour table and the class names as band metadata plus a QGIS
  style file (``.qml``) beside it, so QGIS shows the classes at once; ``--probabilities`` adds a
  uint8 raster of per-class probabilities (x 255). Files are written under a temporary name and
  renamed when complete: no half-written file ever carries the final name.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from rsseg.errors import DataError
from rsseg.labels import IGNORE_INDEX

NODATA = IGNORE_INDEX  # class rasters: 255 where the input has no data
NODATA_RGB = (225, 225, 225)  # the quicklook's colour of nodata pixels
BAND_WINDOWS = 8  # windows per column band (bounds the accumulator: C x tile x ~9 tiles)


def window_starts(extent: int, tile: int, stride: int) -> list[int]:
    """Offsets of windows covering [0, extent): every ``stride``, the last aligned to the edge."""
    if extent <= tile:
        return [0]
    starts = list(range(0, extent - tile + 1, stride))
    if starts[-1] != extent - tile:
        starts.append(extent - tile)
    return starts


def blend_weight(tile: int, overlap: int) -> np.ndarray:
    """(tile, tile) separable ramp: 1 inside, linear over ``overlap`` pixels at each border."""
    ramp = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        ramp[:overlap] = edge
        ramp[tile - overlap:] = np.minimum(ramp[tile - overlap:], edge[::-1])
    return np.outer(ramp, ramp)


@dataclass
class SceneReader:
    """Windowed reads of one scene, normalised as the model was trained (bands, value range)."""

    path: Path
    bands: list[int] | None
    value_range: tuple[float, float] | None
    in_channels: int | None
    src: object = field(init=False)

    def __post_init__(self):
        from rsseg.data.dataset import default_value_range
        from rsseg.data.scenes import open_raster

        self.src = open_raster(self.path)
        count = self.src.count
        if self.bands:
            if max(self.bands) > count or min(self.bands) < 1:
                self.src.close()
                raise DataError(f"{self.path}: has {count} band(s), so bands {self.bands} cannot be read (1-based, 1..{count})")
            if self.in_channels is not None and len(self.bands) != self.in_channels:
                self.src.close()
                raise DataError(f"--bands {','.join(map(str, self.bands))}: {len(self.bands)} band(s), the model was trained on "
                                f"{self.in_channels}")
        elif self.in_channels is not None and count != self.in_channels:
            self.src.close()
            raise DataError(f"{self.path}: has {count} band(s), the model was trained on {self.in_channels} "
                            f"(choose {self.in_channels} of them with --bands, e.g. --bands "
                            f"{','.join(str(b) for b in range(1, self.in_channels + 1))})")
        self.range = tuple(self.value_range) if self.value_range else default_value_range(self.src.dtypes[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.src.height, self.src.width

    def read(self, row: int, col: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """((C, tile, tile) in [-1, 1], (tile, tile) validity); outside the scene is invalid."""
        from rasterio.windows import Window

        from rsseg.data.dataset import normalise

        win = Window(col, row, tile, tile)
        boundless = row + tile > self.src.height or col + tile > self.src.width
        try:
            raw = self.src.read(self.bands, window=win, boundless=boundless, fill_value=0) if self.bands else \
                self.src.read(window=win, boundless=boundless, fill_value=0)
            valid = self.src.dataset_mask(window=win, boundless=boundless) > 0 if boundless else self.src.dataset_mask(window=win) > 0
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file, named
            raise DataError(f"{self.path}: cannot read the window at row {row}, col {col} ({str(exc).splitlines()[0][:200]})") from None
        if boundless:
            inside = np.zeros((tile, tile), dtype=bool)
            inside[: max(0, self.src.height - row), : max(0, self.src.width - col)] = True
            valid &= inside
        return normalise(raw.astype(np.float32, copy=False), valid, self.range), valid

    def close(self) -> None:
        self.src.close()


def slide(model, reader: SceneReader, on_strip: Callable[[int, int, np.ndarray, np.ndarray], None], *,
          overlap: int | None = None, batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> int:
    """Predict a whole scene; ``on_strip(row, col, blended logits (C, h, w), valid (h, w))`` gets
    every finished strip once. Returns the number of windows computed."""
    tile = model.tile_size
    overlap = tile // 4 if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise DataError(f"--overlap: {overlap} must be in [0, {tile - 1}] for {tile}-pixel tiles")
    stride = tile - overlap
    height, width = reader.shape
    rows, cols = window_starts(height, tile, stride), window_starts(width, tile, stride)
    weight = blend_weight(tile, overlap)
    n_classes = model.num_classes
    band_core = BAND_WINDOWS * stride
    total = sum(len(_band_cols(cols, c0, min(width, c0 + band_core), tile)) for c0 in range(0, width, band_core)) * len(rows)
    done = 0
    for c0 in range(0, width, band_core):
        c1 = min(width, c0 + band_core)
        bcols = _band_cols(cols, c0, c1, tile)
        x0 = bcols[0]
        span = bcols[-1] + tile - x0  # the band's windows' columns (a padded tile when the scene is narrower)
        acc = np.zeros((n_classes, tile, span), dtype=np.float32)
        wsum = np.zeros((tile, span), dtype=np.float32)
        valid = np.zeros((tile, span), dtype=bool)
        origin = rows[0]
        for i, y in enumerate(rows):
            shift = y - origin
            if shift:  # rows [origin, y) are final: the band's core columns go out, the buffer moves up
                _emit(on_strip, origin, shift, c0, c1, x0, acc, wsum, valid, height)
                acc = np.roll(acc, -shift, axis=1)
                acc[:, -shift:] = 0
                wsum = np.roll(wsum, -shift, axis=0)
                wsum[-shift:] = 0
                valid = np.roll(valid, -shift, axis=0)
                valid[-shift:] = False
                origin = y
            for start in range(0, len(bcols), batch_size):
                xs = bcols[start : start + batch_size]
                reads = [reader.read(y, x, tile) for x in xs]
                keys = [f"{reader.path.name}:{y}:{x}" for x in xs]
                logits = model.logits(torch.from_numpy(np.stack([r[0] for r in reads])), keys).cpu().numpy()
                for x, (_, v), lg in zip(xs, reads, logits):
                    sl = slice(x - x0, x - x0 + tile)
                    acc[:, :, sl] += lg * weight
                    wsum[:, sl] += weight
                    valid[:, sl] |= v
                done += len(xs)
                if progress is not None:
                    progress(done, total)
        _emit(on_strip, origin, min(tile, height - origin), c0, c1, x0, acc, wsum, valid, height)
    return done


def _band_cols(cols: list[int], c0: int, c1: int, tile: int) -> list[int]:
    """The windows whose columns meet the band's core columns [c0, c1)."""
    return [x for x in cols if x < c1 and x + tile > c0]


def _emit(on_strip, row: int, h: int, c0: int, c1: int, x0: int, acc, wsum, valid, height: int) -> None:
    h = min(h, height - row)
    if h <= 0:
        return
    sl = slice(c0 - x0, c1 - x0)
    on_strip(row, c0, acc[:, :h, sl] / np.maximum(wsum[:h, sl], 1e-12), valid[:h, sl])


def reference_blend(model, reader: SceneReader, overlap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The same blend by brute force: the whole scene's weighted logits at once (tests only)."""
    tile = model.tile_size
    overlap = tile // 4 if overlap is None else overlap
    height, width = reader.shape
    rows, cols = window_starts(height, tile, tile - overlap), window_starts(width, tile, tile - overlap)
    H, W = max(height, tile), max(width, tile)
    acc = np.zeros((model.num_classes, H, W), dtype=np.float64)
    wsum = np.zeros((H, W), dtype=np.float64)
    valid = np.zeros((H, W), dtype=bool)
    weight = blend_weight(tile, overlap)
    for y in rows:
        for x in cols:
            image, v = reader.read(y, x, tile)
            lg = model.logits(torch.from_numpy(image[None]), [f"{reader.path.name}:{y}:{x}"]).cpu().numpy()[0]
            acc[:, y:y + tile, x:x + tile] += lg * weight
            wsum[y:y + tile, x:x + tile] += weight
            valid[y:y + tile, x:x + tile] |= v
    return (acc / np.maximum(wsum, 1e-12))[:, :height, :width], valid[:height, :width]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------- outputs


def scenes_of(args: Iterable[str]) -> list[Path]:
    """GeoTIFF paths from paths, folders (every .tif inside) and globs."""
    import glob

    out: list[Path] = []
    for a in args:
        p = Path(a).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in (".tif", ".tiff") and q.is_file())
            if not found:
                raise DataError(f"{p}: no .tif scenes in this folder")
            out += found
        elif any(ch in a for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(os.path.expanduser(a), recursive=True))
            if not found:
                raise DataError(f"{a}: no file matches this pattern")
            out += found
        else:
            if not p.exists():
                raise DataError(f"{p}: file not found")
            out.append(p)
    return out


def scene_stem(scene: Path) -> str:
    stem = scene.name
    for suffix in (".jp2.tif", ".tiff", ".tif"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return scene.stem


def output_stems(scenes: list[Path]) -> list[str]:
    """One output name per input: the scene's stem, or, where two inputs share a stem
    (``a/x.tif``, ``b/x.tif``), its path below their common folder joined with ``__``
    (``a__x``), so that no map overwrites another."""
    stems = [scene_stem(s) for s in scenes]
    clash = {s for s in stems if stems.count(s) > 1}
    if not clash:
        return stems
    resolved = [s.expanduser().absolute() for s in scenes]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    out = [("__".join(p.parent.relative_to(common).parts + (stem,)) if stem in clash else stem)
           for p, stem in zip(resolved, stems)]
    same = sorted({o for o in out if out.count(o) > 1})
    if same:
        raise DataError(f"{same[0]}: given twice (the same scene in the list more than once)")
    return out


def output_paths(scene: Path, out_dir: Path, stem: str | None = None) -> tuple[Path, Path, Path]:
    stem = stem or scene_stem(scene)
    return out_dir / f"{stem}_classes.tif", out_dir / f"{stem}_probabilities.tif", out_dir / f"{stem}_classes.qml"


GSD_FACTOR = 2.0  # a scene's ground sample distance this many times the training data's (or less) is warned about


def input_warnings(scene: Path, reader: SceneReader, meta: dict, value_range_given: bool) -> list[str]:
    """What is legal but suspicious about a scene for this model (one line each): no CRS, a value
    range other than the training imagery's, 12-bit data in a 16-bit type, pixels outside the
    range, a ground sample distance far from the training data's. A few windows are sampled."""
    from rsseg.data import pixels

    out = []
    src = reader.src
    if src.crs is None:
        out.append(f"{scene}: no CRS (a JPEG/PNG, or a GeoTIFF without one): the class map is written in pixel "
                   "coordinates and will not line up with a map")
    trained = meta.get("input") or {}
    lo_r, hi_r = reader.range
    if not value_range_given and trained.get("value_range") and tuple(trained["value_range"]) != (lo_r, hi_r):
        out.append(f"{scene}: {src.dtypes[0]} values are mapped from [{lo_r:g}, {hi_r:g}], the model was trained on "
                   f"{trained['dtype']} imagery mapped from [{trained['value_range'][0]:g}, {trained['value_range'][1]:g}]; "
                   "give --value-range LO,HI for this imagery's range")
    tile = min(256, src.height, src.width)
    grid = [(r, c) for r in range(0, src.height - tile + 1, tile) for c in range(0, src.width - tile + 1, tile)]
    lo, hi, total, outside = pixels.sample_stats(scene, src, pixels.sample_windows(grid), tile, reader.bands, (lo_r, hi_r))
    if total and outside / total > pixels.MAX_OUTSIDE:
        out.append(f"{scene}: {100 * outside / total:.1f} % of sampled pixels lie outside [{lo_r:g}, {hi_r:g}], the range mapped "
                   f"to the model's input (sampled values {lo:g} .. {hi:g}), and are clipped; give --value-range, e.g. "
                   "--value-range {:g},{:g}".format(*pixels.suggested_range(lo, hi)))
    if (not value_range_given and src.dtypes[0] == "uint16" and hi_r == 65535.0 and hi is not None and 0 < hi <= pixels.TWELVE_BIT):
        out.append(f"{scene}: uint16 values reach only {hi:g} (12-bit data?): with [0, 65535] they fill 1/16 of the "
                   f"model's input range; give --value-range 0,{pixels.TWELVE_BIT}")
    gsd = float(abs(src.transform.a)) if src.crs is not None and src.crs.is_projected else None
    if gsd and trained.get("gsd") and not 1 / GSD_FACTOR <= gsd / trained["gsd"] <= GSD_FACTOR:
        out.append(f"{scene}: ground sample distance {gsd:g} m, the model was trained on {trained['gsd']:g} m imagery "
                   f"({max(gsd / trained['gsd'], trained['gsd'] / gsd):.0f}x {'coarser' if gsd > trained['gsd'] else 'finer'}): "
                   "objects appear at another scale than in training")
    return out


def qml_style(names: list[str], colors: list[list[int]]) -> str:
    """A QGIS paletted-renderer style: QGIS loads ``<raster>.qml`` with the raster."""
    entries = "\n".join(f'        <paletteEntry value="{i}" label="{_xml(n)}" alpha="255" color="#{r:02x}{g:02x}{b:02x}"/>'
                        for i, (n, (r, g, b)) in enumerate(zip(names, colors)))
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" nodataColor="">
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
"""


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


@dataclass
class PredictResult:
    scene: Path
    classes: Path
    probabilities: Path | None
    windows: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def predict_scene(model, scene: Path, out_dir: Path, *, overlap: int | None = None, batch_size: int = 8,
                  probabilities: bool = False, overwrite: bool = False, progress: bool = False,
                  bands: list[int] | None = None, value_range: tuple[float, float] | None = None,
                  stem: str | None = None) -> PredictResult:
    """One scene -> its class map (and probabilities), written atomically (see the module docs).
    ``bands`` / ``value_range`` replace the model's (for imagery other than its training data's);
    the result carries the warnings about the input (`input_warnings`, an all-nodata scene)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    from rsseg.atomic import atomic_path, atomic_write_text

    classes_path, probs_path, qml_path = output_paths(scene, out_dir, stem)
    for target in (classes_path,) + ((probs_path,) if probabilities else ()):
        if target.exists() and not overwrite:
            raise DataError(f"{target}: exists; refusing to overwrite it (give --overwrite)")
    meta = model.meta
    reader, notes = _open_checked(scene, meta, bands, value_range)
    valid_pixels = [0]
    profile = _map_profile(reader.src)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, colors = meta["classes"]["names"], meta["classes"]["colors"]
    t0 = time.perf_counter()
    with warnings.catch_warnings(), atomic_path(classes_path, suffix=".tif") as final_tmp:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        work = final_tmp.with_name(final_tmp.name + ".strips.tif")
        pwork = final_tmp.with_name(final_tmp.name + ".probs.tif") if probabilities else None
        try:
            dst = rasterio.open(work, "w", **profile)
            # the colour table before any pixel: set later, GTiff cannot change the photometric tag
            # and GDAL prints "ERROR 1: TIFFSetField ... PhotometricInterpretation" for every map
            dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(colors)} | {NODATA: (0, 0, 0, 0)})
            pdst = rasterio.open(pwork, "w", **{**profile, "count": model.num_classes, "nodata": None}) if pwork else None

            def on_strip(row, col, logits, valid):
                cls = logits.argmax(axis=0).astype(np.uint8)
                cls[~valid] = NODATA
                valid_pixels[0] += int(valid.sum())
                win = Window(col, row, cls.shape[1], cls.shape[0])
                dst.write(cls, 1, window=win)
                if pdst is not None:
                    pdst.write(np.round(softmax(logits) * 255).astype(np.uint8), window=win)

            windows = slide(model, reader, on_strip, overlap=overlap, batch_size=batch_size,
                            progress=_reporter(scene) if progress else None)
            _describe_classes(dst, model, scene, names, colors)
            dst.close()
            _to_cog(work, final_tmp)
            if pdst is not None:
                _finish_probabilities(pdst, pwork, probs_path, names)
        finally:
            reader.close()
            for p in (work, pwork):
                if p is not None:
                    Path(p).unlink(missing_ok=True)
    atomic_write_text(qml_path, qml_style(names, colors))
    if valid_pixels[0] == 0:
        notes.append(f"{scene}: every pixel is nodata, so the class map is all nodata ({NODATA})")
    return PredictResult(scene, classes_path, probs_path if probabilities else None, windows, time.perf_counter() - t0, notes)


def _finish_probabilities(pdst, work: Path, probs_path: Path, names: list[str]) -> None:
    """The probabilities' strips (``pdst``, open on ``work``) -> their COG at ``probs_path``, atomically."""
    from rsseg.atomic import atomic_path

    for i, n in enumerate(names):
        pdst.set_band_description(i + 1, f"p({n})")
    pdst.close()
    with atomic_path(probs_path, suffix=".tif") as ptmp:
        _to_cog(work, ptmp)


def _map_profile(src) -> dict:
    """The class map's GeoTIFF profile: the scene's grid and georeference, one tiled uint8 band."""
    profile = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="uint8", nodata=NODATA,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate", transform=src.transform)
    if src.crs is not None:
        profile["crs"] = src.crs
    return profile


def _open_checked(scene: Path, meta: dict, bands, value_range) -> tuple[SceneReader, list[str]]:
    """The scene's reader (``bands`` / ``value_range`` in place of the model's) and the warnings
    about it (`input_warnings`)."""
    reader = SceneReader(scene, list(bands) if bands else meta.get("bands"), value_range or meta.get("value_range"),
                         meta.get("in_channels"))
    try:
        return reader, input_warnings(scene, reader, meta, value_range is not None)
    except BaseException:
        reader.close()
        raise


def _reporter(scene: Path) -> Callable[[int, int], None]:
    from rsseg.progress import line

    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        line(f"{scene.name}: {done}/{total} windows  {rate:.1f} tiles/s  ETA {(total - done) / max(rate, 1e-9):.0f} s",
             f"predict {scene}", final=done == total)

    return report


def _describe_classes(dst, model, scene: Path, names: list[str], colors: list[list[int]]) -> None:
    """The class raster's class names and provenance: which model made this map,
    from which image, with which code."""
    from rsseg.provenance import stamp

    dst.update_tags(1, class_names=",".join(names), **{f"class_{i}": n for i, n in enumerate(names)})
    dst.update_tags(rsseg_model=str(getattr(model, "source", "")), rsseg_source=str(scene),
                    rsseg_model_git_commit=str(model.meta.get("git_commit", "")),
                    rsseg_model_test_mIoU=f"{model.meta.get('test', {}).get('mIoU', float('nan')):.4f}",
                    **{k if k.startswith("rsseg_") else f"rsseg_{k}": str(v) for k, v in stamp().items()})
    dst.set_band_description(1, "class")


def _to_cog(src_path: Path, dst_path: Path) -> None:
    """Tiled, DEFLATE, overviews, in the COG layout (the colour table and metadata are kept)."""
    from rasterio.shutil import copy

    copy(str(src_path), str(dst_path), driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256, OVERVIEWS="AUTO",
         RESAMPLING="NEAREST")


def quicklook(classes_path: Path, out_png: Path, names: list[str], colors: list[list[int]], max_side: int = 1024) -> Path:
    """A PNG of a class map (decimated through its overviews) with a legend of the classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio
    from matplotlib.patches import Patch

    from rsseg.atomic import atomic_path

    with rasterio.open(classes_path) as src:
        scale = max(1, math.ceil(max(src.width, src.height) / max_side))
        cls = src.read(1, out_shape=(max(1, src.height // scale), max(1, src.width // scale)))
    rgb = np.full((*cls.shape, 3), NODATA_RGB, dtype=np.uint8)  # no data: light grey, in the legend (was black, unexplained)
    palette = np.array(colors, dtype=np.uint8)
    ok = cls < len(palette)
    rgb[ok] = palette[cls[ok]]
    present = [i for i in np.unique(cls) if i < len(names)]
    fig, ax = plt.subplots(figsize=(8, 8 * cls.shape[0] / max(cls.shape[1], 1) + 0.5), dpi=110)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(classes_path.name, fontsize=9)
    handles = [Patch(color=palette[i] / 255.0, label=names[i]) for i in present]
    if (~ok).any():
        handles.append(Patch(facecolor=np.array(NODATA_RGB) / 255.0, edgecolor="grey", label="no data"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, title="class")
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png
