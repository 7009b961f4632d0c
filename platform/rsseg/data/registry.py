"""DataSpec -> SceneSet: which scenes a dataset name means (`rsseg.data.datasets`), with its class table;
the built-in datasets."""

from __future__ import annotations

from pathlib import Path

from rsseg.config.specs import ArchiveSpec, DataSpec
from rsseg.data import archive, folder, gid, minifrance, synthetic
from rsseg.data.classes import SYNTHETIC7, UNLABELLED, ClassTable, resolve_table
from rsseg.data.datasets import Dataset, get
from rsseg.data.scenes import Scene, SceneSet
from rsseg.errors import DataError
from rsseg.workdir import Workdir

def class_table(spec: DataSpec) -> ClassTable:
    if spec.class_table and spec.dataset == "folder" and spec.root is not None:
        own = folder.default_table_path(spec.root)
        named = Path(spec.class_table)
        if own.is_file() and (named.name != own.name or (named.is_absolute() and named != own)):
            raise DataError(f"data.class_table: {spec.class_table!r} is given, but {own} defines this dataset's classes; "
                            f"drop data.class_table (or name that file: --set data.class_table={own.name})")
    if spec.class_table:
        return resolve_table(spec.class_table, base_dir=spec.root)
    default = get(spec.dataset).table
    name = default(spec) if callable(default) else default
    if name is None:
        raise DataError(f"data.class_table: the {spec.dataset} dataset has no default class table; name one (docs/own-data.md)")
    return resolve_table(name, base_dir=spec.root)


def synthetic_root(spec: DataSpec, workdir: Workdir) -> Path:
    return synthetic.ensure(spec.synthetic, spec.root or workdir.data)


def scenes(spec: DataSpec, workdir: Workdir | None = None) -> SceneSet:
    """The scenes of a dataset (generating the synthetic one on first use)."""
    workdir = workdir or Workdir.resolve()
    dataset = get(spec.dataset)
    table = class_table(spec)
    if dataset.needs_root and spec.root is None:
        raise DataError(f"data.root: the {spec.dataset} dataset needs a root directory")
    out = dataset.scenes(spec, table, workdir)
    bands = tuple(spec.bands) if spec.bands else None
    value_range = tuple(spec.value_range) if spec.value_range else out.value_range
    return SceneSet(out.dataset, out.root, out.table, out.labelled, out.unlabeled, bands, value_range, out.layout)


def _synthetic_scenes(spec: DataSpec, table: ClassTable, workdir: Workdir) -> SceneSet:
    if table.kind != "codes" or table.num_classes != SYNTHETIC7.num_classes:
        raise DataError(f"data.class_table: the synthetic dataset uses codes 1-7 (synthetic7), not {table.name!r}")
    root = synthetic_root(spec, workdir)
    labelled = tuple(
        Scene(id=p.stem, image=p, label=p.with_name(p.stem + "_label.tif"))
        for p in sorted((root / "labelled").glob("scene_*.tif")) if not p.stem.endswith("_label")
    )
    unlabeled = tuple(Scene(id=p.stem, image=p) for p in sorted((root / "unlabeled").glob("*.tif")))
    return SceneSet("synthetic", root, table, labelled, unlabeled, value_range=(0.0, 255.0), layout="synthetic")


def _folder_table(spec: DataSpec) -> str:
    if spec.root is None:
        raise DataError("data.root: the folder dataset needs a root (with images/, masks/ and classes.yaml)")
    path = folder.default_table_path(spec.root)
    if not path.is_file():
        raise DataError(f"{path}: class table not found; write one (docs/own-data.md) or set data.class_table")
    return str(path)


# the built-in datasets (rsseg.data.datasets names them)
SYNTHETIC = Dataset(_synthetic_scenes, "synthetic7", needs_root=False)
MINIFRANCE = Dataset(lambda spec, table, workdir: minifrance.discover(spec.root, table), "minifrance14")
GID = Dataset(lambda spec, table, workdir: gid.discover(spec.root, table, spec.gid),
              lambda spec: "gid15" if spec.gid.level == "fine" else "gid5")
FOLDER = Dataset(lambda spec, table, workdir: folder.discover(spec.root, table), _folder_table)


def archive_scenes(spec: ArchiveSpec, data: DataSpec, workdir: Workdir | None = None) -> SceneSet | None:
    """The step-1 archive imagery, or None when the spec has none."""
    workdir = workdir or Workdir.resolve()
    source = spec.source_for(data)
    if source == "none":
        return None
    bands = tuple(spec.bands) if spec.bands else (tuple(data.bands) if data.bands else None)
    if source == "synthetic":
        root = synthetic_root(data if data.dataset == "synthetic" else DataSpec(), workdir) / "archive"
        found = tuple(Scene(id=p.stem, image=p) for p in sorted(root.glob("*.tif")))
        return SceneSet("archive", root, UNLABELLED, (), found, bands, (0.0, 255.0), "synthetic archive")
    if spec.root is None:
        raise DataError("pretrain.archive.root: a folder archive needs a root directory of GeoTIFFs")
    out = archive.discover(spec.root, UNLABELLED, spec.glob)
    value_range = tuple(spec.value_range) if spec.value_range else None
    return SceneSet(out.dataset, out.root, out.table, (), out.unlabeled, bands, value_range, out.layout)


def input_bands(spec: DataSpec, workdir: Workdir | None = None) -> int:
    """How many bands a network reading this dataset gets: ``data.bands`` if set, else the first
    labelled scene's band count (every scene of a dataset has the same)."""
    from rsseg.data.scenes import raster_meta

    found = scenes(spec, workdir)
    return len(found.bands) if found.bands else raster_meta(found.labelled[0].image).count
