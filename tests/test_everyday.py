"""Everyday use, as a demanding new user tries it: the CLI and its files, own data through the
folder dataset, profiles. Each test is one defect that was reproduced on a fresh clone."""

import logging
import os
import stat
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import REPO
from rasters import write_folder_dataset, write_tif
from rsseg.cli import app
from rsseg.config.specs import DataSpec
from rsseg.errors import ConfigError, DataError
from rsseg.runspec import load_run, load_sweep

runner = CliRunner()


def one_error_line(out) -> str:
    lines = out.output.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.output
    return lines[0]


# -- CLI and files ---------------------------------------------------------------------------------

def test_a_workdir_that_is_a_file_or_unwritable_is_one_line_exit_2(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    line = one_error_line(runner.invoke(app, ["--workdir", str(f), "data", "info", "synthetic"]))
    assert line == f"error: --workdir {f}: is a file; expected a directory (or a path to create one)"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "not writable" in one_error_line(runner.invoke(app, ["--workdir", str(ro / "w"), "data", "info", "synthetic"]))


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_atomic_files_honour_the_umask(tmp_path, mask):
    from rsseg.atomic import atomic_write_text

    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "t.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t.md").stat().st_mode) == 0o666 & ~mask  # 0644 / 0664, not mkstemp's 0600


def test_ui_with_a_port_out_of_range_is_one_line_exit_2(tmp_path):
    assert one_error_line(runner.invoke(app, ["--workdir", str(tmp_path / "w"), "ui", "--port", "99999"])) == \
        "error: --port 99999: expected a port number from 1 to 65535"


def test_non_utf8_yaml_is_one_line(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_bytes(b"name: r\ndata: {dataset: synthetic}  # \xe9t\xe9\n")
    with pytest.raises(ConfigError, match=r"run.yaml: not UTF-8 text \(byte 38 is 0xe9\); save the file as UTF-8"):
        load_run(p)
    assert "not UTF-8" in one_error_line(runner.invoke(app, ["--workdir", str(tmp_path / "w"), "config", "show", str(p)]))


def test_an_empty_yaml_warns_that_it_means_the_paper_scale_run(tmp_path, caplog):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    with caplog.at_level(logging.WARNING, logger="rsseg.config"):
        loaded = load_run(p)
    assert loaded.spec.pretrain.iterations.n_total == 200_000
    assert f"warning: {p} is empty: every setting takes its default (paper scale: 200 000 pre-training iterations)" in caplog.text


def test_sweep_set_accepts_run_keys_and_places_them_under_base():
    loaded = load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "smoke", ["finetune.iterations=1", "search.max_concurrent=1"])
    assert loaded.base.finetune.iterations == 1 and loaded.spec.search.max_concurrent == 1


def test_a_dry_run_writes_nothing(tmp_path):
    wd = tmp_path / "w"
    out = runner.invoke(app, ["--workdir", str(wd), "sweep", str(REPO / "sweeps" / "noise_ablation.yaml"), "--profile", "smoke", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "pre-trainings needed: 1" in out.output
    assert not wd.exists()  # no checkpoints/, sweeps/, store or data


def test_tables_with_an_unknown_profile_lists_the_profiles(tmp_path):
    line = one_error_line(runner.invoke(app, ["--workdir", str(tmp_path / "w"), "tables", "--profile", "smok", "--out", str(tmp_path / "t")]))
    assert line.startswith("error: --profile 'smok': profile 'smok' not found") and line.endswith("did you mean 'smoke'? (profiles: paper, small, smoke)")
    assert not (tmp_path / "t").exists()


def test_profiles_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # smoke extends small: found beside it, not under the current directory
    loaded = load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "smoke")
    assert loaded.base.data.dataset == "synthetic" and loaded.base.ddpm.unet.preset == "tiny"


# -- own data ----------------------------------------------------------------------------------------

def _own_sweep(tmp_path: Path, root: Path, extra: str = "") -> Path:
    p = tmp_path / "own.yaml"
    p.write_text("name: own\nbase:\n  method: ddpm\n  data: {dataset: folder, root: " + str(root) + ", tile_size: 32" + extra + "}\n"
                 "  ddpm: {unet: {preset: tiny}}\nspace: {seed: {grid: [0]}}\n")
    return p


def test_small_keeps_the_users_data_and_smoke_swaps_in_the_built_in_data(tmp_path):
    root = write_folder_dataset(tmp_path / "own")
    p = _own_sweep(tmp_path, root)
    small = load_sweep(p, "small")
    assert small.base.data.dataset == "folder" and small.base.data.root == root
    assert small.base.ddpm.unet.preset == "tiny" and small.base.pretrain.iterations.n_total < 10_000
    smoke = load_sweep(p, "smoke")
    assert smoke.base.data.dataset == "synthetic" and smoke.base.data.root is None
    out = runner.invoke(app, ["sweep", "--help"])
    assert "small" in out.output and "smoke" in out.output and "synthetic" in out.output


def test_no_archive_imagery_is_found_at_plan_time_with_the_exact_override(tmp_path, workdir):
    from rsseg.sweep.plan import make_plan

    root = write_folder_dataset(tmp_path / "own")
    p = _own_sweep(tmp_path, root)
    plan = make_plan(load_sweep(p, "small"), workdir)
    assert any("archive iterations but there is no archive imagery" in q and "--set pretrain.iterations.homogeneous_ratio=1.0" in q
               for q in plan.problems), plan.problems
    out = runner.invoke(app, ["--workdir", str(workdir.root), "sweep", str(p), "--profile", "small", "--dry-run"])
    assert "--set pretrain.iterations.homogeneous_ratio=1.0" in out.output
    fixed = make_plan(load_sweep(p, "small", ["pretrain.iterations.homogeneous_ratio=1.0"]), workdir)
    assert not fixed.problems


def test_a_pretraining_already_in_the_store_needs_no_archive_imagery(tmp_path, workdir):
    """The archive folder is read only by a pre-training still to do: once its checkpoint is in the
    store (trained on another machine, or before the folder moved), the sweep plans without it."""
    from rsseg.checkpoints import store
    from rsseg.sweep.plan import make_plan

    root = write_folder_dataset(tmp_path / "own")
    loaded = load_sweep(_own_sweep(tmp_path, root), "small")
    before = make_plan(loaded, workdir)
    assert any("no archive imagery" in q for q in before.problems)  # negative control: still to train, so it is needed
    store.finalize(store.StoreDir.for_run(before.pretrainings[0].spec, workdir), {"model": {}, "ema": None, "objective": {}, "step": 1}, None)
    after = make_plan(loaded, workdir)
    assert after.pretrainings[0].cached and after.problems == []


def test_a_spec_naming_another_class_table_than_the_datasets_own_is_an_error(tmp_path, workdir):
    from rsseg.data import registry

    root = write_folder_dataset(tmp_path / "own")
    with pytest.raises(DataError, match=r"data.class_table: 'paper12' is given, but .*own/classes.yaml defines this dataset's classes"):
        registry.scenes(DataSpec(dataset="folder", root=root, class_table="paper12"), workdir)
    # naming the dataset's own file is fine
    assert registry.scenes(DataSpec(dataset="folder", root=root, class_table="classes.yaml"), workdir).table.name == "own3"


def _many_scenes(root: Path, n: int = 8, size: int = 64) -> Path:
    root = write_folder_dataset(root)
    rng = np.random.default_rng(1)
    for i in range(n):
        write_tif(root / "images" / f"s{i}.tif", rng.integers(1, 255, (3, size, size)))
        mask = np.full((size, size), 1 + i % 3, dtype=np.uint8)
        write_tif(root / "masks" / f"s{i}.tif", mask)
    return root


def test_split_by_scene_keeps_every_image_in_one_split_and_subsets_nested(tmp_path, workdir):
    from rsseg.data import tiles

    root = _many_scenes(tmp_path / "own")
    by_tile = tiles.build(DataSpec(dataset="folder", root=root, tile_size=16, split_by="tile"), workdir)
    mixed = by_tile.frame.filter(by_tile.frame["role"] == "labelled").group_by("scene").agg(n=pl.col("split").n_unique())
    assert mixed["n"].max() > 1  # the paper's random split: neighbouring tiles of one image in train and test
    index = tiles.build(DataSpec(dataset="folder", root=root, tile_size=16, split_by="scene"), workdir)
    f = index.frame.filter(index.frame["role"] == "labelled")
    per_scene = f.group_by("scene").agg(n=pl.col("split").n_unique())
    assert per_scene["n"].max() == 1 and set(f["split"].unique()) == {"train", "val", "test"}
    small, large = set(index.subset(0.1)["tile_id"]), set(index.subset(0.5)["tile_id"])
    assert small and small <= large <= set(index.split("train")["tile_id"])  # nested label-ratio subsets


def test_data_info_lists_scenes_histograms_and_warns_about_classes_missing_from_a_subset(tmp_path, workdir):
    root = _many_scenes(tmp_path / "own")
    out = runner.invoke(app, ["--workdir", str(workdir.root), "data", "info", "folder", "--root", str(root), "--tile-size", "16"])
    assert out.exit_code == 0, out.output
    for scene in ("s0", "s7", "a", "b", "c"):
        assert f"  {scene} " in out.output
    assert "class histogram (labelled pixels, % per split and label-ratio subset)" in out.output
    assert "subset S" in out.output and "subset L" in out.output
    assert "warning: label-ratio subset S" in out.output and "has no pixel of class" in out.output


def test_tables_of_a_non_paper_dataset_follow_its_classes_not_minifrance(tmp_path):
    from mlflow.tracking import MlflowClient

    from rsseg.tables.build import build_all

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("noise_ablation")
    r = c.create_run(exp, tags={"kind": "finetune", "table": "table2", "timesteps": "150,100,50", "profile": "small",
                                "dataset": "folder", "classes": "Bld,Rd,Veg", "seed": "0", "trial_key": "k", "method": "ddpm"})
    for k, v in {"test/mIoU": 0.5, "test/IoU/Bld": 0.6, "test/IoU/Rd": 0.4, "test/IoU/Veg": 0.5}.items():
        c.log_metric(r.info.run_id, k, v)
    c.set_terminated(r.info.run_id, "FINISHED")
    build_all(uri, tmp_path / "t")
    md = (tmp_path / "t" / "table2.md").read_text()
    assert "MiniFrance" not in md.split("\n")[0]  # the title follows the dataset
    assert "Bld" in md and "Veg" in md and "For." not in md  # the dataset's own class columns, not the paper's 12
    assert "(paper)" not in md and "Δ" not in md  # the paper's MiniFrance numbers only beside MiniFrance runs


def test_ui_on_a_taken_port_is_one_line_exit_2(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_error_line(runner.invoke(app, ["--workdir", str(tmp_path / "w"), "ui", "--port", str(port)]))
    assert line == f"error: --port {port}: 127.0.0.1:{port} is not free (Address already in use); choose another --port"


@pytest.mark.parametrize("command", [["tables", "--out", "t"], ["predict", "best:noise_ablation", "scene.tif", "--out", "o"], ["ui", "--port", "5999"]])
def test_a_damaged_mlflow_store_is_one_line_not_a_traceback(command, tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "mlflow.db").write_text("garbage: not a database")
    out = CliRunner().invoke(app, ["--workdir", str(wd), *command])
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert out.output.startswith(f"error: MLflow store {wd / 'mlflow.db'}: not a SQLite database (a damaged or foreign file); move it aside")


def test_an_address_where_no_ray_cluster_answers_is_one_line(monkeypatch):
    import ray

    from rsseg import raycluster
    from rsseg.errors import ConfigError

    def refuse(address=None, **kwargs):
        raise ConnectionError(f"ray client connection timeout\nretrying {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match=r"^--address ray://127.0.0.1:10999: no Ray cluster answers there \(ray client connection "
                                          r"timeout\); start one \(`ray start --head`\) or fix --address / RAY_ADDRESS$"):
        raycluster.init("ray://127.0.0.1:10999")


def test_ui_with_a_thousand_workers_is_refused_in_one_line(tmp_path):
    import os

    out = CliRunner().invoke(app, ["--workdir", str(tmp_path), "ui", "--workers", "1000"])
    cap = max(4, 2 * (os.cpu_count() or 1))
    assert out.exit_code == 2 and out.output == f"error: --workers 1000: at most {cap} on this machine ({os.cpu_count()} CPUs); the UI needs 1-2\n"


def test_a_tracking_uri_given_as_a_path_names_the_store_file_or_its_folder(tmp_path, monkeypatch):
    from rsseg import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(str(tmp_path / "x" / "store.db")) == f"sqlite:///{tmp_path / 'x' / 'store.db'}"
    assert tracking.resolve_uri(str(tmp_path / "x")) == f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}"
    existing = tmp_path / "my-store"
    existing.write_bytes(b"")
    assert tracking.resolve_uri(str(existing)) == f"sqlite:///{existing}"


def test_an_axis_is_set_by_its_kind_on_the_command_line():
    """`--set space.seed.grid=[0]` said "input should be a valid dictionary or instance of Axis, got
    list" (the axis key keeps its dots, so `seed.grid` was read as an axis name)."""
    loaded = load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "smoke",
                        ["space.seed.grid=[0]", "space.ddpm.features.timesteps.grid=[[100]]"])
    assert loaded.spec.space["seed"].grid == [0] and loaded.spec.space["ddpm.features.timesteps"].grid == [[100]]
    whole = load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "smoke", ["space.seed={grid: [0]}"])
    assert whole.spec.space["seed"].grid == [0]
    with pytest.raises(ConfigError, match=r"space.seed: expected an axis such as \{grid: \[...\]\} \(one of grid, cases, choice, uniform, loguniform, int\), got list \[0\]"):
        load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "smoke", ["space.seed=[0]"])


def test_a_relative_data_root_is_made_absolute_where_the_spec_is_read(tmp_path, monkeypatch):
    """Ray workers run in another directory: `root: my-data` reached them as a relative path and
    the pre-training failed with "my-data/classes.yaml: class table not found"."""
    monkeypatch.chdir(tmp_path)
    loaded = load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "small", ["base.data.root=my-data", "base.data.dataset=folder"])
    assert loaded.base.data.root == tmp_path / "my-data"


def test_progress_in_a_log_is_one_line_per_stream_per_interval_and_state_changes_always(capsys, monkeypatch):
    """The demo's log had ~360 progress lines. Not a terminal: a stream's lines within the interval
    are held (the latest printed by done()), a final line always prints, streams are apart."""
    from rsseg import progress

    monkeypatch.setenv("RSSEG_PROGRESS_SECONDS", "3600")
    progress.done()  # nothing held from an earlier test
    capsys.readouterr()
    for step in range(1, 6):
        progress.line(f"pretrain ab12 step {step}/10")
    progress.line("trials: 0 done, 1 running", "trials", final=True)
    progress.line("trials: 0 done, 1 running | best 1.0", "trials")
    progress.line("pretrain ab12 step 10/10", final=True)
    assert capsys.readouterr().out.splitlines() == [
        "pretrain ab12 step 1/10", "trials: 0 done, 1 running", "pretrain ab12 step 10/10"]
    progress.done()
    assert capsys.readouterr().out.splitlines() == ["trials: 0 done, 1 running | best 1.0"]
    monkeypatch.setenv("RSSEG_PROGRESS_SECONDS", "0")  # every line, as before the throttle
    progress.line("pretrain ab12 step 1/10")
    progress.line("pretrain ab12 step 2/10")
    assert capsys.readouterr().out.splitlines() == ["pretrain ab12 step 1/10", "pretrain ab12 step 2/10"]


def test_a_missing_dataset_root_stops_a_sweep_whose_pretraining_is_in_the_store(tmp_path, workdir):
    """The dataset is read by every trial: its root missing is a plan problem even when the
    pre-training, which the root's absence no longer concerns, is already in the store."""
    from rsseg.checkpoints import store
    from rsseg.sweep.plan import make_plan

    root = write_folder_dataset(tmp_path / "own")
    loaded = load_sweep(_own_sweep(tmp_path, root), "small")
    store.finalize(store.StoreDir.for_run(make_plan(loaded, workdir).pretrainings[0].spec, workdir),
                   {"model": {}, "ema": None, "objective": {}, "step": 1}, None)
    gone = tmp_path / "moved"
    root.rename(gone)
    plan = make_plan(loaded, workdir)
    assert plan.pretrainings[0].cached
    assert [q for q in plan.problems if q.startswith("data.root:")] == [f"data.root: {root} is not a directory (the folder dataset; "
                                                                         "set RSSEG_DATA or --set data.root=DIR)"]
