"""Sweeps end to end on a real local Ray cluster and a real MLflow SQLite store (tiny everything)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from rsseg import tracking
from rsseg.runspec import load_sweep
from rsseg.sweep.driver import run_sweep
from rsseg.workdir import Workdir

pytestmark = pytest.mark.slow

# The smoke profile, shrunk further for the test suite (same code paths, smaller numbers).
SHRINK = [
    "base.data.synthetic.scenes=3", "base.data.synthetic.size=256", "base.data.synthetic.unlabeled_scenes=1",
    "base.data.synthetic.archive_scenes=1", "base.pretrain.iterations.total=20", "base.pretrain.runtime.checkpoint_every=10",
    "base.ddpm.optim.warmup_iterations=5", "base.finetune.iterations=6", "base.finetune.eval_every=3",
    "base.finetune.val_max_tiles=8", "base.finetune.log_predictions=1",
]
TINY_BASE = """
base:
  method: ddpm
  data: {tile_size: 32, synthetic: {scenes: 3, size: 128, unlabeled_scenes: 1, archive_scenes: 1}}
  ddpm: {unet: {preset: tiny}, features: {weights: random, timesteps: [0, 50]}}
  finetune: {iterations: 6, eval_every: 3, batch_size: 4, eval_batch_size: 16, log_predictions: 0, threads: 1}
"""

RAY_INTERNAL = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "trial_id", "done", "pid",
                "iterations_since_restore", "time_since_restore", "date", "hostname", "node_ip", "config"}


def children(uri: str, experiment: str, parent_id: str | None = None):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = "tags.kind = 'finetune'" + (f" and tags.sweep_parent = '{parent_id}'" if parent_id else "")
    return c.search_runs([exp.experiment_id], filter_string=flt, max_results=1000)


def parents(uri: str, experiment: str):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string="tags.kind = 'sweep'") if exp else []


@pytest.fixture(scope="module")
def noise_ablation(tmp_path_factory, ray_cluster):
    wd = Workdir.resolve(tmp_path_factory.mktemp("noise")).ensure()
    loaded = load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "smoke", SHRINK + ["space.seed={grid: [0]}"])
    result = run_sweep(loaded, wd, progress=False)
    return wd, loaded, result


def test_noise_ablation_smoke_end_to_end(noise_ablation):
    wd, loaded, result = noise_ablation
    uri = tracking.resolve_uri(None, wd)
    ps = parents(uri, "noise_ablation")
    assert len(ps) == 1 and ps[0].info.status == "FINISHED" and ps[0].info.run_id == result.parent_run_id
    kids = children(uri, "noise_ablation", result.parent_run_id)
    assert len(kids) == 6 and all(k.info.status == "FINISHED" for k in kids)
    assert {k.data.tags["timesteps"] for k in kids} == {"0", "50", "100", "100,50", "200,100,50", "150,100,50"}
    for k in kids:
        m, t = k.data.metrics, k.data.tags
        assert 0 <= m["test/mIoU"] <= 1 and any(key.startswith("test/IoU/") for key in m)
        assert t["sweep"] == "noise_ablation" and t["table"] == "table2" and t["method"] == "ddpm"
        assert t["label_ratio"] == "0.02" and t["frozen"] == "true" and t["profile"] == "smoke" and t["dataset"] == "synthetic"
        assert t["git_commit"] and t["mlflow.parentRunId"] == result.parent_run_id
        assert not (set(m) & RAY_INTERNAL), set(m) & RAY_INTERNAL
    # one pre-training serves every trial
    fps = {k.data.tags["pretrain_fingerprint"] for k in kids}
    assert len(fps) == 1
    c = tracking.client(uri)
    pre = c.search_runs([c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT).experiment_id])
    assert [r.data.tags["pretrain_fingerprint"] for r in pre] == list(fps)


def test_mlflow_ui_shows_the_runs(noise_ablation):
    wd, loaded, result = noise_ablation
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "platform"), "--workdir", str(wd.root), "ui", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    assert r.status == 200 and r.read().strip() == b"OK"
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(f"MLflow UI did not come up: {proc.stdout.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}")
                time.sleep(1)
        exp_id = tracking.client(tracking.resolve_uri(None, wd)).get_experiment_by_name("noise_ablation").experiment_id
        body = json.dumps({"experiment_ids": [exp_id], "filter": f"tags.sweep_parent = '{result.parent_run_id}'", "max_results": 100}).encode()
        req = urllib.request.Request(base + "/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.loads(r.read())["runs"]
        assert len(runs) == 6 and all(run["info"]["status"] == "FINISHED" for run in runs)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _sweep_file(tmp_path: Path, name: str, space: str, search: str, base: str = TINY_BASE) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\ntable: test\n{base}\nspace:\n{space}\nsearch: {search}\n")
    return p


def test_failing_trial_is_failed_with_reason_retried_and_the_rest_completes(tmp_path, ray_cluster):
    wd = Workdir.resolve(tmp_path / "w").ensure()
    f = _sweep_file(tmp_path, "nan", "  finetune.lr: {grid: [1.0e-3, 1.0e+30]}",
                    "{algorithm: grid, max_concurrent: 2, trial_retries: 1, resources: {cpu: 1}}")
    result = run_sweep(load_sweep(f), wd, progress=False)
    kids = children(tracking.resolve_uri(None, wd), "nan", result.parent_run_id)
    assert len(kids) == 2
    by_lr = {k.data.params["finetune.lr"]: k for k in kids}
    bad, good = by_lr["1e+30"], by_lr["0.001"]
    assert good.info.status == "FINISHED"
    assert bad.info.status == "FAILED" and "NonFiniteLoss: fine-tuning loss is" in bad.data.tags["error"]
    assert bad.data.tags["attempt"] == "2"  # retried once (trial_retries: 1), same MLflow run
    assert result.finished == 1 and result.failed == 1


def test_optuna_with_max_concurrent_2_never_runs_more_than_2(tmp_path, ray_cluster):
    wd = Workdir.resolve(tmp_path / "w").ensure()
    f = _sweep_file(tmp_path, "opt", "  finetune.lr: {loguniform: [1.0e-4, 1.0e-2]}\n  finetune.batch_size: {choice: [2, 4]}",
                    "{algorithm: optuna, num_samples: 4, sampler_seed: 3, max_concurrent: 2, resources: {cpu: 0.5}}")
    result = run_sweep(load_sweep(f), wd, progress=False)
    kids = children(tracking.resolve_uri(None, wd), "opt", result.parent_run_id)
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)
    assert len({k.data.params["finetune.lr"] for k in kids}) == 4
    assert {k.data.params["finetune.batch_size"] for k in kids} <= {"2", "4"}
    events = sorted([(k.info.start_time, 1) for k in kids] + [(k.info.end_time, -1) for k in kids])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2  # CPU would allow 4 (0.5 CPU each on 2 CPUs)


def test_kill_driver_then_resume(tmp_path):
    """SIGKILL the driver mid-sweep; --resume finishes it: no duplicate, none RUNNING, the
    finished trials are not re-run and the interrupted one continues from its checkpoint."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the driver subprocesses start their own local clusters
    wd = tmp_path / "w"
    f = _sweep_file(tmp_path, "killme", "  ddpm.features.timesteps: {grid: [[0], [50], [100]]}",
                    "{algorithm: grid, max_concurrent: 1, resources: {cpu: 1}}",
                    base=TINY_BASE.replace("iterations: 6, eval_every: 3", "iterations: 60, eval_every: 10"))
    cli = [str(Path(sys.executable).parent / "platform"), "--workdir", str(wd), "sweep", str(f)]
    env = dict(os.environ, RSSEG_RAY_LOGS="0")
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    uri = tracking.resolve_uri(None, Workdir.resolve(wd))
    deadline = time.time() + 240
    finished = []
    try:
        while time.time() < deadline:
            time.sleep(1)
            # touch MLflow only once the driver has initialised the store (state.json comes after)
            kids = children(uri, "killme") if (wd / "sweeps" / "killme" / "state.json").exists() else []
            finished = [k for k in kids if k.info.status == "FINISHED"]
            running = [k for k in kids if k.info.status == "RUNNING" and "val/mIoU" in k.data.metrics]
            if finished and running:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        else:
            raise AssertionError("sweep never reached one finished + one checkpointed running trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {k.info.run_id: k for k in children(uri, "killme")}
    done_before = {k.info.run_id: k.info.end_time for k in before.values() if k.info.status == "FINISHED"}
    assert any(k.info.status == "RUNNING" for k in before.values())
    time.sleep(3)
    out = subprocess.run(cli + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = children(uri, "killme")
    assert len(after) == 3 and len({k.data.tags["trial_id"] for k in after}) == 3  # no duplicate
    assert all(k.info.status == "FINISHED" for k in after)  # none left RUNNING
    for run_id, end in done_before.items():  # finished trials were not re-run
        run = next(k for k in after if k.info.run_id == run_id)
        assert run.info.end_time == end and run.data.tags["attempt"] == "1"
    continued = [k for k in after if k.info.run_id in before and before[k.info.run_id].info.status == "RUNNING"]
    assert continued and int(continued[0].data.tags["resumed_from_iteration"]) >= 10
    ps = parents(uri, "killme")
    assert len(ps) == 1 and ps[0].info.status == "FINISHED"


def test_multi_node_trials_land_on_both_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        ray.init(address=cluster.address)
        wd = Workdir.resolve(tmp_path / "w").ensure()
        f = _sweep_file(tmp_path, "multi", "  seed: {grid: [0, 1]}", "{algorithm: grid, max_concurrent: 2, resources: {cpu: 1}}")
        result = run_sweep(load_sweep(f), wd, progress=False)
        kids = children(tracking.resolve_uri(None, wd), "multi", result.parent_run_id)
        assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
        assert {k.data.tags["node_id"] for k in kids} == {n.node_id for n in nodes}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_tables_from_the_noise_ablation_sweep(noise_ablation, tmp_path):
    """`make demo` then `make tables`: Table 2 fills from the sweep's runs, the rest are skeletons."""
    from rsseg.tables.build import build_all

    wd, _, _ = noise_ablation
    report = build_all(tracking.resolve_uri(None, wd), tmp_path / "tables")
    t2 = report.built["table2"]
    assert t2.n_runs == 6 and t2.group == {"profile": "smoke", "dataset": "synthetic"}
    for key in ("0", "50", "100", "100,50", "200,100,50", "150,100,50"):
        cell = t2.cell(key, "mIoU")
        assert cell.n == 1 and 0 <= cell.mean <= 100
    md = (tmp_path / "tables" / "table2.md").read_text()
    assert "| t = [150, 100, 50] (paper) | 58.1 |" in md and "**Synthetic data**" in md
    assert report.built["table3"].n_runs == 0 and (tmp_path / "tables" / "table3.md").exists()


def test_label_ratio_smoke_with_baselines_fills_table3(tmp_path, ray_cluster):
    """The label-ratio sweep's smoke profile with every installed baseline (shrunk: 2 % labels,
    one seed): each method frozen and fine-tuned, trainable parameters logged, Table 3 filled."""
    from rsseg.tables.build import build_all

    wd = Workdir.resolve(tmp_path / "w").ensure()
    shrink = [s for s in SHRINK if "finetune.val_max_tiles" not in s] + [
        "space.seed={grid: [0]}", "base.mae.optim.warmup_iterations=5", "base.scalemae.optim.warmup_iterations=5",
        "base.finetune.upernet.channels=16"]
    # (a dotted space key cannot be --set: shrink the label-ratio axis in a copy of the file)
    text = (REPO / "sweeps" / "label_ratio.yaml").read_text()
    assert "data.label_ratio: {grid: [0.02, 0.4, 1.0]}" in text
    f = tmp_path / "label_ratio.yaml"
    f.write_text(text.replace("data.label_ratio: {grid: [0.02, 0.4, 1.0]}", "data.label_ratio: {grid: [0.02]}"))
    loaded = load_sweep(f, str(REPO / "sweeps" / "profiles" / "smoke.yaml"), shrink)
    result = run_sweep(loaded, wd, progress=False)
    uri = tracking.resolve_uri(None, wd)
    kids = children(uri, "label_ratio", result.parent_run_id)
    assert len(kids) == 8 and all(k.info.status == "FINISHED" for k in kids), [(k.data.tags.get("method"), k.data.tags.get("error")) for k in kids]
    params = {(k.data.tags["method"], k.data.tags["frozen"]): k.data.metrics["params/trainable"] for k in kids}
    for m in ("convnext_random", "mae", "scalemae", "ddpm"):
        assert params[(m, "true")] < params[(m, "false")], m  # fine-tuning trains the encoder too
    assert {k.data.tags["head"] for k in kids if k.data.tags["method"] == "mae"} == {"mlp", "upernet"}
    report = build_all(uri, tmp_path / "tables")
    t3 = report.built["table3"]
    for m in ("convnext_random", "mae", "scalemae", "ddpm"):
        for setting in ("frozen", "finetuned"):
            assert t3.cell(f"{m}/{setting}", "0.02").n == 1, (m, setting)
            assert t3.cell(f"{m}/{setting}", "ft_params_M").n == 1
    md = (tmp_path / "tables" / "table3.md").read_text()
    assert "| MAE · Frozen |" in md and "| 34.1 |" in md  # ours beside the paper's 34.1
