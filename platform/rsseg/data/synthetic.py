"""The built-in synthetic land cover: real GeoTIFFs, deterministic from a seed.

Each scene is a map of irregular regions (warped Voronoi cells, ~56 px), each region one of
seven classes (table ``synthetic7``). Every class is a two-colour pattern; classes differ in
*structure* (block size, stripes, dot rows, blobs, speckle) and in *which pair* of colours they
mix, but no class owns a colour alone except water, roofs (UB) and bright roofs (Ind.): each
vegetation colour is shared by two classes, grey streets by both built classes.

  class  pattern (~50 % of each colour)                   colours
  UB     small buildings on a street grid (cells 8-12 px)  street grey + red roof
  Ind.   large buildings (cells 22-30 px)                  street grey + bright roof
  AL     parallel stripes, period 10-16 px, any angle      brown + light green
  PC     rows of round dots, period 8-12 px                brown + dark green
  For.   smooth blobs (noise at 6 px, thresholded)         dark green + mid green
  Pas.   speckle (noise at 1.5 px, thresholded)            mid green + light green
  Water  smooth, low-frequency shading                     blue

Why: a per-pixel colour classifier cannot tell apart the classes that share a colour, so its
mIoU is bounded (about 0.50 at best, see tests/test_synthetic.py) while a spatial model that
sees the pattern and the colour pair reaches far more; a DDPM pre-trained on these scenes has
structure to learn that a pixel's colour does not give.

Per-region brightness (x0.9-1.1) and per-pixel sensor noise (sigma 8) keep it from being
trivial. An ``archive`` domain (other colours, 1.4x pattern size, coarser GSD) stands in for the
archive imagery of the paper's step-1 pre-training. A nodata corner (value 0, declared nodata)
mimics an orthophoto footprint; valid pixels are never 0 in all bands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsseg.config.specs import SyntheticSpec
from rsseg.provenance import fingerprint

NUM_CLASSES = 7
UB, IND, AL, PC, FOR, PAS, WATER = range(NUM_CLASSES)
GENERATOR_VERSION = 3  # bump when the generator's output changes: a new directory is generated


@dataclass(frozen=True)
class Domain:
    name: str
    colours: dict[str, tuple[float, float, float]]
    scale: float  # pattern size multiplier
    gsd_factor: float


# Each class mixes two of these (PAIRS); shared colours make per-pixel colour ambiguous.
PAIRS = {
    UB: ("street", "roof"),
    IND: ("street", "bright_roof"),
    AL: ("brown", "light_green"),
    PC: ("brown", "dark_green"),
    FOR: ("dark_green", "mid_green"),
    PAS: ("mid_green", "light_green"),
}

HOMOGENEOUS = Domain(
    "homogeneous",
    colours={
        "street": (150.0, 150.0, 155.0), "roof": (185.0, 95.0, 80.0), "bright_roof": (215.0, 210.0, 200.0),
        "brown": (140.0, 112.0, 72.0), "light_green": (145.0, 175.0, 85.0), "dark_green": (45.0, 85.0, 45.0),
        "mid_green": (90.0, 130.0, 60.0), "water": (40.0, 70.0, 112.0),
    },
    scale=1.0,
    gsd_factor=1.0,
)
ARCHIVE = Domain(
    "archive",
    colours={
        "street": (125.0, 130.0, 145.0), "roof": (200.0, 120.0, 105.0), "bright_roof": (230.0, 225.0, 225.0),
        "brown": (160.0, 135.0, 95.0), "light_green": (165.0, 185.0, 110.0), "dark_green": (35.0, 70.0, 55.0),
        "mid_green": (75.0, 115.0, 75.0), "water": (30.0, 55.0, 95.0),
    },
    scale=1.4,
    gsd_factor=1.6,
)


def _upsample(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Separable linear interpolation of a coarse grid to ``shape``."""
    h, w = shape
    gh, gw = grid.shape
    ys = np.linspace(0, gh - 1, h)
    xs = np.linspace(0, gw - 1, w)
    rows = np.stack([np.interp(xs, np.arange(gw), grid[i]) for i in range(gh)])  # (gh, w)
    return np.stack([np.interp(ys, np.arange(gh), rows[:, j]) for j in range(w)], axis=1)  # (h, w)


def smooth_noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance-ish noise varying over ``scale`` pixels."""
    gh = max(2, int(np.ceil(shape[0] / scale)) + 2)
    gw = max(2, int(np.ceil(shape[1] / scale)) + 2)
    field = _upsample(rng.standard_normal((gh, gw)), shape)
    return (field - field.mean()) / (field.std() + 1e-8)


def label_map(size: int, rng: np.random.Generator, cell: float = 56.0) -> np.ndarray:
    """Warped Voronoi cells with a random class each -> (size, size) int class map and cell ids."""
    n = max(4, int(round((size / cell) ** 2 * 1.2)))
    pts = rng.uniform(0, size, size=(n, 2))
    classes = rng.integers(0, NUM_CLASSES, size=n)
    classes[: min(n, NUM_CLASSES)] = rng.permutation(NUM_CLASSES)[: min(n, NUM_CLASSES)]  # every class present
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy += 10.0 * smooth_noise((size, size), 24.0, rng)
    xx += 10.0 * smooth_noise((size, size), 24.0, rng)
    best = np.full((size, size), np.inf)
    cell_id = np.zeros((size, size), dtype=np.int32)
    for i, (py, px) in enumerate(pts):
        d = (yy - py) ** 2 + (xx - px) ** 2
        closer = d < best
        best[closer] = d[closer]
        cell_id[closer] = i
    return classes[cell_id], cell_id


def _buildings(shape: tuple[int, int], cell_lo: float, cell_hi: float, rng: np.random.Generator) -> np.ndarray:
    """Binary roof mask: one square building per grid cell, side 0.7 x cell (~49 % roofs)."""
    h, w = shape
    c = rng.uniform(cell_lo, cell_hi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    oy, ox = rng.uniform(0, c, size=2)
    fy = ((yy + oy) % c) / c
    fx = ((xx + ox) % c) / c
    return ((fy < 0.7) & (fx < 0.7)).astype(np.float64)


def _stripes(shape, period_lo, period_hi, rng):
    h, w = shape
    p = rng.uniform(period_lo, period_hi)
    a = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, p)
    return ((u % p) < p / 2).astype(np.float64)


def _dots(shape, period_lo, period_hi, rng):
    h, w = shape
    p = rng.uniform(period_lo, period_hi)
    r = p * np.sqrt(0.5 / np.pi)  # disc area = half the cell
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    oy, ox = rng.uniform(0, p, size=2)
    dy = (yy + oy) % p - p / 2
    dx = (xx + ox) % p - p / 2
    return ((dy**2 + dx**2) < r**2).astype(np.float64)


def _blobs(shape, scale, rng):
    return (smooth_noise(shape, scale, rng) > 0).astype(np.float64)


def _speckle(shape, scale, rng):
    return (smooth_noise(shape, scale, rng) > 0).astype(np.float64)


def render(classes: np.ndarray, cells: np.ndarray, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """Class map -> (3, H, W) float image in [1, 255]."""
    h, w = classes.shape
    s = domain.scale
    img = np.zeros((3, h, w), dtype=np.float64)
    for cid in np.unique(cells):
        region = cells == cid
        ys, xs = np.nonzero(region)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        shape = (y1 - y0, x1 - x0)
        cls = int(classes[ys[0], xs[0]])
        if cls == UB:
            pattern = _buildings(shape, 8 * s, 12 * s, rng)
        elif cls == IND:
            pattern = _buildings(shape, 22 * s, 30 * s, rng)
        elif cls == AL:
            pattern = _stripes(shape, 10 * s, 16 * s, rng)
        elif cls == PC:
            pattern = _dots(shape, 8 * s, 12 * s, rng)
        elif cls == FOR:
            pattern = _blobs(shape, 6.0 * s, rng)
        elif cls == PAS:
            pattern = _speckle(shape, 1.5 * s, rng)
        else:
            pattern = None
        palette = [domain.colours[c] for c in PAIRS[cls]] if pattern is not None else None
        gain = rng.uniform(0.9, 1.1)
        sub = region[y0:y1, x0:x1]
        for b in range(3):
            if pattern is None:
                value = domain.colours["water"][b] + 6.0 * smooth_noise(shape, 30.0 * s, rng)
            else:
                lo, hi = palette[0][b], palette[1][b]
                value = lo + (hi - lo) * pattern
            img[b, y0:y1, x0:x1][sub] = (gain * value)[sub]
    img += rng.normal(0.0, 8.0, size=img.shape)
    return np.clip(img, 1, 255)


def nodata_corner(size: int, rng: np.random.Generator) -> np.ndarray:
    """A triangular nodata corner (True = nodata), legs 10-30 % of the side."""
    yy, xx = np.mgrid[0:size, 0:size]
    a, b = rng.uniform(0.1, 0.3, size=2) * size
    corner = rng.integers(0, 4)
    if corner in (1, 3):
        xx = size - 1 - xx
    if corner in (2, 3):
        yy = size - 1 - yy
    return (yy / a + xx / b) < 1.0


def _write(path: Path, data: np.ndarray, gsd: float, x0: float, y0: float, nodata: int | None) -> None:
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    count, h, w = data.shape
    profile = dict(
        driver="GTiff", width=w, height=h, count=count, dtype="uint8",
        crs=CRS.from_epsg(32631), transform=from_origin(x0, y0, gsd, gsd), compress="deflate",
    )
    if h >= 256 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if nodata is not None:
        profile["nodata"] = nodata
    tmp = path.with_name(f".{path.name}.tmp")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
    tmp.replace(path)


def generate_scene(seed_seq: list[int], size: int, domain: Domain, texture_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (3, size, size) uint8 image (0 = nodata) and (size, size) uint8 codes (0 = nodata)."""
    import dataclasses

    domain = dataclasses.replace(domain, scale=domain.scale * texture_scale)
    rng = np.random.default_rng(seed_seq)
    classes, cells = label_map(size, rng)
    image = render(classes, cells, domain, rng).round().astype(np.uint8)
    codes = (classes + 1).astype(np.uint8)
    hole = nodata_corner(size, rng)
    image[:, hole] = 0
    codes[hole] = 0
    return image, codes


def dataset_dir(spec: SyntheticSpec, root: Path) -> Path:
    key = fingerprint({"v": GENERATOR_VERSION, **spec.model_dump(mode="json")}, length=12)
    return root / f"synthetic-{key}"


def ensure(spec: SyntheticSpec, root: Path) -> Path:
    """Generate the dataset under ``root`` on first use (once, even with concurrent callers)."""
    from filelock import FileLock

    out = dataset_dir(spec, root)
    done = out / "DONE"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if done.exists():
            return out
        for sub in ("labelled", "unlabeled", "archive"):
            (out / sub).mkdir(exist_ok=True)
        s = spec.seed
        for i in range(spec.scenes):
            image, codes = generate_scene([s, 0, i], spec.size, HOMOGENEOUS, spec.texture_scale)
            x0, y0 = 500_000 + i * spec.size * spec.gsd, 5_000_000
            _write(out / "labelled" / f"scene_{i:03d}.tif", image, spec.gsd, x0, y0, nodata=0)
            _write(out / "labelled" / f"scene_{i:03d}_label.tif", codes[None], spec.gsd, x0, y0, nodata=0)
        for i in range(spec.unlabeled_scenes):
            image, _ = generate_scene([s, 1, i], spec.size, HOMOGENEOUS, spec.texture_scale)
            x0, y0 = 600_000 + i * spec.size * spec.gsd, 5_000_000
            _write(out / "unlabeled" / f"unlabeled_{i:03d}.tif", image, spec.gsd, x0, y0, nodata=0)
        for i in range(spec.archive_scenes):
            image, _ = generate_scene([s, 2, i], spec.size, ARCHIVE, spec.texture_scale)
            gsd = spec.gsd * ARCHIVE.gsd_factor
            x0, y0 = 700_000 + i * spec.size * gsd, 5_100_000
            _write(out / "archive" / f"archive_{i:03d}.tif", image, gsd, x0, y0, nodata=0)
        (out / "spec.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION, **spec.model_dump(mode="json")}, indent=2))
        done.write_text("ok\n")
    return out
