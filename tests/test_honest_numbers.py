"""Trustworthy numbers (fast): splits that say how far test sits from training, profiles that say
what they changed, reference classifiers on exactly a run's split and labels, reference rows in
Table 3 counted once per (label ratio, seed)."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import REPO, small_synthetic, tiny_run
from rasters import write_folder_dataset, write_tif
from rsseg.cli import app
from rsseg.config.specs import DataSpec
from rsseg.data import tiles
from rsseg.runspec import load_sweep

runner = CliRunner()


def _folder(root: Path, labelled: int) -> Path:
    """write_folder_dataset's scenes a, b (labelled) and c, plus labelled scenes up to ``labelled``."""
    write_folder_dataset(root)
    rng = np.random.default_rng(5)
    for i in range(labelled - 2):
        write_tif(root / "images" / f"s{i}.tif", rng.integers(1, 255, (3, 64, 64)))
        write_tif(root / "masks" / f"s{i}.tif", np.full((64, 64), 1 + i % 3, dtype=np.uint8))
    return root


def test_a_folder_of_3_labelled_scenes_splits_by_scene_by_default_and_2_by_tile(tmp_path, workdir):
    three = tiles.build(DataSpec(dataset="folder", root=_folder(tmp_path / "three", 3), tile_size=16), workdir)
    assert three.params.split_by == "scene"
    labelled = three.frame.filter(pl.col("role") == "labelled")
    assert labelled.group_by("scene").agg(n=pl.col("split").n_unique())["n"].max() == 1
    two = tiles.build(DataSpec(dataset="folder", root=_folder(tmp_path / "two", 2), tile_size=16), workdir)
    assert two.params.split_by == "tile"
    # asked for explicitly, a split holds whatever the scene count
    forced = tiles.build(DataSpec(dataset="folder", root=tmp_path / "three", tile_size=16, split_by="tile"), workdir)
    assert forced.params.split_by == "tile" and forced.key != three.key


def test_auto_is_tile_for_the_papers_datasets_and_keeps_their_keys(workdir):
    spec = small_synthetic()
    assert spec.split_by == "auto"
    assert spec.identity() == small_synthetic(split_by="tile").identity() and "split_by" not in spec.identity()
    index = tiles.build(spec, workdir)
    assert index.params.split_by == "tile" and "split_by" not in index.params.key()
    # a folder dataset's identity says auto (its split depends on its scenes)
    assert DataSpec(dataset="folder", root="/x").identity()["split_by"] == "auto"


def _frame(rows):
    return pl.DataFrame([dict(scene=s, row=r, col=c, size=16) for s, r, c in rows])


def test_touching_counts_tiles_sharing_an_edge_or_corner_in_the_same_scene():
    train = _frame([("x", 0, 0), ("x", 0, 16)])
    test = _frame([("x", 0, 32),    # shares an edge with (0, 16)
                   ("x", 16, 32),   # shares a corner with (0, 16)
                   ("x", 32, 32),   # two tiles away: no
                   ("y", 0, 32),    # another scene: no
                   ("x", 8, 8)])    # overlaps (a stride below the tile size)
    assert tiles.touching(test, train) == 3
    assert tiles.touching(test, train.head(0)) == 0
    assert tiles.touching(_frame([("x", 48, 48)]), train) == 0  # negative control


def test_leakage_brute_force_on_a_tile_split_and_zero_on_a_scene_split(tmp_path, workdir):
    root = _folder(tmp_path / "own", 6)
    by_tile = tiles.build(DataSpec(dataset="folder", root=root, tile_size=16, split_by="tile"), workdir)
    test, train = by_tile.split("test"), by_tile.split("train")
    brute = sum(any(a["scene"] == b["scene"] and abs(a["row"] - b["row"]) <= 16 and abs(a["col"] - b["col"]) <= 16
                    for b in train.iter_rows(named=True)) for a in test.iter_rows(named=True))
    leak = by_tile.leakage(0.1)
    assert leak == {"test": test.height, "touch_train": brute,
                    "touch_labelled": tiles.touching(test, by_tile.subset(0.1))}
    assert 0 < leak["touch_labelled"] <= leak["touch_train"] < leak["test"]
    by_scene = tiles.build(DataSpec(dataset="folder", root=root, tile_size=16), workdir)
    assert by_scene.params.split_by == "scene" and by_scene.leakage(0.1)["touch_train"] == 0


def test_data_info_says_the_leakage_follows_the_split_in_its_advice_and_names_an_absent_class(tmp_path, workdir):
    root = _folder(tmp_path / "own", 6)
    text = (root / "classes.yaml").read_text() + "  - {code: 4, name: barren, abbr: Bar, color: [200, 200, 0]}\n"
    (root / "classes.yaml").write_text(text)
    base = ["--workdir", str(workdir.root), "data", "info", "folder", "--root", str(root), "--tile-size", "16"]
    out = runner.invoke(app, base + ["--set", "data.split_by=tile"])
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if ln.startswith("leakage"))
    assert "split by tile" in line and "test tiles touching a training tile: " in line and " of " in line
    assert "warning: class Bar of class table own3 has no labelled pixel in any split: mIoU leaves it out" in out.output
    assert "split_by: tile helps" not in out.output  # the split already is by tile
    scene = runner.invoke(app, base)
    assert scene.exit_code == 0, scene.output
    assert "splits       split by scene" in scene.output and "(split by scene)" in scene.output


def test_small_keeps_the_recipe_smoke_changes_it_and_both_print_what_they_changed(tmp_path):
    small = load_sweep(REPO / "sweeps" / "feature_selection.yaml", "small").document.profile_changes
    assert "profile small changes base.ddpm.unet.preset: sr3 -> tiny" in small
    assert "profile small changes base.data.tile_size: 256 -> 64" in small
    assert not [c for c in small if ".schedule" in c or ".features.maps" in c or ".finetune.mlp" in c], small
    base = load_sweep(REPO / "sweeps" / "feature_selection.yaml", "small").base
    assert base.ddpm.schedule.preset == "ddpm_cd" and base.ddpm.features.maps == [-1] and base.finetune.mlp.fuse_hidden == 1024
    smoke = load_sweep(REPO / "sweeps" / "feature_selection.yaml", "smoke").document.profile_changes
    assert "profile smoke changes base.ddpm.schedule: {preset: ddpm_cd} -> {}" in smoke
    assert "profile smoke changes base.ddpm.features.maps: [-1] -> null" in smoke
    # a user's own spelling of the iterations, replaced as a whole: one line with both
    own = tmp_path / "own.yaml"
    own.write_text("name: own\ntable: table2\nbase:\n  method: ddpm\n  pretrain: {iterations: {homogeneous: 3000}}\n  ddpm: {optim: {warmup_iterations: 10}}\n"
                   "  finetune: {iterations: 300}\nspace:\n  seed: {grid: [0]}\n")
    lines = load_sweep(own, "small").document.profile_changes
    assert "profile small changes base.pretrain.iterations: {homogeneous: 3000} -> {homogeneous_ratio: 0.5, total: 1200}" in lines
    assert "profile small changes base.finetune.iterations: 300 -> 60" in lines
    assert load_sweep(own).document.profile_changes == []  # negative control: no profile, nothing changed
    out = runner.invoke(app, ["--workdir", str(tmp_path / "w"), "sweep", str(own), "--profile", "small", "--dry-run"])
    assert "profile small changes base.finetune.iterations: 300 -> 60" in out.output


def test_reference_classifiers_score_the_runs_own_split_and_labels(workdir):
    from rsseg import finetune
    from rsseg.data.dataset import TileDataset
    from rsseg.data.pixel_baselines import texture_baseline

    run = tiny_run(ddpm={"features": {"weights": "random", "timesteps": [0]}},
                   finetune={"iterations": 2, "eval_every": 2, "references": ["colour", "texture"]})
    seen = {}
    original = finetune.prepare
    finetune.prepare = lambda *a, **k: seen.setdefault("p", original(*a, **k))
    try:
        result = finetune.run(run, workdir)
    finally:
        finetune.prepare = original
    assert set(result.references) == {"colour", "texture"}
    p = seen["p"]
    direct = texture_baseline(TileDataset(p.reader, p.index.subset(run.data.label_ratio)), p.test, p.table.num_classes, seed=run.seed)
    assert result.references["texture"].miou == pytest.approx(direct.metrics.miou)
    assert result.reference_metrics() == {"reference/colour/mIoU": result.references["colour"].miou,
                                          "reference/texture/mIoU": result.references["texture"].miou}
    none = finetune.run(run.model_copy(update={"finetune": run.finetune.model_copy(update={"references": []})}), workdir)
    assert none.references == {} and none.reference_metrics() == {}


def test_the_random_weights_unet_follows_the_runs_seed():
    from rsseg.methods.ddpm.encoder import build_encoder

    a, b = (build_encoder(tiny_run(seed=s, ddpm={"features": {"weights": "random", "noise": "fixed"}}), None) for s in (0, 1))
    same = build_encoder(tiny_run(seed=0, pretrain={"seed": 7}, ddpm={"features": {"weights": "random", "noise": "fixed"}}), None)
    wa, wb, ws = (next(iter(e.unet.state_dict().values())) for e in (a, b, same))
    assert not torch_equal(wa, wb) and torch_equal(wa, ws)
    assert a.freeze().cache_id != b.freeze().cache_id == b.cache_id  # the cached features follow the seed too


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_table3_reference_rows_count_each_label_ratio_and_seed_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from rsseg.tables.build import build_all

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("label_ratio")
    base = {"kind": "finetune", "table": "table3", "profile": "small", "dataset": "folder", "label_ratio": "0.02",
            "frozen": "true", "git_commit": "abc", "classes": "Bld,Rd,Tr", "split_by": "scene", "test_touching_train": "0/40"}
    for i, (method, weights, seed, miou, texture) in enumerate([
            ("ddpm", "ema", "0", 0.50, 0.40), ("mae", "", "0", 0.45, 0.40), ("ddpm", "random", "0", 0.30, 0.40),
            ("ddpm", "ema", "1", 0.54, 0.44), ("mae", "", "1", 0.47, 0.44),
            ("convnext_random", "random", "0", 0.37, 0.40)]):  # a random-init baseline, tagged weights=random too
        r = c.create_run(exp, tags={**base, "method": method, "weights": weights, "seed": seed, "trial_key": f"k{i}"})
        for k, v in {"test/mIoU": miou, "reference/texture/mIoU": texture, "reference/colour/mIoU": 0.2}.items():
            c.log_metric(r.info.run_id, k, v)
        c.set_terminated(r.info.run_id, "FINISHED")
    t3 = build_all(uri, tmp_path / "tables").built["table3"]
    texture = t3.cell("reference/texture", "0.02")
    assert (texture.n, texture.mean) == (2, pytest.approx(42.0))  # seeds 0 and 1, each once (not 5 runs)
    assert t3.cell("reference/colour", "0.02").n == 2
    assert t3.cell("ddpm_random/frozen", "0.02").mean == pytest.approx(30.0)
    assert t3.cell("ddpm/frozen", "0.02").n == 2  # the random-weights run is not ours
    assert t3.cell("convnext_random/frozen", "0.02").mean == pytest.approx(37.0)  # its own method row, not a reference
    assert not [r for r, _ in t3.rows if r.startswith("convnext_random_random")]
    md = (tmp_path / "tables" / "table3.md").read_text()
    assert "| reference: Texture classifier (colour + local statistics per pixel) | 42.0 ± 2.8 |" in md
    assert "| reference: the same UNet, random weights · Frozen | 30.0 |" in md
    assert "If the texture row beats the method, the pre-training did not pay off on this data." in md
    assert "Split by scene: every image wholly in train, val or test." in md


def test_the_footer_says_the_seeds_do_not_cover_a_shared_pre_training():
    from rsseg.tables.build import variation_lines

    shared = pl.DataFrame({"pretrain_fingerprint": ["8339e6c2541edd84"] * 3, "seed": ["0", "1", "2"]})
    (line,) = variation_lines(shared)
    assert line.startswith("What varies: the seeds vary the segmentor only; every run reads one pre-training (8339e6c2)")
    assert variation_lines(shared.with_columns(pretrain_fingerprint=pl.Series(["a", "b", "c"]))) == []  # one per seed
    assert variation_lines(shared.head(1)) == []  # one run: no ± to explain


PIN = """
import sys, torch
from rsseg import kernels
from rsseg.errors import ConfigError
if sys.argv[1] == "late":
    torch.ones(64).sum()  # a CPU kernel runs first: the path is chosen
try:
    kernels.pin("avx2")
except ConfigError as exc:
    print("refused:", exc)
print("capability", torch.backends.cpu.get_cpu_capability())
"""


def _pin_in_fresh_process(when: str) -> str:
    import os
    import subprocess
    import sys

    from rsseg.kernels import VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}  # this session pins them (conftest)
    return subprocess.run([sys.executable, "-c", PIN, when], capture_output=True, text=True, env=env, check=True).stdout


def test_cpu_kernels_avx2_pins_the_process_before_its_first_computation_and_refuses_after():
    import platform
    import subprocess
    import sys

    native = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=True).stdout.strip()
    if platform.machine() != "x86_64" or native not in ("AVX2", "AVX512"):
        pytest.skip(f"no AVX2 kernels on this {platform.machine()} CPU ({native})")
    assert _pin_in_fresh_process("early").strip() == "capability AVX2"
    late = _pin_in_fresh_process("late")
    if native == "AVX512":  # the CPU's own path ran first: refused in one line naming the variables
        assert "refused: runtime.cpu_kernels: avx2: this process already computes with AVX512 kernels" in late
        assert "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2" in late
    else:  # negative control on an AVX2 CPU: its own path is the pinned one
        assert "refused" not in late


def test_smoke_pins_the_kernels_and_small_leaves_them_native():
    assert load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "smoke").base.runtime.cpu_kernels == "avx2"
    assert load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "small").base.runtime.cpu_kernels == "native"
