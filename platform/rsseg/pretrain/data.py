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

    index = tiles.build(run.data, workdir)
    frame = index.frame.filter(pl.col("split").is_in(list(run.pretrain.homogeneous)))
    homogeneous = TileDataset(TileReader.of(index.scenes), frame, augment=PRETRAIN_AUGMENT, seed=run.pretrain.seed,
                              with_labels=False)
    archive = None
    arc_scenes = registry.archive_scenes(run.pretrain.archive, run.data, workdir)
    if arc_scenes is not None:
        arc_index = tiles.build(run.data, workdir, scenes=arc_scenes)
        archive = TileDataset(TileReader.of(arc_scenes), arc_index.frame, augment=PRETRAIN_AUGMENT,
                              seed=run.pretrain.seed, with_labels=False)
    return archive, homogeneous
