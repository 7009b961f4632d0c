"""Sweeps end to end on a real local Ray cluster and a real MLflow SQLite store (tiny everything)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, two_node_cluster
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


def _get(url: str, body: dict | None = None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def test_mlflow_ui_shows_the_runs_of_a_copied_workdir(noise_ablation, tmp_path):
    """The UI, started on a *copy* of the work directory (the original moved away), shows the
    sweep as a model-training experiment with its description, each child run with test/mIoU
    and only its active config blocks as params, and serves the copy's own artifacts."""
    import shutil

    wd, loaded, result = noise_ablation
    from typer.testing import CliRunner

    from rsseg.cli import app

    published = CliRunner().invoke(app, ["--workdir", str(wd.root), "tables", "--out", str(tmp_path / "tables")])
    assert published.exit_code == 0 and "logged to MLflow: experiment 'noise_ablation', run 'tables'" in published.output, published.output
    copy = tmp_path / "copied-workdir"
    shutil.copytree(wd.root, copy, ignore=shutil.ignore_patterns("ray"))
    hidden = wd.root.with_name(wd.root.name + "-moved")
    wd.root.rename(hidden)  # nothing may be read from the original any more
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "platform"), "--workdir", str(copy), "ui", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            line = proc.stdout.readline().decode()
            if "MLflow UI:" in line or proc.poll() is not None or time.time() > deadline:
                break
        assert "MLflow UI:" in line and f"127.0.0.1:{port}" in line, line + (proc.stdout.read().decode()[-2000:] if proc.poll() is not None else "")
        # the URL is printed only once the server answers
        assert _get(base + "/health").strip() == b"OK"
        exp = json.loads(_get(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=noise_ablation"))["experiment"]
        tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert tags["mlflow.note.content"] == loaded.spec.description and loaded.spec.description
        runs = json.loads(_get(base + "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp["experiment_id"]], "filter": f"tags.sweep_parent = '{result.parent_run_id}'", "max_results": 100}))["runs"]
        assert len(runs) == 6 and all(run["info"]["status"] == "FINISHED" for run in runs)
        child = runs[0]
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        params = {p["key"] for p in child["data"]["params"]}
        assert 0 <= metrics["test/mIoU"] <= 1 and any(k.startswith("test/IoU/") for k in metrics)
        assert "mIoU" not in metrics  # test metrics live under test/ only
        assert len(params) <= 90 and not any(p.startswith(("convnext", "mae.", "data.gid.")) for p in params), len(params)
        run_id = child["info"]["run_id"]
        listed = json.loads(_get(base + f"/api/2.0/mlflow/artifacts/list?run_id={run_id}"))
        assert {"metrics.json", "config.yaml", "predictions.png"} <= {f["path"] for f in listed["files"]}
        served = json.loads(_get(base + f"/get-artifact?path=metrics.json&run_uuid={run_id}"))
        assert served["mIoU"] == pytest.approx(metrics["test/mIoU"])
        # the sweep's answer on its parent run, and the tables `platform tables` logged, linked from it
        parent = json.loads(_get(base + f"/api/2.0/mlflow/runs/get?run_id={result.parent_run_id}"))["run"]
        ptags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        listed = {f["path"] for f in json.loads(_get(base + f"/api/2.0/mlflow/artifacts/list?run_id={result.parent_run_id}"))["files"]}
        assert {"sweep_table.json", "sweep_chart.png"} <= listed
        table = json.loads(_get(base + f"/get-artifact?path=sweep_table.json&run_uuid={result.parent_run_id}"))
        assert table["columns"][:2] == ["ddpm.features.timesteps", "seed"] and len(table["data"]) == 6
        assert sum(row[table["columns"].index("best (val)")] for row in table["data"]) == 1
        tables_run = ptags["tables_run_id"]
        tables_files = {f["path"] for f in json.loads(_get(base + f"/api/2.0/mlflow/artifacts/list?run_id={tables_run}&path=tables"))["files"]}
        assert {"tables/table2.md", "tables/table2.csv", "tables/table2.tex"} <= tables_files
        # as a user sees it: the experiment's page in a real browser (the link `platform ui` prints)
        link = _experiment_link(proc, "noise_ablation")
        assert link.startswith(base) and "workflowType=machine_learning" in link
        text = _browser_text(link, "ui-noise_ablation-runs.png")
        # the model-training view's navigation, not GenAI's (both show the "GenAI | Model training" toggle)
        assert "Model registry" in text and "Playground" not in text and "Prompts" not in text
        assert "space.ddpm.features.timesteps" in text and "val/mIoU" in text and "test/mIoU" in text
        for run in runs:
            m = {x["key"]: x["value"] for x in run["data"]["metrics"]}
            assert run["info"]["run_name"] in text and str(m["val/mIoU"])[:6] in text, (run["info"]["run_name"], text[:3000])
        assert "timesteps=[150,100,50] seed=0" in text
        # SIGTERM to `platform ui` alone stops the server it started (mlflow, uvicorn, huey)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.time() + 30  # the server's sockets close as its processes end
        while time.time() < deadline:
            try:
                _get(base + "/health")
            except OSError:
                break
            time.sleep(0.2)
        with pytest.raises(OSError):
            _get(base + "/health")
    finally:
        leftover = _live_group_members(proc.pid) if proc.poll() is not None else ["platform ui itself"]
        if leftover:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        hidden.rename(wd.root)
    assert not leftover, f"processes of the MLflow server outlived `platform ui`: {leftover}"


ARTIFACTS = Path(os.environ.get("RSSEG_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _experiment_link(proc, name: str) -> str:
    """The experiment's URL from the lines `platform ui` prints after its first."""
    deadline = time.time() + 30
    while time.time() < deadline:
        text = proc.stdout.readline().decode()
        if text.split() and text.split()[0] == name:
            return text.split()[1]
    raise AssertionError(f"`platform ui` printed no link for {name}")


def _browser_text(url: str, screenshot: str) -> str:
    """The page's text after its scripts ran, in headless Chromium (Debian's, installed by .ci/run),
    and a screenshot kept under test-artifacts/."""
    import html
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000", "--virtual-time-budget=30000"]
    subprocess.run(flags + [f"--screenshot={ARTIFACTS / screenshot}", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def _live_group_members(pgid: int) -> list[str]:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:80])
        except (psutil.Error, ProcessLookupError):
            continue
    return out


def _sweep_file(tmp_path: Path, name: str, space: str, search: str, base: str = TINY_BASE) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\n{base}\nspace:\n{space}\nsearch: {search}\n")
    return p


def test_failing_trial_is_failed_with_reason_retried_and_the_rest_completes(tmp_path, ray_cluster):
    wd = Workdir.resolve(tmp_path / "w").ensure()
    f = _sweep_file(tmp_path, "nan", "  finetune.lr: {grid: [1.0e-3, 1.0e+30]}",
                    "{algorithm: grid, max_concurrent: 2, trial_retries: 1, resources: {cpu: 1}}")
    from typer.testing import CliRunner

    from rsseg.cli import app

    cli = CliRunner().invoke(app, ["--workdir", str(wd.root), "sweep", str(f)])
    # one trial failed: the command fails, saying how many and why (one line per distinct reason)
    assert cli.exit_code == 1, cli.output
    assert "1 finished, 1 failed, 2 trials" in cli.stdout
    assert re.search(r"^failed: 1 trial\(s\): NonFiniteLoss: fine-tuning loss is", cli.stderr, re.M), cli.stderr
    (parent,) = parents(tracking.resolve_uri(None, wd), "nan")
    kids = children(tracking.resolve_uri(None, wd), "nan", parent.info.run_id)
    assert len(kids) == 2
    by_lr = {k.data.params["finetune.lr"]: k for k in kids}
    bad, good = by_lr["1e+30"], by_lr["0.001"]
    assert good.info.status == "FINISHED"
    assert bad.info.status == "FAILED" and "NonFiniteLoss: fine-tuning loss is" in bad.data.tags["error"]
    assert bad.data.tags["attempt"] == "2"  # retried once (trial_retries: 1), same MLflow run
    assert parent.data.metrics["trials_finished"] == 1 and parent.data.metrics["trials_failed"] == 1


def test_another_tracking_uri_between_invocations_is_one_line_not_a_traceback(tmp_path, ray_cluster, caplog):
    """Re-running a sweep after switching stores used to end in RESOURCE_DOES_NOT_EXIST (the
    earlier invocation's runs were looked up in the new store); --resume into another store is
    refused in one line, before anything starts."""
    from rsseg.errors import SweepError

    wd = Workdir.resolve(tmp_path / "w").ensure()
    f = _sweep_file(tmp_path, "moved", "  seed: {grid: [0]}", "{algorithm: grid, resources: {cpu: 1}}")
    first = run_sweep(load_sweep(f), wd, progress=False)
    other = f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}"
    with caplog.at_level("WARNING", logger="rsseg.sweep.driver"):
        second = run_sweep(load_sweep(f), wd, tracking_uri=other, progress=False)
    assert first.finished == second.finished == 1 and second.uri == other
    assert f"its previous invocation tracked to {tracking.resolve_uri(None, wd)}, this one to {other}" in caplog.text
    assert [p.info.status for p in parents(tracking.resolve_uri(None, wd), "moved")] == ["FINISHED"]  # left as it was
    with pytest.raises(SweepError, match=r"^cannot resume sweep 'moved' with --tracking-uri sqlite:///.*/third.db: its runs are in "
                                         r"sqlite:///.*/team/mlflow.db; resume with that tracking URI"):
        run_sweep(load_sweep(f), wd, tracking_uri=f"sqlite:///{tmp_path / 'third.db'}", resume=True, progress=False)
    assert not (tmp_path / "third.db").exists()


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


KILL_POINTS = ("mid-training", "after-last-validation", "after-run-ended", "mid-test-evaluation")


def _leftover_processes(sessions: set[str]) -> list[int]:
    import psutil

    out = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and any(f.path.startswith(tuple(sessions)) for f in proc.open_files()):
                out.append(proc.pid)
        except psutil.Error:
            continue
    return out


def _drop_running_trial_from_tune_state(wd: Path) -> None:
    """Rewrite the newest Tune experiment state without its unfinished trials (the searcher's
    state, a separate file, still counts them as live)."""
    (state,) = [max(d.glob("experiment_state-*.json")) for d in (wd / "ray" / "sweeps").iterdir()]
    data = json.loads(state.read_text())
    kept = [t for t in data["trial_data"] if json.loads(t[0])["status"] == "TERMINATED"]
    assert len(kept) < len(data["trial_data"])
    state.write_text(json.dumps({**data, "trial_data": kept}))


def test_kill_driver_at_each_point_of_a_trial_then_resume(tmp_path):
    """SIGKILL the driver at each point of a trial's life (trial seed i is killed at point i:
    mid-training, after its last validation, after its run ended FINISHED, mid-test-evaluation);
    --resume after each kill finishes the sweep: no duplicate, none RUNNING, the trial whose run
    had ended is not re-run, and nothing of the killed drivers' local clusters is left running.

    After the first kill, Tune's stored experiment state is made to lack the running trial: what a
    driver killed while Tune copies its state to storage (asynchronously) leaves behind, and what
    made this test fail now and then (the resumed sweep ended with trials never run). The trials
    Tune's restored state lost run again in a top-up experiment, from their own resume state."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the driver subprocesses start their own local clusters
    wd = tmp_path / "w"
    f = _sweep_file(tmp_path, "killme", "  seed: {grid: [0, 1, 2, 3]}", "{algorithm: grid, max_concurrent: 1, resources: {cpu: 1}}")
    cli = [str(Path(sys.executable).parent / "platform"), "--workdir", str(wd), "sweep", str(f)]
    env = dict(os.environ, RSSEG_RAY_LOGS="0", RSSEG_FAULT_KILL_DRIVER=",".join(f"{i}:{p}" for i, p in enumerate(KILL_POINTS)))
    uri = tracking.resolve_uri(None, Workdir.resolve(wd))
    sessions: set[str] = set()
    ended_before_kill = {}
    codes = []
    for attempt in range(len(KILL_POINTS) + 1):
        out = subprocess.run(cli + (["--resume"] if attempt else []), capture_output=True, text=True, env=env, timeout=600)
        codes.append(out.returncode)
        for record in (wd / "ray").glob("local-*.json"):
            sessions.add(json.loads(record.read_text())["session_dir"].rstrip("/") + "/")
        if out.returncode == 0:
            break
        assert out.returncode == -signal.SIGKILL, out.stdout[-3000:] + out.stderr[-3000:]
        if attempt == 0:
            _drop_running_trial_from_tune_state(wd)
        kids = children(uri, "killme")
        assert len({k.data.tags["trial_id"] for k in kids}) == len(kids)  # never a duplicate child
        for k in kids:
            if k.info.status == "FINISHED":
                ended_before_kill.setdefault(k.info.run_id, k.info.end_time)
    assert codes == [-signal.SIGKILL] * len(KILL_POINTS) + [0], codes
    assert {p.name.split("-", 2)[2] for p in wd.glob(".fault-*")} == set(KILL_POINTS)  # every point was hit
    after = children(uri, "killme")
    assert len(after) == 4 and len({k.data.tags["trial_id"] for k in after}) == 4
    assert all(k.info.status == "FINISHED" and 0 <= k.data.metrics["test/mIoU"] <= 1 for k in after)
    by_seed = {k.data.params["seed"]: k for k in after}
    # seed 2 was killed after its run ended: it was reported from MLflow, not trained again
    ended = by_seed["2"]
    assert ended.info.run_id in ended_before_kill and ended.info.end_time == ended_before_kill[ended.info.run_id]
    assert ended.data.tags["attempt"] == "1"
    # seeds 1 and 3 were killed after a validation: they continued from their resume state (the
    # last validation before the driver died), in the same MLflow run
    for seed in ("1", "3"):
        assert int(by_seed[seed].data.tags["resumed_from_iteration"]) in (3, 6), seed
    # seed 0, killed at its first validation (before any resume state) and then missing from Tune's
    # state, ran again in the top-up experiment, in the same MLflow run
    assert by_seed["0"].data.tags["attempt"] == "2" and "resumed_from_iteration" not in by_seed["0"].data.tags
    assert any("-topup" in n for n in json.loads((wd / "sweeps" / "killme" / "state.json").read_text())["tune_names"])
    assert not list((wd / "sweeps" / "killme" / "trials").glob("*.pt"))  # resume states go when their run FINISHED
    ps = parents(uri, "killme")
    assert [p.info.status for p in ps] == ["FINISHED"]
    assert sessions and _leftover_processes(sessions) == []
    assert not list((wd / "ray").glob("local-*.json"))


def test_multi_node_trials_land_on_both_nodes(tmp_path, tracking_server):
    with two_node_cluster() as (_, nodes):
        wd = Workdir.resolve(tmp_path / "w").ensure()
        f = _sweep_file(tmp_path, "multi", "  seed: {grid: [0, 1]}", "{algorithm: grid, max_concurrent: 2, resources: {cpu: 1}}")
        result = run_sweep(load_sweep(f), wd, tracking_uri=tracking_server, progress=False)  # several nodes: a server
        kids = children(tracking_server, "multi", result.parent_run_id)
        assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
        assert {k.data.tags["node_id"] for k in kids} == {n.node_id for n in nodes}


def test_tables_from_the_noise_ablation_sweep(noise_ablation, tmp_path):
    """`make demo` then `make tables`: Table 2 fills from the sweep's runs, the rest are skeletons."""
    from rsseg.tables.build import build_all

    wd, _, _ = noise_ablation
    report = build_all(tracking.resolve_uri(None, wd), tmp_path / "tables")
    t2 = report.built["table2"]
    assert t2.n_runs == 6 and t2.group == {"profile": "smoke", "dataset": "synthetic"}
    uri = tracking.resolve_uri(None, wd)
    by_timesteps = {k.data.tags["timesteps"]: k.data.metrics["test/mIoU"] for k in children(uri, "noise_ablation")}
    assert set(by_timesteps) == {"0", "50", "100", "100,50", "200,100,50", "150,100,50"}
    for key, miou in by_timesteps.items():
        cell = t2.cell(key, "mIoU")  # each cell is its one run's test mIoU, in percent
        assert cell.n == 1 and abs(cell.mean - 100 * miou) < 1e-6, (key, cell.mean, miou)
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
        "base.ma3e.optim.warmup_iterations=5", "base.finetune.upernet.channels=16"]
    # (a dotted space key cannot be --set: shrink the label-ratio axis in a copy of the file)
    text = (REPO / "sweeps" / "label_ratio.yaml").read_text()
    assert "data.label_ratio: {grid: [0.02, 0.4, 1.0]}" in text
    f = tmp_path / "label_ratio.yaml"
    f.write_text(text.replace("data.label_ratio: {grid: [0.02, 0.4, 1.0]}", "data.label_ratio: {grid: [0.02]}"))
    loaded = load_sweep(f, str(REPO / "sweeps" / "profiles" / "smoke.yaml"), shrink)
    result = run_sweep(loaded, wd, progress=False)
    uri = tracking.resolve_uri(None, wd)
    kids = children(uri, "label_ratio", result.parent_run_id)
    # 5 methods and the random-weights UNet reference, frozen and fine-tuned
    assert len(kids) == 12 and all(k.info.status == "FINISHED" for k in kids), [(k.data.tags.get("method"), k.data.tags.get("error")) for k in kids]
    params = {(k.data.tags["method"], k.data.tags["frozen"]): k.data.metrics["params/trainable"] for k in kids}
    for m in ("convnext_random", "mae", "scalemae", "ma3e", "ddpm"):
        assert params[(m, "true")] < params[(m, "false")], m  # fine-tuning trains the encoder too
    assert {k.data.tags["head"] for k in kids if k.data.tags["method"] == "mae"} == {"mlp", "upernet"}
    report = build_all(uri, tmp_path / "tables")
    t3 = report.built["table3"]
    for m in ("convnext_random", "mae", "scalemae", "ma3e", "ddpm"):
        for setting in ("frozen", "finetuned"):
            assert t3.cell(f"{m}/{setting}", "0.02").n == 1, (m, setting)
            assert t3.cell(f"{m}/{setting}", "ft_params_M").n == 1
        assert t3.cell(f"ddpm_random/{setting}", "0.02").n == 1
    # the reference classifiers, scored by all 12 runs on the same split and labels, count once
    for ref in ("texture", "colour"):
        assert t3.cell(f"reference/{ref}", "0.02").n == 1
    md = (tmp_path / "tables" / "table3.md").read_text()
    assert "| MAE · Frozen |" in md and "| 34.1 |" in md  # ours beside the paper's 34.1


def _cache_files(wd: Workdir) -> list[Path]:
    return list((wd.cache / "features").rglob("*.npz"))


def test_a_sweep_computes_each_tile_timestep_once_with_2_trials_concurrent(tmp_path, ray_cluster):
    """3 trials over overlapping timestep sets, 2 at a time, one shared feature cache: every
    (tile, variant, t) is computed by exactly one trial (the cache's own counts in MLflow), the
    others wait for it or read it; the dry run's planned count is that number."""
    from rsseg.sweep import passes
    from rsseg.sweep.plan import make_plan

    wd = Workdir.resolve(tmp_path / "w").ensure()
    f = _sweep_file(tmp_path, "once", "  ddpm.features.timesteps: {grid: [[0, 50], [50, 100], [0, 100]]}",
                    "{algorithm: grid, max_concurrent: 2, resources: {cpu: 1}}")
    loaded = load_sweep(f)
    result = run_sweep(loaded, wd, progress=False)
    kids = children(tracking.resolve_uri(None, wd), "once", result.parent_run_id)
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    computed = sum(k.data.metrics["cache/parts_computed"] for k in kids)
    files = _cache_files(wd)
    assert computed == len(files) > 0  # each stored key computed exactly once, by one trial
    assert all(k.data.metrics["cache/over_budget"] == 0 for k in kids)
    assert sum(k.data.metrics["cache/parts_read"] + k.data.metrics["cache/parts_waited"] for k in kids) > 0  # shared, not recomputed
    assert {p.parent.name for p in files} == {"t0", "t50", "t100"}
    counted = passes.count(make_plan(loaded, wd), wd)
    assert counted.cached == computed and counted.naive > counted.planned >= computed


def test_noise_ablation_computes_the_lower_bound_of_feature_passes(noise_ablation):
    """The smoke noise ablation (6 overlapping timestep sets, 2 trials at a time): the passes
    computed equal the distinct (tile, variant, t) keys, which is what the dry run plans."""
    from rsseg.sweep import passes
    from rsseg.sweep.plan import make_plan

    wd, loaded, result = noise_ablation
    kids = children(tracking.resolve_uri(None, wd), "noise_ablation", result.parent_run_id)
    computed = sum(k.data.metrics["cache/parts_computed"] for k in kids)
    assert computed == len(_cache_files(wd))
    counted = passes.count(make_plan(loaded, wd), wd)
    assert counted.cached == computed and counted.trials == 6


def test_homogeneous_ratio_shares_its_trunk_and_pretrain_strategy_reuses_it(tmp_path, ray_cluster):
    """Smoke homogeneous_ratio (shares 0, 0.5, 1 of 20 iterations): the archive-only run is the
    trunk, the 0.5 run branches from its point at step 10, the homogeneous-only run trains alone:
    50 iterations trained instead of 60, as the dry run plans. pretrain_strategy afterwards trains
    only what it does not share: its non-homogeneous branch (10 iterations, from the same point)."""
    from rsseg.sweep.plan import make_plan, trunk_plan

    wd = Workdir.resolve(tmp_path / "w").ensure()
    shrink = SHRINK + ["base.pretrain.runtime.workers=1"]
    ratio = load_sweep(REPO / "sweeps" / "homogeneous_ratio.yaml", "smoke", shrink)
    planned = trunk_plan(make_plan(ratio, wd), wd)
    assert planned[0] == "pre-training iterations to train: 50 (training each of the 3 alone: 60)"
    result = run_sweep(ratio, wd, progress=False)
    uri = tracking.resolve_uri(None, wd)
    assert result.finished == 3
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT).experiment_id
    pre = {r.data.tags["homogeneous_share"]: r for r in c.search_runs([exp])}
    assert {k: r.data.metrics["train/iterations_trained"] for k, r in pre.items()} == {"0": 20, "0.5": 10, "1": 20}
    assert pre["0.5"].data.tags["started_from_trunk_point"] == "10"
    assert pre["0"].data.tags["trunk_fingerprint"] == pre["0.5"].data.tags["trunk_fingerprint"] and "trunk_fingerprint" not in pre["1"].data.tags
    kids = children(uri, "homogeneous_ratio", result.parent_run_id)
    assert {k.data.tags.get("switch_step") for k in kids} == {"20", "10", None}  # lineage on the fine-tuning runs

    strategy = load_sweep(REPO / "sweeps" / "pretrain_strategy.yaml", "smoke",
                          shrink + ["base.finetune.log_predictions=0"])
    plan = make_plan(strategy, wd)
    assert [p.cached for p in plan.pretrainings].count(False) == 1  # only the non-homogeneous branch is new
    result = run_sweep(strategy, wd, progress=False)
    assert result.finished == 4
    new = [r for r in c.search_runs([exp]) if r.info.run_id not in {p.info.run_id for p in pre.values()}]
    assert len(new) == 1 and new[0].data.tags["homogeneous_source"] == "synthetic"
    assert new[0].data.metrics["train/iterations_trained"] == 10 and new[0].data.tags["started_from_trunk_point"] == "10"
    kids = children(uri, "pretrain_strategy", result.parent_run_id)
    assert sorted(k.data.tags.get("homogeneous_source", "") for k in kids) == ["", "", "", "synthetic"]


def test_head_search_optuna_asha_on_the_shared_pretraining(noise_ablation):
    """The shipped Optuna sweep (smoke, shrunk, 4 samples): every sample a run, never more than
    max_concurrent (2) at once, ASHA may stop some (KILLED, tagged), the winner by val/mIoU on the
    parent run; it re-uses the noise ablation's pre-training and no table counts its runs."""
    from rsseg.tables.query import read_runs

    wd, _, first = noise_ablation
    uri = tracking.resolve_uri(None, wd)
    c = tracking.client(uri)
    pre_exp = c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT).experiment_id
    pretrainings = len(c.search_runs([pre_exp]))
    loaded = load_sweep(REPO / "sweeps" / "head_search.yaml", "smoke", SHRINK + ["search.num_samples=4"])
    result = run_sweep(loaded, wd, progress=False)
    kids = children(uri, "head_search", result.parent_run_id)
    assert c.get_run(result.parent_run_id).data.params["algorithm"] == "optuna"  # what the driver ran
    assert len(kids) == 4 and {k.info.status for k in kids} <= {"FINISHED", "KILLED"}
    # sampled by Optuna from the file's distributions: lr log-uniform in [5e-5, 3e-3], timesteps a categorical
    assert all(5e-5 <= float(k.data.params["finetune.lr"]) <= 3e-3 for k in kids)
    drawn = {tuple(int(t) for t in re.findall(r"\d+", k.data.tags["space.ddpm.features.timesteps"])) for k in kids}
    assert drawn and drawn <= {(100, 50), (150, 100, 50), (200, 100, 50)}
    assert all("early_stopped" in k.data.tags for k in kids if k.info.status == "KILLED")
    assert len({k.data.params["finetune.lr"] for k in kids}) == 4
    assert {k.data.params["finetune.mlp.fuse_hidden"] for k in kids} <= {"64", "128", "256"}
    events = sorted([(k.info.start_time, 1) for k in kids] + [(k.info.end_time, -1) for k in kids])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2
    finished = [k for k in kids if k.info.status == "FINISHED"]
    winner = max(finished, key=lambda k: k.data.metrics["val/mIoU"])
    parent = c.get_run(result.parent_run_id)
    assert parent.data.tags["best_run_id"] == winner.info.run_id
    assert parent.data.metrics["best_val_mIoU"] == winner.data.metrics["val/mIoU"]
    assert parent.data.tags["best.finetune.lr"] == winner.data.tags["space.finetune.lr"]
    assert parent.data.tags["best.ddpm.features.timesteps"] == winner.data.tags["space.ddpm.features.timesteps"]
    assert len(c.search_runs([pre_exp])) == pretrainings  # the noise ablation's pre-training, not a new one
    assert parent.data.tags["pretrain_fingerprints"] == c.get_run(first.parent_run_id).data.tags["pretrain_fingerprints"]
    store = read_runs(uri)
    assert "head_search" not in set(store.runs["experiment"].to_list()) and len(store.runs) >= 6


def test_feature_selection_smoke_finishes_every_trial_and_fills_table1(noise_ablation, tmp_path):
    """Table 1's sweep under smoke (shrunk), on the noise ablation's pre-training: its 20 trials
    (side x resolution x head) each read other maps of the same pre-trained UNet at the same
    timesteps — before the cache key covered the maps, 16 of 20 read another trial's maps and
    failed, and the sweep exited 0. Now all FINISHED and every cell of Table 1 has its run."""
    from rsseg.tables.build import build_all

    wd, _, first = noise_ablation
    uri = tracking.resolve_uri(None, wd)
    c = tracking.client(uri)
    pre_exp = c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT).experiment_id
    pretrainings = len(c.search_runs([pre_exp]))
    loaded = load_sweep(REPO / "sweeps" / "feature_selection.yaml", "smoke", SHRINK)
    result = run_sweep(loaded, wd, progress=False)
    kids = children(uri, "feature_selection", result.parent_run_id)
    assert len(kids) == 20 and all(k.info.status == "FINISHED" for k in kids), [k.data.tags.get("error") for k in kids]
    assert result.failed == 0 and len(c.search_runs([pre_exp])) == pretrainings  # the shared pre-training
    t1 = build_all(uri, tmp_path / "tables").built["table1"]
    assert t1.n_runs == 20
    for head in ("mlp", "upernet"):
        for side in ("encoder", "decoder"):
            for res in ("16", "8", "4", "2", "multi"):
                cell = t1.cell(head, f"{side}/{res}")
                assert cell.n == 1, (head, side, res)
        assert t1.cell(head, "ft_params_M").n == 1
    # the maps a part stores are in its cache key: one feature set per (side, resolutions), the
    # decoder's four resolutions shared with the noise ablation (and the head search)
    assert len([d for d in (wd.cache / "features").iterdir() if d.is_dir()]) == 10


def test_sota_sweeps_smoke_finish_every_trial_and_fill_tables_4_and_5(noise_ablation, tmp_path):
    """Tables 4 and 5's sweeps under smoke (shrunk), in the noise ablation's work directory: ours
    (frozen DDPM + MLP) and SegFormer run here (a pico MiT, fully fine-tuned) at each label ratio;
    every trial FINISHED and each row of ours in the tables has its run. Both read the noise
    ablation's pre-training (the same recipe on the same synthetic data)."""
    from rsseg.tables.build import build_all
    from rsseg.tables.layouts import FT

    wd, _, _ = noise_ablation
    uri = tracking.resolve_uri(None, wd)
    c = tracking.client(uri)
    pre_exp = c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT).experiment_id
    pretrainings = len(c.search_runs([pre_exp]))
    for name, trials in (("sota_minifrance", 4), ("sota_gid", 2)):
        result = run_sweep(load_sweep(REPO / "sweeps" / f"{name}.yaml", "smoke", SHRINK), wd, progress=False)
        kids = children(uri, name, result.parent_run_id)
        assert len(kids) == trials and all(k.info.status == "FINISHED" for k in kids), [k.data.tags.get("error") for k in kids]
        assert result.failed == 0 and {k.data.tags["method"] for k in kids} == {"ddpm", "segformer"}
        assert len(c.search_runs([pre_exp])) == pretrainings
    built = build_all(uri, tmp_path / "tables").built
    for table, rows in (("table4", ("ddpm/0.02", "ddpm/1", "segformer/0.02", "segformer/1")), ("table5", ("ddpm", "segformer"))):
        assert built[table].n_runs == len(rows), table
        for row in rows:
            assert built[table].cell(row, "mIoU").n == 1 and built[table].cell(row, FT).n == 1, (table, row)
        assert built[table].cell("SETR" if table == "table4" else "SETR-M", "mIoU").n == 0  # published rows: not ours


def _documented_own_data_commands() -> list[list[str]]:
    """The `platform ...` lines of docs/own-data.md's tested block, split as a shell would."""
    import shlex

    text = (REPO / "docs" / "own-data.md").read_text()
    block = text.split("<!-- own-data commands: run by tests/test_sweep_e2e.py -->", 1)[1].split("```")[1]
    return [shlex.split(ln)[1:] for ln in block.splitlines() if ln.startswith("platform ")]


def test_own_data_as_documented(tmp_path, monkeypatch, ray_cluster):
    """docs/own-data.md, as a user runs it: a copied paper sweep pointed at a folder dataset with no
    archive imagery (its archive root `data/archive` is not there), a relative root, the
    documented commands in order (64 px tiles in place of the doc's 256, for time). The first
    dry run names the override, the second has no problem, the try run finishes its trial."""
    import yaml
    from typer.testing import CliRunner

    from rasters import write_folder_dataset
    from rsseg.cli import app

    monkeypatch.chdir(tmp_path)
    for var in ("RSSEG_ARCHIVE", "RSSEG_WORKDIR", "RSSEG_DATA"):
        monkeypatch.delenv(var, raising=False)
    write_folder_dataset(tmp_path / "my-data", size=128)
    sweep = yaml.safe_load((REPO / "sweeps" / "noise_ablation.yaml").read_text())
    sweep["base"]["data"] = {"dataset": "folder", "root": "my-data", "tile_size": 64, "label_ratio": 0.02}
    (tmp_path / "my_noise_ablation.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    commands = _documented_own_data_commands()
    assert len(commands) == 4, commands
    outputs = []
    for args in commands:
        args = [a.replace("256", "64") for a in args]
        out = CliRunner().invoke(app, args)
        outputs.append(out.output)
        if args != commands[1]:  # the first dry run stops on its problem, as documented
            assert out.exit_code == 0, (args, out.output[-3000:])
    assert "pretrain.archive.root: " in outputs[1] and "--set pretrain.iterations.homogeneous_ratio=1.0" in outputs[1]
    assert "problems" not in outputs[2] and "0 archive + 1200 homogeneous" in outputs[2]
    assert "1 finished, 0 failed, 1 trials" in outputs[3], outputs[3][-3000:]
    uri = tracking.resolve_uri(None, Workdir.resolve(tmp_path / "rsseg-work"))
    kids = [r for r in tracking.client(uri).search_runs([tracking.client(uri).get_experiment_by_name("noise_ablation").experiment_id])
            if r.data.tags.get("kind") == "finetune"]
    assert len(kids) == 1 and kids[0].info.status == "FINISHED" and kids[0].info.run_name == "timesteps=[100] seed=0"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_ends_the_sweep_killed_and_prints_the_resume_command_that_finishes_it(tmp_path, sig):
    """Ctrl-C (SIGINT to the driver) mid-sweep: Tune's own handler used to end the fit normally, so
    the parent run was marked FINISHED and Ray's `Tuner.restore(...)` hint was printed. Now the
    parent and its running trials are KILLED, exit 130, and the printed command finishes the sweep.
    A scheduler's SIGTERM (SLURM, Kubernetes) ends it the same way (ray.init had replaced the CLI's
    handler with sys.exit, and the trials' runs stayed RUNNING)."""
    import shlex

    import ray

    if ray.is_initialized():
        ray.shutdown()  # the driver subprocesses start their own local clusters
    wd = tmp_path / "w"
    f = _sweep_file(tmp_path, "ctrlc", "  seed: {grid: [0, 1, 2]}", "{algorithm: grid, max_concurrent: 1, resources: {cpu: 1}}",
                    base=TINY_BASE.replace("iterations: 6, eval_every: 3", "iterations: 40, eval_every: 20"))
    exe = str(Path(sys.executable).parent / "platform")
    env = dict(os.environ, RSSEG_RAY_LOGS="0", RSSEG_PROGRESS_SECONDS="0")
    proc = subprocess.Popen([exe, "--workdir", str(wd), "sweep", str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        for text in proc.stdout:
            if "1 running" in text:
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Tuner.restore" not in err
    hint = [ln for ln in err.splitlines() if "continue it with: " in ln]
    assert len(hint) == 1 and hint[0].endswith(f"sweep {f} --resume"), err[-3000:]
    uri = tracking.resolve_uri(None, Workdir.resolve(wd))
    assert [p.info.status for p in parents(uri, "ctrlc")] == ["KILLED"]
    assert "RUNNING" not in {k.info.status for k in children(uri, "ctrlc")}
    if sig == signal.SIGTERM:
        return  # the resume below is the same whichever signal ended the sweep
    again = shlex.split(hint[0].split("continue it with: ", 1)[1])
    out = subprocess.run([exe] + again[1:], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [p.info.status for p in parents(uri, "ctrlc")] == ["FINISHED"]
    assert sorted(k.info.status for k in children(uri, "ctrlc")) == ["FINISHED"] * 3
