"""Every bad-input case of the data layer: one line, naming the file or key, saying what was expected."""

import numpy as np
import pytest
from typer.testing import CliRunner

from rasters import write_folder_dataset, write_gid, write_minifrance, write_tif
from rsseg.cli import app
from rsseg.config.specs import DataSpec, GidSpec
from rsseg.data import registry, tiles
from rsseg.data.classes import named_table
from rsseg.errors import DataError


def one_line(exc):
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_dataset_root_missing_names_layout_and_path(workdir, tmp_path):
    with pytest.raises(DataError, match=r"dataset root .*/nowhere not found; expected the MiniFrance layout: .*_UA2012.tif") as e:
        registry.scenes(DataSpec(dataset="minifrance", root=tmp_path / "nowhere"), workdir)
    one_line(e)
    with pytest.raises(DataError, match=r"dataset root .*/nowhere not found; expected the GID layout"):
        registry.scenes(DataSpec(dataset="gid", root=tmp_path / "nowhere"), workdir)
    (tmp_path / "gid").mkdir()
    with pytest.raises(DataError, match=r"missing folder Fine Land-cover Classification_15classes/image_RGB"):
        registry.scenes(DataSpec(dataset="gid", root=tmp_path / "gid"), workdir)


def test_image_label_size_mismatch_names_both_files(workdir, tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    write_tif(root / "masks" / "a.tif", np.ones((60, 64), dtype=np.uint8))
    with pytest.raises(DataError, match=r"image/label size mismatch: .*images/a.tif is 64x64 but .*masks/a.tif is 64x60") as e:
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)
    one_line(e)


def test_image_label_transform_mismatch_names_both_files(workdir, tmp_path):
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    root = write_folder_dataset(tmp_path / "own")
    write_tif(root / "masks" / "a.tif", np.ones((64, 64), dtype=np.uint8), crs=CRS.from_epsg(32632), transform=from_origin(1010.0, 2000.0, 1.0, 1.0))
    with pytest.raises(DataError, match=r"image/label transform mismatch: .*images/a.tif has \(1, 0, 1000.*masks/a.tif has \(1, 0, 1010"):
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)


def test_gid_colour_not_in_palette_names_file_colour_and_count(workdir, tmp_path):
    stems = write_gid(tmp_path / "GID", fine=1, coarse=0)
    path = tmp_path / "GID" / "Fine Land-cover Classification_15classes" / "label_15classes" / f"{stems['fine'][0]}_label.tif"
    import rasterio

    with rasterio.open(path) as src:
        rgb = src.read()
    rgb[:, :2, :5] = np.array([1, 2, 3], dtype=np.uint8)[:, None, None]
    write_tif(path, rgb)
    with pytest.raises(DataError, match=r"_label.tif: label colour not in the gid15 palette: \(1,2,3\) x 10 pixels") as e:
        tiles.build(DataSpec(dataset="gid", root=tmp_path / "GID", tile_size=32, gid=GidSpec(level="fine")), workdir)
    one_line(e)


def test_label_code_outside_class_table(workdir, tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    mask = np.full((64, 64), 1, dtype=np.uint8)
    mask[0, :7] = 9
    write_tif(root / "masks" / "b.tif", mask)
    with pytest.raises(DataError, match=r"masks/b.tif: label code 9 \(7 pixels\) not in class table 'own3'"):
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)


def test_unreadable_or_corrupt_tiff(workdir, tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    (root / "images" / "b.tif").write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(DataError, match=r"images/b.tif: not a readable GeoTIFF/raster") as e:
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)
    one_line(e)


def test_scene_smaller_than_one_tile(workdir, tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    with pytest.raises(DataError, match=r"images/a.tif: scene is 64x64, smaller than one 128x128 tile"):
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=128), workdir)


def test_unknown_dataset_and_class_table_names(workdir, tmp_path):
    with pytest.raises(DataError, match=r"unknown class table 'paper13'; expected one of .*minifrance14.*paper12"):
        named_table("paper13")
    write_minifrance(tmp_path / "mf", labelled=1, unlabeled=0, size=64)
    with pytest.raises(DataError, match=r"unknown class table 'mf15'"):
        registry.scenes(DataSpec(dataset="minifrance", root=tmp_path / "mf", class_table="mf15"), workdir)
    result = CliRunner().invoke(app, ["--workdir", str(workdir.root), "data", "info", "imagenet"])
    assert result.exit_code == 2
    assert "error: command line: dataset: expected 'synthetic', 'minifrance', 'gid' or 'folder', got 'imagenet'" in result.output


def test_label_ratio_outside_range_from_the_cli(workdir):
    result = CliRunner().invoke(app, ["--workdir", str(workdir.root), "data", "info", "synthetic", "--set", "label_ratio=1.5"])
    assert result.exit_code == 2
    assert "error: --set label_ratio: label_ratio: input should be less than or equal to 1, got 1.5" in result.output


def test_label_without_image_and_folder_without_table(workdir, tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    write_tif(root / "masks" / "zzz.tif", np.ones((64, 64), dtype=np.uint8))
    with pytest.raises(DataError, match=r"masks/zzz.tif has no image with stem 'zzz'"):
        registry.scenes(DataSpec(dataset="folder", root=root), workdir)
    (root / "classes.yaml").unlink()
    with pytest.raises(DataError, match=r"own/classes.yaml: class table not found"):
        registry.scenes(DataSpec(dataset="folder", root=root), workdir)
