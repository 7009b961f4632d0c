"""Segmentors out and whole scenes out: the saved model of a fine-tuning run, sliding-window
prediction of real GeoTIFFs into georeferenced class maps, evaluation on labelled scenes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from conftest import RGB_BYTE, tiny_run
from rasters import write_tif
from rsseg import runner, tracking
from rsseg.cli import app
from rsseg.errors import CheckpointError, DataError
from rsseg.models import load_model
from rsseg.predict import SceneReader, blend_weight, predict_scene, reference_blend, slide, window_starts
from rsseg.workdir import Workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fine-tuned model (random-weight DDPM features, t = 0, 64 px tiles): no Ray needed."""
    wd = Workdir.resolve(tmp_path_factory.mktemp("predict")).ensure()
    run = tiny_run(data={"tile_size": 64}, ddpm={"features": {"weights": "random", "timesteps": [0]}},
                   finetune={"iterations": 4, "eval_every": 2, "log_predictions": 0})
    result, tracker = runner.execute(run, wd, profile="test")
    return wd, run, result, tracker


def test_every_finetuning_run_saves_its_model_and_mlflow_has_it(trained):
    wd, run, result, tracker = trained
    local = wd.root / "models" / tracker.run_id
    meta = json.loads((local / "model.json").read_text())
    assert meta["tile_size"] == 64 and meta["num_classes"] == 7 and meta["in_channels"] == 3
    assert meta["classes"]["abbrs"] == result.class_abbrs and len(meta["classes"]["colors"]) == 7
    assert meta["encoder"] == {"kind": "none", "finetuned": False} and meta["run"]["ddpm"]["features"]["timesteps"] == [0]
    assert meta["git_commit"] and meta["test"]["mIoU"] == pytest.approx(result.test.miou)
    c = tracking.client(tracker.uri)
    assert set(tracking.list_artifacts(tracker.uri, tracker.run_id, "model")) == {"model/model.json", "model/model.pt"}
    out = CliRunner().invoke(app, ["--workdir", str(wd.root), "models", "list"])
    assert out.exit_code == 0 and f"runs:/{tracker.run_id}" in out.output and "test mIoU" in out.output


def test_model_from_mlflow_alone_equals_the_local_copy(trained, tmp_path):
    wd, _, _, tracker = trained
    local = load_model(f"runs:/{tracker.run_id}", wd)
    moved = wd.root / "models" / f"{tracker.run_id}.away"
    shutil.move(wd.root / "models" / tracker.run_id, moved)  # only MLflow's artifact is left
    try:
        remote = load_model(f"runs:/{tracker.run_id}", wd)
    finally:
        shutil.move(moved, wd.root / "models" / tracker.run_id)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    import torch

    assert torch.equal(local.logits(torch.from_numpy(x), ["a", "b"]), remote.logits(torch.from_numpy(x), ["a", "b"]))


def test_prediction_of_a_real_landsat_scene_is_georeferenced_with_nodata_and_colours(trained, tmp_path):
    wd, _, _, tracker = trained
    model = load_model(f"runs:/{tracker.run_id}", wd)
    r = predict_scene(model, RGB_BYTE, tmp_path / "out", probabilities=True)
    with rasterio.open(r.classes) as out, rasterio.open(RGB_BYTE) as src:
        assert out.crs == src.crs and out.transform == src.transform and (out.height, out.width) == (src.height, src.width)
        assert out.count == 1 and out.dtypes[0] == "uint8" and out.nodata == 255
        classes = out.read(1)
        invalid = src.dataset_mask() == 0
        assert invalid.any() and (classes[invalid] == 255).all() and (classes[~invalid] < 7).all()
        cmap = out.colormap(1)
        assert cmap[0][:3] == tuple(model.meta["classes"]["colors"][0]) and cmap[6][:3] == tuple(model.meta["classes"]["colors"][6])
        assert out.tags(1)["class_0"] == model.meta["classes"]["names"][0]
        tags = out.tags()
        assert tags["rsseg_model"] == model.source and tags["rsseg_source"].endswith(".tif") and tags["rsseg_git_commit"]
        assert tags["rsseg_model_git_commit"] == model.meta["git_commit"] and tags["rsseg_version"]
        assert out.profile["tiled"] and out.compression.name == "deflate" and out.overviews(1)  # COG layout
    with rasterio.open(r.probabilities) as p:
        assert p.count == 7 and p.crs == src.crs
        probs = p.read()[:, ~invalid].astype(int)
        assert (abs(probs.sum(axis=0) - 255) <= 7).all()  # uint8 probabilities sum to ~255
    assert (tmp_path / "out" / "RGB.byte_classes.qml").read_text().count("paletteEntry") == 7
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_stitched_prediction_equals_a_brute_force_blend_of_the_same_windows(trained, tmp_path):
    wd, _, _, tracker = trained
    model = load_model(f"runs:/{tracker.run_id}", wd)
    with rasterio.open(RGB_BYTE) as src:
        crop = src.read(window=rasterio.windows.Window(100, 120, 300, 170))
    scene = write_tif(tmp_path / "crop.tif", crop)
    reader = SceneReader(scene, None, None, 3)
    ref, ref_valid = reference_blend(model, reader, overlap=16)
    got = np.full_like(ref, np.nan)
    strips = []

    def on_strip(row, col, logits, valid):
        strips.append((row, col))
        got[:, row:row + logits.shape[1], col:col + logits.shape[2]] = logits

    import rsseg.predict as predict

    old = predict.BAND_WINDOWS
    predict.BAND_WINDOWS = 2  # several column bands: windows straddling them are computed twice
    try:
        slide(model, reader, on_strip, overlap=16, batch_size=3)
    finally:
        predict.BAND_WINDOWS = old
    assert not np.isnan(got).any() and len({c for _, c in strips}) > 1
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_window_grid_and_weights():
    assert window_starts(100, 64, 48) == [0, 36] and window_starts(40, 64, 48) == [0] and window_starts(64, 64, 48) == [0]
    assert window_starts(200, 64, 48) == [0, 48, 96, 136]
    w = blend_weight(8, 2)
    assert w.shape == (8, 8) and w.min() > 0 and w[3:5, 3:5].tolist() == [[1, 1], [1, 1]] and w[0, 0] == pytest.approx(1 / 16)


def test_a_scene_smaller_than_a_tile_is_padded(trained, tmp_path, capfd):
    wd, _, _, tracker = trained
    model = load_model(f"runs:/{tracker.run_id}", wd)
    small = write_tif(tmp_path / "small.tif", np.random.default_rng(1).integers(1, 255, (3, 40, 50)))
    capfd.readouterr()
    r = predict_scene(model, small, tmp_path / "out")
    with rasterio.open(r.classes) as out:
        assert (out.height, out.width) == (40, 50) and (out.read(1) < 7).all()
        assert out.colormap(1)[0][:3] == tuple(model.meta["classes"]["colors"][0])
    assert "ERROR" not in capfd.readouterr().err  # GDAL printed "ERROR 1: TIFFSetField ..." for every map


def test_bad_input_is_one_line_each(trained, tmp_path):
    wd, _, _, tracker = trained
    model = load_model(f"runs:/{tracker.run_id}", wd)
    four = write_tif(tmp_path / "four.tif", np.ones((4, 64, 64)))
    with pytest.raises(DataError, match=r"four.tif: has 4 band\(s\), the model was trained on 3"):
        predict_scene(model, four, tmp_path / "o")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00not a tiff")
    with pytest.raises(DataError, match=r"broken.tif: not a readable GeoTIFF/raster"):
        predict_scene(model, broken, tmp_path / "o")
    predict_scene(model, write_tif(tmp_path / "ok.tif", np.ones((3, 64, 64))), tmp_path / "o")
    with pytest.raises(DataError, match=r"ok_classes.tif: exists; refusing to overwrite it \(give --overwrite\)"):
        predict_scene(model, tmp_path / "ok.tif", tmp_path / "o")
    with pytest.raises(CheckpointError, match=r"runs:/0123456789abcdef: no run '0123456789abcdef' in sqlite:///"):
        load_model("runs:/0123456789abcdef", wd)
    res = CliRunner().invoke(app, ["--workdir", str(wd.root), "predict", "runs:/nosuchrun", str(RGB_BYTE), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and res.output.startswith("error: runs:/nosuchrun: no run 'nosuchrun'")
    run_ref = f"runs:/{tracker.run_id}"
    a_file = tmp_path / "ok.tif"
    res = CliRunner().invoke(app, ["--workdir", str(wd.root), "predict", run_ref, str(RGB_BYTE), "-o", str(a_file)])
    assert res.exit_code == 2 and res.output == f"error: --out {a_file}: a file; expected a directory for the class maps (it is created if missing)\n"
    res = CliRunner().invoke(app, ["--workdir", str(wd.root), "predict", run_ref, "dataset:abc", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and res.output.startswith("error: dataset:abc: expected dataset:N") and res.output.count("\n") == 1


def test_a_model_whose_encoder_weights_are_missing_names_the_fingerprint(trained, tmp_path):
    wd, _, _, tracker = trained
    model_dir = tmp_path / "m"
    shutil.copytree(wd.root / "models" / tracker.run_id, model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["run"]["ddpm"]["features"]["weights"] = "ema"
    meta["encoder"] = {"kind": "pretrained", "fingerprint": "feedfacecafebeef", "method": "ddpm", "finetuned": False}
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"encoder weights are missing from the store .* \(pre-training fingerprint feedfacecafebeef\)"):
        load_model(str(model_dir), wd)
    meta["run"]["ddpm"]["features"]["weights"] = "released_unet"
    meta["encoder"] = {"kind": "imported", "name": "released_unet", "fingerprint": "import-x", "finetuned": False}
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"imported weights 'released_unet' \(import-x\)"):
        load_model(str(model_dir), wd)


def test_evaluate_scores_whole_labelled_scenes_into_an_mlflow_run(trained):
    wd, run, result, tracker = trained
    out = CliRunner().invoke(app, ["--workdir", str(wd.root), "evaluate", f"runs:/{tracker.run_id}", "--data", "synthetic",
                                   "--set", "synthetic.scenes=3", "--set", "synthetic.size=128", "--set", "synthetic.unlabeled_scenes=1",
                                   "--set", "synthetic.archive_scenes=1"])
    assert out.exit_code == 0, out.output
    assert "over 3 scene(s)" in out.output and "per-class IoU" in out.output
    c = tracking.client(tracking.resolve_uri(None, wd))
    runs = c.search_runs([c.get_experiment_by_name("rsseg-evaluate").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and 0 <= runs[0].data.metrics["mIoU"] <= 1
    assert runs[0].data.tags["kind"] == "evaluate" and runs[0].data.tags["evaluated_dataset"] == "synthetic"


def test_best_is_chosen_on_validation_never_on_test(workdir):
    """``best:<experiment>``: the run with the highest validation mIoU, whatever its test mIoU."""
    from rsseg.models import best_run

    uri = tracking.resolve_uri(None, workdir)
    tracking.init_store(uri)
    ids = {}
    for name, val, test in (("test winner", 0.50, 0.90), ("validation winner", 0.80, 0.60), ("unfinished", 0.95, 0.95)):
        run = tracking.start_run(uri, "choose", name, tags={"kind": "finetune"}, workdir=workdir)
        run.log_metrics({"val/mIoU": val, "test/mIoU": test}, step=1)
        if name != "unfinished":
            run.end("FINISHED")
        ids[name] = run.run_id
    assert best_run("choose", workdir) == ids["validation winner"]
    with pytest.raises(CheckpointError, match=r"best:nothing: no MLflow experiment 'nothing'"):
        best_run("nothing", workdir)


def _scene(path: Path, data, gsd: float | None = 0.5, dtype="uint8", nodata=None) -> Path:
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    if gsd is None:
        return write_tif(path, data, dtype=dtype, nodata=nodata)
    return write_tif(path, data, crs=CRS.from_epsg(32631), transform=from_origin(500000.0, 5000000.0, gsd, gsd), dtype=dtype, nodata=nodata)


def test_other_imagery_is_read_with_bands_and_value_range_and_suspicious_input_is_warned(trained, tmp_path):
    """--bands / --value-range for imagery unlike the training data's, and one warning line for each
    legal but suspicious input: no CRS, 12-bit values in uint16, a value range the model was not
    trained on, an all-nodata scene, a ground sample distance far from the training data's; a
    scene like the training data gets none (the negative control)."""
    wd, _, _, tracker = trained
    model = load_model(f"runs:/{tracker.run_id}", wd)
    assert model.meta["input"] == {"dtype": "uint8", "value_range": [0.0, 255.0], "gsd": 0.5}
    rng = np.random.default_rng(0)
    byte = rng.integers(1, 255, (3, 64, 64))
    assert predict_scene(model, _scene(tmp_path / "like.tif", byte), tmp_path / "o").warnings == []
    notes = predict_scene(model, _scene(tmp_path / "plain.tif", byte, gsd=None), tmp_path / "o").warnings
    assert len(notes) == 1 and "plain.tif: no CRS" in notes[0]
    twelve = _scene(tmp_path / "l8.tif", rng.integers(1, 4095, (3, 64, 64)), dtype="uint16")
    notes = predict_scene(model, twelve, tmp_path / "o").warnings  # the model maps [0, 255]: 12-bit values clip
    assert len(notes) == 1 and "% of sampled pixels lie outside [0, 255]" in notes[0] and notes[0].endswith("--value-range 0,4095")
    assert predict_scene(model, twelve, tmp_path / "o", value_range=(0.0, 4095.0), overwrite=True).warnings == []
    import copy

    by_dtype = copy.copy(model)  # a model that maps its imagery by data type (no value_range of its own)
    by_dtype.meta = {**model.meta, "value_range": None}
    notes = predict_scene(by_dtype, twelve, tmp_path / "o", overwrite=True).warnings
    assert len(notes) == 2 and "uint16 values are mapped from [0, 65535], the model was trained on uint8 imagery mapped from [0, 255]" in notes[0]
    assert "uint16 values reach only 4094 (12-bit data?)" in notes[1] and notes[1].endswith("--value-range 0,4095")
    empty = _scene(tmp_path / "empty.tif", np.zeros((3, 64, 64)), nodata=0)
    notes = predict_scene(model, empty, tmp_path / "o").warnings
    assert notes == [f"{empty}: every pixel is nodata, so the class map is all nodata (255)"]
    notes = predict_scene(model, _scene(tmp_path / "landsat.tif", byte, gsd=30.0), tmp_path / "o").warnings
    assert notes == [f"{tmp_path / 'landsat.tif'}: ground sample distance 30 m, the model was trained on 0.5 m imagery "
                     "(60x coarser): objects appear at another scale than in training"]
    # four bands: --bands picks three; a wrong count or spelling is one line
    four = _scene(tmp_path / "four.tif", rng.integers(1, 255, (4, 64, 64)))
    cli = ["--workdir", str(wd.root), "predict", f"runs:/{tracker.run_id}", str(four), "-o", str(tmp_path / "b")]
    res = CliRunner().invoke(app, cli)
    assert res.exit_code == 2 and res.output.strip().endswith("(choose 3 of them with --bands, e.g. --bands 1,2,3)")
    res = CliRunner().invoke(app, cli + ["--bands", "4,3,2"])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "b" / "four_classes.tif") as out:
        assert (out.read(1) < 7).all()
    for bad, expected in ((["--bands", "4,3"], "error: --bands 4,3: 2 band(s), the model was trained on 3"),
                          (["--bands", "a,b,c"], "error: --bands a,b,c: expected 1-based band numbers, e.g. --bands 4,3,2"),
                          (["--bands", "5,3,2"], f"error: {four}: has 4 band(s), so bands [5, 3, 2] cannot be read (1-based, 1..4)"),
                          (["--value-range", "4095,0"], "error: --value-range 4095,0: expected two numbers LO,HI with LO < HI")):
        res = CliRunner().invoke(app, cli + ["--overwrite"] + bad)
        assert res.exit_code == 2 and res.output.startswith(expected) and res.output.count("\n") == 1, res.output


def test_two_scenes_of_the_same_name_get_two_maps(trained, tmp_path):
    from rsseg.predict import output_stems

    wd, _, _, tracker = trained
    a = _scene(tmp_path / "in" / "2019" / "scene.tif", np.full((3, 64, 64), 50))
    b = _scene(tmp_path / "in" / "2020" / "scene.tif", np.full((3, 64, 64), 200))
    assert output_stems([a, b]) == ["2019__scene", "2020__scene"] and output_stems([a]) == ["scene"]
    with pytest.raises(DataError, match=r"scene: given twice"):
        output_stems([a, a])
    res = CliRunner().invoke(app, ["--workdir", str(wd.root), "predict", f"runs:/{tracker.run_id}", str(a), str(b),
                                   "-o", str(tmp_path / "o"), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").glob("*.tif")) == ["2019__scene_classes.tif", "2020__scene_classes.tif"]
