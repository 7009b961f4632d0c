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
    assert "error: command line: dataset: unknown dataset 'imagenet'; expected one of folder, gid, minifrance, synthetic" in result.output


def test_label_ratio_outside_range_from_the_cli(workdir):
    result = CliRunner().invoke(app, ["--workdir", str(workdir.root), "data", "info", "synthetic", "--set", "label_ratio=1.5"])
    assert result.exit_code == 2
    assert "error: --set label_ratio: label_ratio: label ratio 1.5 is outside (0, 1]; use e.g. 0.02 (S), 0.4 (M) or 1.0 (L)" in result.output


def test_label_without_image_and_folder_without_table(workdir, tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    write_tif(root / "masks" / "zzz.tif", np.ones((64, 64), dtype=np.uint8))
    with pytest.raises(DataError, match=r"masks/zzz.tif has no image with stem 'zzz'"):
        registry.scenes(DataSpec(dataset="folder", root=root), workdir)
    (root / "classes.yaml").unlink()
    with pytest.raises(DataError, match=r"own/classes.yaml: class table not found"):
        registry.scenes(DataSpec(dataset="folder", root=root), workdir)


# -- pixels, checked when the index is built (issue: NaN, wrong range, truncated body, float masks) --

def _own(tmp_path, image: np.ndarray, dtype: str, mask: np.ndarray | None = None):
    root = write_folder_dataset(tmp_path / "own")
    write_tif(root / "images" / "a.tif", image, dtype=dtype)
    if mask is not None:
        write_tif(root / "masks" / "a.tif", mask, dtype=str(mask.dtype))
    for stem in ("b", "c"):  # only scene a matters here
        (root / "images" / f"{stem}.tif").unlink()
        (root / "masks" / f"{stem}.tif").unlink(missing_ok=True)
    return root


def test_nan_pixels_fail_at_index_build_naming_the_file(workdir, tmp_path):
    img = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    img[1, 40, 40] = np.nan
    root = _own(tmp_path, img, "float32")
    with pytest.raises(DataError, match=r"images/a.tif: 1 NaN/inf pixels in band 2 \(window row 32, col 32\); mark them as nodata") as e:
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)
    one_line(e)


def test_float_imagery_in_0_255_is_not_silently_clipped(workdir, tmp_path):
    img = np.random.default_rng(0).uniform(0, 255, (3, 64, 64)).astype(np.float32)
    root = _own(tmp_path, img, "float32")
    with pytest.raises(DataError, match=r"images/a.tif: 99\.\d % of sampled pixels lie outside the float32 default range \[0, 1\] "
                                        r"\(sampled values 0.* \.\. 25\d.*\); set data.value_range .* e.g. \[0, 255\]"):
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)
    # the fix the message names works, and an explicit range is checked too
    tiles.build(DataSpec(dataset="folder", root=root, tile_size=32, value_range=(0, 255)), workdir)
    with pytest.raises(DataError, match=r"outside data.value_range \[0, 100\]"):
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32, value_range=(0, 100)), workdir)


def test_12_bit_data_in_uint16_asks_for_its_range(workdir, tmp_path):
    img = np.random.default_rng(0).integers(0, 4096, (3, 64, 64)).astype(np.uint16)
    root = _own(tmp_path, img, "uint16")
    with pytest.raises(DataError, match=r"images/a.tif: uint16 values reach only 409\d \(12-bit data\?\).*set data.value_range: \[0, 4095\]"):
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)
    index = tiles.build(DataSpec(dataset="folder", root=root, tile_size=32, value_range=(0, 4095)), workdir)
    assert len(index.frame) == 4


def test_truncated_tiff_body_fails_at_index_build_naming_the_file(workdir, tmp_path):
    img = np.random.default_rng(0).integers(1, 255, (3, 256, 256)).astype(np.uint8)
    root = _own(tmp_path, img, "uint8", mask=np.ones((256, 256), dtype=np.uint8))
    path = root / "images" / "a.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is intact, the strips at the end are gone
    with pytest.raises(DataError, match=r"images/a.tif: (cannot read pixels at window row \d+, col \d+ \(.*\); the file may be "
                                        r"truncated or corrupt|not a readable GeoTIFF)") as e:
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)
    one_line(e)


def test_a_read_error_during_training_names_the_file(tmp_path):
    from rsseg.data.dataset import TileReader
    from rsseg.data.scenes import Scene

    img = np.random.default_rng(0).integers(1, 255, (3, 256, 256)).astype(np.uint8)
    path = write_tif(tmp_path / "x.tif", img)
    reader = TileReader([Scene(id="x", image=path, label=None)], named_table("paper12"))
    reader.read_image(0, 0, 0, 32)  # opened while whole
    path.write_bytes(path.read_bytes()[:4096])  # then truncated under the open handle's feet
    reader.close()
    with pytest.raises(DataError, match=r"x.tif: (cannot read pixels at window row 224, col 224|not a readable GeoTIFF)"):
        reader.read_image(0, 224, 224, 32)


def test_float_mask_with_a_non_integer_value_is_refused(workdir, tmp_path):
    img = np.random.default_rng(0).integers(1, 255, (3, 64, 64)).astype(np.uint8)
    mask = np.ones((64, 64), dtype=np.float32)
    mask[3, 3] = 1.5
    root = _own(tmp_path, img, "uint8", mask=mask)
    with pytest.raises(DataError, match=r"masks/a.tif: label value 1.5 \(1 pixels\) is not a whole class code \(float label raster\)"):
        tiles.build(DataSpec(dataset="folder", root=root, tile_size=32), workdir)


def test_data_info_reports_bad_pixels_as_one_line(workdir, tmp_path):
    img = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    img[0, 5, 5] = np.inf
    root = _own(tmp_path, img, "float32")
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "data", "info", "folder", "--root", str(root), "--tile-size", "32"])
    assert out.exit_code == 2 and out.output.strip().splitlines() == [
        f"error: {root}/images/a.tif: 1 NaN/inf pixels in band 1 (window row 0, col 0); mark them as nodata (or mask them) so that they are left out"]
    img[0, 5, 5] = 0.5
    write_tif(root / "images" / "a.tif", img, dtype="float32")
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "data", "info", "folder", "--root", str(root), "--tile-size", "32"])
    assert out.exit_code == 0 and "pixels       sampled windows of every image finite and within the dtype's range" in out.output


def test_images_of_different_band_counts_or_missing_bands_are_one_line_before_any_pixel(workdir, tmp_path):
    """3/4/3/1 bands passed `data info` and --dry-run, and the sweep failed 86 s in naming no file;
    data.bands naming a band an image lacks said "the file may be truncated or corrupt"."""
    root = write_folder_dataset(tmp_path / "own")
    cli = ["--workdir", str(workdir.root), "data", "info", "folder", "--root", str(root), "--tile-size", "32"]
    assert CliRunner().invoke(app, cli).exit_code == 0  # the control: three 3-band images
    write_tif(root / "images" / "d.tif", np.ones((4, 64, 64)))
    out = CliRunner().invoke(app, cli)
    assert out.exit_code == 2 and out.output.strip().splitlines() == [
        f"error: {root}/images/d.tif: has 4 band(s) but {root}/images/a.tif has 3; every image of a dataset needs the same "
        "bands (or set data.bands to read the same ones from each, e.g. data.bands: [1, 2, 3])"]
    assert CliRunner().invoke(app, cli + ["--set", "bands=[3,2,1]"]).exit_code == 0  # the same 3 bands from each
    out = CliRunner().invoke(app, cli + ["--set", "bands=[5,2,1]"])
    assert out.exit_code == 2 and out.output.strip().splitlines() == [
        f"error: {root}/images/a.tif: has 3 bands, but data.bands asks for band 5"]


CLASS_TABLE_ERRORS = [
    ("name: t\nclasses:\n  - {code: one, name: a}\n", r"t.yaml:3: classes\[0\].code: expected an integer label code, got 'one'"),
    ("name: t\nclasses:\n  - code: 1\n    name: a\n    color: red\n",
     r"t.yaml:5: classes\[0\].color: expected \[r, g, b\] with integers 0-255, got 'red'"),
    ("name: t\nignore: [zero]\nclasses:\n  - {code: 1, name: a}\n", r"t.yaml:2: ignore\[0\]: expected an integer label code, got 'zero'"),
    ("just a string\n", r"t.yaml:1: expected a mapping with name, kind, ignore, classes; got str 'just a string'"),
    ("name: t\nclasses:\n  - {code: 1, name: a}\n  - {code: 2, name: b}\n  - {code: 1, name: c}\n",
     r"t.yaml:5: classes\[2\].code: code 1 is already class 'a' \(classes\[0\]\); each must be unique"),
    ("name: t\nignore: [1]\nclasses:\n  - {code: 1, name: a}\n", r"t.yaml:2: ignore\[0\]: 1 is also class 'a'"),
    ("name: t\nclasses: [\n", r"t.yaml:\d+: invalid YAML in class table"),
    ("", r"t.yaml: the class table is empty"),
]


@pytest.mark.parametrize("text,pattern", CLASS_TABLE_ERRORS, ids=["code", "color", "ignore", "scalar", "duplicate", "ignored-class",
                                                                 "yaml", "empty"])
def test_class_table_value_errors_name_file_line_and_key(tmp_path, text, pattern):
    from rsseg.data.classes import load_table_yaml

    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(DataError, match=pattern) as e:
        load_table_yaml(p)
    one_line(e)


def test_class_table_not_utf8(tmp_path):
    from rsseg.data.classes import load_table_yaml

    p = tmp_path / "t.yaml"
    p.write_bytes("name: forêt\nclasses:\n  - {code: 1, name: a}\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"t.yaml: not UTF-8 text \(byte 9\); save the class table as UTF-8"):
        load_table_yaml(p)
