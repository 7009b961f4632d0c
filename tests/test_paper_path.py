"""The paper's code path on a CPU: the paper profile end to end on MiniFrance-format data (sr3
shrunk, iterations shrunk), imported DDPM-CD weights as frozen features in a sweep, and a
two-node Ray Train pre-training that loses a node and gets it back."""

import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, RGB_BYTE, tiny_run, two_node_cluster
from rasters import write_minifrance
from rsseg import tracking
from rsseg.runspec import load_sweep
from rsseg.sweep.driver import run_sweep
from rsseg.workdir import Workdir

pytestmark = pytest.mark.slow

SHRINK_SR3 = ("base.ddpm.unet.overrides={block_out_channels: [32, 32, 64, 64, 64]}",)


def one_trial_copy(tmp_path: Path, sweep: str, grid_line: str, replacement: str) -> Path:
    text = (REPO / "sweeps" / f"{sweep}.yaml").read_text()
    assert grid_line in text
    f = tmp_path / f"{sweep}.yaml"
    f.write_text(text.replace(grid_line, replacement))
    return f


def children(uri: str, experiment: str):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string="tags.kind = 'finetune'") if exp else []


def test_noise_ablation_under_the_paper_profile_runs_end_to_end_on_minifrance_format_data(tmp_path, monkeypatch, ray_cluster):
    data, archive = tmp_path / "data", tmp_path / "archive"
    write_minifrance(data / "minifrance", labelled=2, unlabeled=1, size=256)
    archive.mkdir()
    (archive / "landsat.tif").write_bytes(RGB_BYTE.read_bytes())  # any folder of GeoTIFFs is archive imagery
    monkeypatch.setenv("RSSEG_DATA", str(data))
    monkeypatch.setenv("RSSEG_ARCHIVE", str(archive))
    f = one_trial_copy(tmp_path, "noise_ablation", "  seed: {grid: [0, 1, 2]}", "  seed: {grid: [0]}")
    f.write_text(f.read_text().replace("[[0], [50], [100], [100, 50], [200, 100, 50], [150, 100, 50]]", "[[150, 100, 50]]"))
    overrides = [
        "base.runtime.device=cpu", "search.resources.gpu=0", "search.resources.cpu=1", "search.max_concurrent=1",
        "base.pretrain.runtime.gpus_per_worker=0", "base.pretrain.iterations.archive=3", "base.pretrain.iterations.homogeneous=3",
        "base.pretrain.batch_size=2", "base.pretrain.runtime.checkpoint_every=3", "base.pretrain.runtime.samples=1",
        "base.pretrain.runtime.sample_steps=2", "base.ddpm.optim.warmup_iterations=2", "base.data.tile_size=64",
        "base.finetune.iterations=2", "base.finetune.eval_every=2", "base.finetune.batch_size=2", "base.finetune.eval_batch_size=8",
        "base.finetune.val_max_tiles=4", "base.finetune.cache.budget_gb=1", "base.finetune.log_predictions=0", *SHRINK_SR3,
    ]
    loaded = load_sweep(f, "paper", overrides)
    assert loaded.base.ddpm.unet.preset == "sr3" and loaded.base.ddpm.schedule.train_steps == 2000
    assert loaded.base.finetune.mlp.fuse_hidden == 1024 and loaded.base.ddpm.features.maps == [-1]
    wd = Workdir.resolve(tmp_path / "w").ensure()
    result = run_sweep(loaded, wd, progress=False)
    assert result.finished == 1, result.trials
    uri = tracking.resolve_uri(None, wd)
    (kid,) = children(uri, "noise_ablation")
    t = kid.data.tags
    assert kid.info.status == "FINISHED" and t["profile"] == "paper" and t["dataset"] == "minifrance" and t["device"] == "cpu"
    assert t["unet"] == "sr3" and t["sqrt_abar"] == "150=0.9724,100=0.9876,50=0.9969"
    assert {"test/mIoU", "perf/iterations_per_s", "perf/extraction_tiles_per_s"} <= set(kid.data.metrics)
    assert (wd.root / "models" / kid.info.run_id / "model.json").exists()
    c = tracking.client(uri)
    (pre,) = c.search_runs([c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT).experiment_id])
    assert pre.info.status == "FINISHED" and pre.data.tags["device"] == "cpu"


def test_imported_ddpm_cd_weights_run_as_frozen_features_in_a_smoke_sized_sweep(tmp_path, ray_cluster):
    """No pre-training at all: the sweep's features come straight from the imported checkpoint."""
    from sr3_reference import SR3UNet, randomise

    from rsseg.weights import import_weights

    wd = Workdir.resolve(tmp_path / "w").ensure()
    gen = tmp_path / "I1000_E1_gen.pth"
    state = {f"denoise_fn.{k}": v for k, v in randomise(SR3UNet()).state_dict().items()}
    state["betas"] = torch.linspace(1e-6, 1e-2, 2000)
    torch.save(state, gen)
    import_weights(gen, "ddpm-cd", "ddpm_cd_test", wd)
    sweep = tmp_path / "imported.yaml"
    sweep.write_text("""name: imported
table: table2
base:
  method: ddpm
  data: {tile_size: 64, synthetic: {scenes: 3, size: 128, unlabeled_scenes: 1, archive_scenes: 1}}
  ddpm:
    unet: {preset: sr3, overrides: {block_out_channels: [32, 64, 64, 64, 64]}}
    schedule: {preset: ddpm_cd}
    features: {weights: ddpm_cd_test, maps: [-1]}
  finetune: {iterations: 4, eval_every: 2, batch_size: 4, eval_batch_size: 16, log_predictions: 0, threads: 1, mlp: {fuse_hidden: 64}}
space:
  ddpm.features.timesteps: {grid: [[50], [150, 100, 50]]}
search: {algorithm: grid, max_concurrent: 2, resources: {cpu: 1}}
""")
    result = run_sweep(load_sweep(sweep), wd, progress=False)
    assert result.finished == 2
    kids = children(tracking.resolve_uri(None, wd), "imported")
    assert {k.data.tags["weights"] for k in kids} == {"ddpm_cd_test"} and "pretrain_fingerprint" not in kids[0].data.tags
    c = tracking.client(tracking.resolve_uri(None, wd))
    assert c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT) is None  # nothing was pre-trained


def test_two_node_ddp_pretraining_survives_losing_a_node(tmp_path, tracking_server):
    """Workers on both nodes (0-CPU head, two 1-CPU nodes); a node removed mid-run and added back:
    the run finishes FINISHED, redoing at most one checkpoint interval."""
    from rsseg.checkpoints import store
    from rsseg.pretrain import launch

    with two_node_cluster() as (cluster, nodes):
        wd = Workdir.resolve(tmp_path / "w").ensure()
        every = 4
        run = tiny_run(pretrain={"iterations": {"archive": 40, "homogeneous": 40},
                                 "runtime": {"workers": 2, "checkpoint_every": every, "log_every": 1, "max_failures": 3,
                                             "controller_failure_limit": 10, "samples": 1, "sample_steps": 2}})
        outcome = {}
        trainer = threading.Thread(target=lambda: outcome.setdefault("result", launch.train(run, wd, tracking_uri=tracking_server)),
                                   daemon=True)
        trainer.start()
        progress = store.StoreDir.for_run(run, wd).progress
        deadline = time.time() + 300
        while time.time() < deadline and not (progress.exists() and '"step": 2' in progress.read_text() or _step(progress) >= 20):
            time.sleep(0.2)
        assert _step(progress) >= 1, "the pre-training never started"
        cluster.remove_node(nodes[1])  # a worker's node dies
        time.sleep(3)
        cluster.add_node(num_cpus=1)  # ... and comes back
        trainer.join(timeout=600)
        assert not trainer.is_alive() and "result" in outcome, "the pre-training did not end, or raised"
        c = tracking.client(tracking_server)
        (mlrun,) = c.search_runs([c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT).experiment_id])
        assert mlrun.info.status == "FINISHED"
        result = outcome["result"]  # the finished checkpoint of this spec, at the last step, from this run
        assert (result.fingerprint, result.mlflow_run_id) == (run.pretrain_fingerprint, mlrun.info.run_id)
        assert result.load()["step"] == 80
        workers = dict(kv.split("=") for kv in mlrun.data.tags["worker_nodes"].split(","))
        assert set(workers) == {"rank0", "rank1"} and len(set(workers.values())) == 2  # one worker per node
        starts = c.get_metric_history(mlrun.info.run_id, "train/group_start")
        redone = c.get_metric_history(mlrun.info.run_id, "train/steps_redone")
        assert len(starts) >= 2, "the worker group was never restarted"
        assert max(m.value for m in redone) <= every  # at most one checkpoint interval trained twice
        assert outcome["result"].load()["step"] == 80


def _step(progress: Path) -> int:
    import json

    try:
        return int(json.loads(progress.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0
