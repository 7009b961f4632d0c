"""Tile index: windows, nodata skipping, deterministic splits, nested label-ratio subsets, cache."""

import numpy as np
import polars as pl
import pytest

from conftest import small_synthetic
from rsseg.data import tiles
from rsseg.errors import DataError


def test_windows_drop_remainders_and_step_by_stride():
    assert tiles.windows(100, 70, 32, 32) == [(0, 0), (0, 32), (0, 64), (32, 0), (32, 32), (32, 64)]
    assert len(tiles.windows(64, 64, 32, 16)) == 9


def test_index_counts_splits_and_nodata(workdir):
    spec = small_synthetic()
    index = tiles.build(spec, workdir)
    f = index.frame
    # 3 labelled + 1 unlabelled scenes of 128 px -> at most 16 windows each; nodata corners may
    # remove some, never a window with valid pixels.
    assert f.height <= 4 * 16 and (f["valid_fraction"] > 0).all()
    lab = f.filter(pl.col("role") == "labelled")
    n = lab.height
    counts = {s: int((lab["split"] == s).sum()) for s in tiles.SPLITS}
    assert counts["train"] == round(0.4 * n) and counts["val"] == round(0.1 * n)
    assert sum(counts.values()) == n
    assert (f.filter(pl.col("role") == "unlabeled")["split"] == "unlabeled").all()
    # class counts add up to the labelled pixels of each tile
    sums = np.asarray(lab["class_counts"].to_list()).sum(1)
    assert np.array_equal(sums, lab["labelled_pixels"].to_numpy())
    assert len(set(f["tile_id"].to_list())) == f.height


def test_all_nodata_windows_are_skipped(workdir, tmp_path):
    from rasters import write_folder_dataset

    root = write_folder_dataset(tmp_path / "own", nodata_half=True)
    from rsseg.config.specs import DataSpec

    index = tiles.build(DataSpec(dataset="folder", root=root, tile_size=16), workdir)
    # 64x64 image whose left half is nodata: 16 windows, 8 of them all nodata.
    assert index.frame.filter(pl.col("scene") == "a").height == 8


def test_splits_identical_across_runs_with_one_seed(workdir):
    scenes = tiles.build(small_synthetic(), workdir).scenes
    a = tiles.build_frame(scenes, tiles.TilingParams.from_spec(small_synthetic(), scenes))
    b = tiles.build_frame(tiles.build(small_synthetic(), workdir).scenes, tiles.TilingParams.from_spec(small_synthetic(), scenes))
    assert a["split"].to_list() == b["split"].to_list()
    assert a["subset_rank"].to_list() == b["subset_rank"].to_list()
    c = tiles.build_frame(scenes, tiles.TilingParams.from_spec(small_synthetic(split_seed=1), scenes))
    assert a["split"].to_list() != c["split"].to_list()


def test_subsets_nested_for_any_ratio(workdir):
    index = tiles.build(small_synthetic(synthetic={"scenes": 6}), workdir)
    s, m, l = (set(index.subset(r)["tile_id"].to_list()) for r in (0.02, 0.4, 1.0))
    assert s and s < m < l or (s <= m <= l and len(s) < len(l))
    assert l == set(index.split("train").filter(pl.col("labelled_pixels") > 0)["tile_id"].to_list())
    prev = set()
    for r in np.linspace(0.05, 1.0, 12):
        cur = set(index.subset(float(r))["tile_id"].to_list())
        assert prev <= cur
        prev = cur
    assert index.subset_size(0.02) == 1  # at least one tile


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_label_ratio_outside_unit_interval(workdir, ratio):
    index = tiles.build(small_synthetic(), workdir)
    with pytest.raises(DataError, match=rf"label ratio {ratio} is outside \(0, 1\]"):
        index.subset(ratio)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_the_config_and_the_tile_index_refuse_a_label_ratio_with_one_rule(workdir, ratio):
    """One rule (`label_ratio_problem`) and one message for the spec and the library call."""
    from rsseg.config.specs import DataSpec, label_ratio_problem

    message = label_ratio_problem(ratio)
    assert message == f"label ratio {ratio!r} is outside (0, 1]; use e.g. 0.02 (S), 0.4 (M) or 1.0 (L)"
    with pytest.raises(ValueError) as spec_error:
        DataSpec(label_ratio=ratio)
    with pytest.raises(DataError) as index_error:
        tiles.build(small_synthetic(), workdir).subset_size(ratio)
    assert message in str(spec_error.value) and str(index_error.value) == message
    # the boundary: 1.0 (every labelled tile) holds, so does a small share
    assert label_ratio_problem(1.0) is None and label_ratio_problem(0.02) is None
    assert DataSpec(label_ratio=1.0).label_ratio == 1.0


def test_index_cached_and_rebuilt_when_tiling_changes(workdir):
    a = tiles.build(small_synthetic(), workdir)
    stamp = a.path.stat().st_mtime_ns
    b = tiles.build(small_synthetic(), workdir)
    assert b.path == a.path and b.path.stat().st_mtime_ns == stamp
    c = tiles.build(small_synthetic(tile_size=16), workdir)
    assert c.path != a.path and c.frame.height > a.frame.height
    d = tiles.build(small_synthetic(stride=16), workdir)
    assert d.path not in (a.path, c.path)
