"""The unlabelled imagery of a pre-training: archive tiles (step 1) and homogeneous tiles (step 2)."""

from __future__ import annotations

from rsseg.config.specs import AugmentSpec
from rsseg.workdir import Workdir

# Geometric augmentation only: the radiometric stretch is a fine-tuning augmentation (paper 4.2.2).
PRETRAIN_AUGMENT = AugmentSpec(stretch=False, rot90=True, flip=True, p=0.5)


def pretrain_datasets(run, workdir: Workdir):
    """(archive dataset or None, homogeneous dataset): unlabelled tile datasets of ``run``."""
    import polars as pl

    from rsseg.data import registry, tiles
    from rsseg.data.dataset import TileDataset, TileReader

    # step 2 reads the target dataset's own imagery, or another dataset's (pretrain.homogeneous_data)
    index = tiles.build(run.pretrain.homogeneous_data or run.data, workdir)
    frame = index.frame.filter(pl.col("split").is_in(list(run.pretrain.homogeneous)))
    homogeneous = TileDataset(TileReader.of(index.scenes), frame, augment=PRETRAIN_AUGMENT, seed=run.pretrain.seed,
                              with_labels=False)
    archive = None
    # no archive iterations (homogeneous_ratio 1.0): the archive spec is not read, so a copied
    # sweep's archive root that does not exist on this machine does not stop the run
    n_archive, _ = run.pretrain.iterations.counts()
    arc_scenes = registry.archive_scenes(run.pretrain.archive, run.data, workdir) if n_archive else None
    if arc_scenes is not None:
        arc_index = tiles.build(run.data, workdir, scenes=arc_scenes)
        archive = TileDataset(TileReader.of(arc_scenes), arc_index.frame, augment=PRETRAIN_AUGMENT,
                              seed=run.pretrain.seed, with_labels=False)
    return archive, homogeneous


def dataset_problems(data) -> list[str]:
    """A dataset root that is not there (``data``: a DataSpec), found without reading a raster:
    every stage reads it, so a sweep says so before it starts anything."""
    from pathlib import Path

    if data.dataset != "synthetic" and data.root is not None and not Path(data.root).is_dir():
        return [f"data.root: {data.root} is not a directory (the {data.dataset} dataset; set RSSEG_DATA or --set data.root=DIR)"]
    return []


def data_problems(run) -> list[str]:
    """What would make this run's pre-training fail on its data, found without reading a raster:
    a missing dataset root, archive iterations without archive imagery (with the override that
    drops them), an archive folder that is not there. Only a pre-training still to do reads the
    imagery beyond the dataset's own."""
    from pathlib import Path

    problems = dataset_problems(run.data)
    other = run.pretrain.homogeneous_data
    if other is not None and other.dataset != "synthetic" and (other.root is None or not Path(other.root).is_dir()):
        problems.append(f"pretrain.homogeneous_data.root: {other.root} is not a directory (the {other.dataset} imagery of step 2)")
    n_archive, n_homogeneous = run.pretrain.iterations.counts()
    a = run.pretrain.archive
    source = a.source_for(run.data)
    if not n_archive or source == "synthetic":
        return problems
    if run.pretrain.iterations.homogeneous_ratio is not None:
        fix = "--set pretrain.iterations.homogeneous_ratio=1.0"
    else:
        fix = f"--set pretrain.iterations.archive=0 --set pretrain.iterations.homogeneous={n_archive + n_homogeneous}"
    if source == "none":
        problems.append(f"pretrain.iterations: {n_archive} archive iterations but there is no archive imagery (pretrain.archive.source "
                        f"{a.source}, no pretrain.archive.root); point pretrain.archive.root at a folder of GeoTIFFs, or pre-train on "
                        f"the dataset's own imagery only: {fix}")
    elif a.root is None or not Path(a.root).is_dir():
        problems.append(f"pretrain.archive.root: {a.root} is not a directory of archive GeoTIFFs (set RSSEG_ARCHIVE or "
                        f"pretrain.archive.root, or pre-train on the dataset's own imagery only: {fix})")
    return problems
