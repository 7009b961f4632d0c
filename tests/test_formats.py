"""Dataset formats: MiniFrance, GID, folder and archive fixtures written in the real naming and
read back through the loaders; the real Landsat scene as unlabelled imagery."""

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from conftest import RGB_BYTE
from rasters import write_folder_dataset, write_gid, write_minifrance
from rsseg.cli import app
from rsseg.config.specs import ArchiveSpec, DataSpec, GidSpec
from rsseg.data import minifrance, registry, tiles
from rsseg.data.classes import IGNORE_INDEX, MINIFRANCE14, PAPER12
from rsseg.data.dataset import TileDataset, TileReader
from rsseg.data.info import summary


@pytest.mark.parametrize("layout", ["dfc2022", "release"])
def test_minifrance_discovery_pairing_and_codes(workdir, tmp_path, layout):
    stems = write_minifrance(tmp_path / "mf", labelled=2, unlabeled=1, size=96, layout=layout)
    spec = DataSpec(dataset="minifrance", root=tmp_path / "mf", tile_size=32)
    scenes = registry.scenes(spec, workdir)
    assert [s.id for s in scenes.labelled] == sorted(stems[:2])
    assert [s.id for s in scenes.unlabeled] == [stems[2]]
    assert minifrance.expected_origin(stems[0]) == (300_000.0, 6_750_000.0)
    index = tiles.build(spec, workdir)
    info = summary(index, spec)
    assert info["labelled_scenes"] == 2 and info["unlabeled_scenes"] == 1
    assert info["tiles"] == 3 * 9 and info["splits"]["unlabeled"] == 9
    assert sum(info["splits"][s] for s in tiles.SPLITS) == 18
    # codes 1-14 -> classes 0-13, 0 and 15 ignored: every class counted, ignored rows excluded
    hist = sum(np.asarray(h) for h in info["histogram"].values())
    assert (hist > 0).all() and hist.sum() == 2 * 96 * 96 * 14 // 16


def test_minifrance_paper12_mapping():
    codes = np.arange(16)
    out = PAPER12.lut()[codes]
    assert out[0] == IGNORE_INDEX and out[15] == IGNORE_INDEX
    assert out[8] == out[5] and out[9] == out[6]  # merges documented in the table
    assert sorted(set(out[1:15].tolist())) == list(range(12))
    assert MINIFRANCE14.lut()[1:15].tolist() == list(range(14))


def test_minifrance_label_values_through_dataset(workdir, tmp_path):
    write_minifrance(tmp_path / "mf", labelled=1, unlabeled=0, size=64)
    spec = DataSpec(dataset="minifrance", root=tmp_path / "mf", tile_size=32, split=(1.0, 0.0, 0.0))
    index = tiles.build(spec, workdir)
    s = index.scenes
    ds = TileDataset(TileReader(s.scenes, s.table), index.split("train").sort("tile_id"))
    item = ds[0]  # tile at row 0: rows 0-3 code 0 (ignored), rows 4-7 code 1 -> class 0, ...
    rows = item["mask"][:, 0]
    assert (rows[:4] == IGNORE_INDEX).all() and (rows[4:8] == 0).all() and (rows[8:12] == 1).all()


@pytest.mark.parametrize("image, bands, channels", [("rgb", None, 3), ("nirrgb", None, 4), ("nirrgb", [2, 3, 4], 3)])
def test_gid_fine_with_band_selection(workdir, tmp_path, image, bands, channels):
    stems = write_gid(tmp_path / "GID", fine=2, coarse=3, size=(80, 72))
    spec = DataSpec(dataset="gid", root=tmp_path / "GID", tile_size=32, gid=GidSpec(level="fine", image=image), bands=bands)
    index = tiles.build(spec, workdir)
    info = summary(index, spec)
    assert info["class_table"] == "gid15" and info["labelled_scenes"] == 2
    # step-2 imagery: the coarse images that are not fine ones
    assert info["unlabeled_scenes"] == 3
    assert info["tiles"] == 5 * 2 * 2  # 80x72 -> 2x2 windows of 32
    s = index.scenes
    ds = TileDataset(TileReader(s.scenes, s.table, s.bands, s.value_range), index.split("test"))
    item = ds[0]
    assert item["image"].shape == (channels, 32, 32)
    classes = set(torch.unique(torch.cat([ds[i]["mask"].ravel() for i in range(len(ds))])).tolist())
    assert classes - {IGNORE_INDEX} <= set(range(15))
    # black label pixels (rows 120-127 of the 128-row colour cycle) never reach a class
    assert index.class_histogram(index.frame).sum() == index.frame["labelled_pixels"].sum()
    if bands:  # bands 2-4 of NIR-RGB equal the RGB image
        rgb = DataSpec(dataset="gid", root=tmp_path / "GID", tile_size=32, gid=GidSpec(image="rgb"))
        ri = tiles.build(rgb, workdir)
        rds = TileDataset(TileReader(ri.scenes.scenes, ri.table, None, ri.scenes.value_range), ri.split("test"))
        assert torch.equal(rds[0]["image"], item["image"])


def test_gid_coarse_level(workdir, tmp_path):
    write_gid(tmp_path / "GID", fine=1, coarse=3)
    spec = DataSpec(dataset="gid", root=tmp_path / "GID", tile_size=32, gid=GidSpec(level="coarse"))
    info = summary(tiles.build(spec, workdir), spec)
    assert info["class_table"] == "gid5" and info["labelled_scenes"] == 3 and info["unlabeled_scenes"] == 0
    assert sum(info["histogram"]["train"]) + sum(info["histogram"]["val"]) + sum(info["histogram"]["test"]) > 0


@pytest.mark.parametrize("png", [False, True])
def test_folder_dataset_with_geotiff_or_png_masks(workdir, tmp_path, png):
    root = write_folder_dataset(tmp_path / "own", png_mask=png)
    spec = DataSpec(dataset="folder", root=root, tile_size=32)
    index = tiles.build(spec, workdir)
    info = summary(index, spec)
    assert info["class_table"] == "own3" and info["labelled_scenes"] == 2 and info["unlabeled_scenes"] == 1
    total = sum(sum(h) for h in info["histogram"].values())
    assert total == 2 * 64 * 64 * 3 // 4  # code 0 (a quarter of the columns) ignored


def test_real_landsat_scene_as_unlabelled_archive(workdir, tmp_path):
    """../shared/data/RGB.byte.tif: EPSG:32618, nodata 0, a rotated footprint."""
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    (archive_dir / "landsat.tif").symlink_to(RGB_BYTE)
    data = DataSpec(dataset="synthetic", tile_size=128)
    scenes = registry.archive_scenes(ArchiveSpec(source="folder", root=archive_dir), data, workdir)
    assert [s.id for s in scenes.unlabeled] == ["landsat"]
    index = tiles.build(data, workdir, scenes=scenes)
    f = index.frame
    # 791 x 718 -> 6 x 5 whole windows; the nodata margin around the footprint drops some
    assert 0 < f.height < 30 and (f["split"] == "unlabeled").all()
    assert f["valid_fraction"].min() > 0 and f["valid_fraction"].max() == 1.0
    ds = TileDataset(TileReader(scenes.scenes, scenes.table, None, scenes.value_range), f, with_labels=False)
    partial = f.with_row_index().filter(pl.col("valid_fraction") < 1)["index"][0]
    item = ds[int(partial)]
    assert item["image"].shape == (3, 128, 128) and "mask" not in item
    assert ((item["image"] == 0).all(0)).any()  # nodata mapped to 0


def test_cli_data_info_prints_counts(workdir, tmp_path):
    write_minifrance(tmp_path / "mf", labelled=2, unlabeled=1, size=96)
    runner = CliRunner()
    out = runner.invoke(app, ["--workdir", str(workdir.root), "data", "info", "minifrance", "--root", str(tmp_path / "mf"), "--tile-size", "32"])
    assert out.exit_code == 0, out.output
    assert "2 labelled, 1 unlabelled" in out.output and "27 of 32x32 px" in out.output
    assert "unlabeled 9" in out.output
    write_gid(tmp_path / "GID", fine=2, coarse=3)
    out = runner.invoke(app, ["--workdir", str(workdir.root), "data", "info", "gid", "--root", str(tmp_path / "GID"), "--tile-size", "32", "--set", "gid.image=nirrgb"])
    assert out.exit_code == 0, out.output
    assert "gid15 (15 classes)" in out.output and "2 labelled, 3 unlabelled" in out.output


def test_cli_data_info_synthetic(workdir):
    runner = CliRunner()
    args = ["--workdir", str(workdir.root), "data", "info", "synthetic", "--tile-size", "32",
            "--set", "synthetic.scenes=2", "--set", "synthetic.size=64", "--set", "synthetic.unlabeled_scenes=1"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "2 labelled, 1 unlabelled" in out.output and "synthetic7 (7 classes)" in out.output
    again = runner.invoke(app, args)
    assert again.output == out.output  # same seed, same splits and counts
