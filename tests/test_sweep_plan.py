"""Sweep files validate and dry-run; bad sweeps fail before anything runs, naming file and key."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
from rsseg.cli import app
from rsseg.runspec import load_run, load_sweep
from rsseg.errors import ConfigError, SweepError, TrackingError
from rsseg.sweep.plan import describe, make_plan

RUN_FILES = ("pretrain.yaml", "finetune.yaml")  # single runs (platform pretrain / finetune), not sweeps
SWEEPS = sorted(p for p in (REPO / "sweeps").glob("*.yaml") if p.name not in RUN_FILES)
PAPER_SWEEPS = {"noise_ablation", "feature_selection", "label_ratio", "pretrain_strategy", "homogeneous_ratio",
                "sota_minifrance", "sota_gid"}
SEARCH_SWEEPS = {"head_search"}  # not a paper cell: no table tag, so the tables never count its runs


def test_every_paper_experiment_has_a_sweep_file():
    assert {p.stem for p in SWEEPS} == PAPER_SWEEPS | SEARCH_SWEEPS
    for p in SWEEPS:
        head = p.read_text().splitlines()[:12]
        assert head[0].startswith(f"# platform sweep sweeps/{p.name}")
        text = "\n".join(head)
        assert "Runtime:" in text
        table = load_sweep(p).spec.table
        if p.stem in PAPER_SWEEPS:
            assert table and "Regenerates:" in text and "Paper's numbers to expect" in text
        else:
            assert table is None and "Not a paper table" in text


@pytest.mark.parametrize("profile", [None, "small", "smoke", "paper"])
@pytest.mark.parametrize("name", RUN_FILES)
def test_the_shipped_run_files_load_under_every_profile(name, profile):
    run = load_run(REPO / "sweeps" / name, profile=profile).spec
    assert run.method == "ddpm" and run.pretrain.iterations.n_total >= 1
    if name == "pretrain.yaml" and profile in (None, "paper"):  # the paper's recipe, as its header says
        assert run.ddpm.unet.preset == "sr3" and run.ddpm.schedule.preset == "ddpm_cd"
        assert (run.ddpm.optim.lr, run.ddpm.optim.warmup_start_lr, run.ddpm.optim.warmup_iterations) == (1e-5, 1e-6, 10000)
        assert run.pretrain.iterations.counts() == (180000, 20000)


_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}


def _runtime_note(path):
    lines = path.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("# Runtime:"))
    note = [lines[start]]
    for l in lines[start + 1:]:
        if not l.startswith("# ") or l.startswith("# paper scale") or ":" in l.split()[1]:
            break
        note.append(l)
    return " ".join(l[2:] for l in note).split("paper scale")[0]


@pytest.mark.parametrize("sweep", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_runtime_notes_state_what_the_smoke_profile_runs(sweep):
    """The header's smoke figures (trials, pre-trainings, iterations) are the smoke plan's own."""
    import re

    note = _runtime_note(sweep)
    if sweep.name in RUN_FILES:
        run = load_run(sweep, profile="smoke").spec
        totals, n_trials, n_pre = {run.pretrain.iterations.n_total}, None, 1
    else:
        plan = make_plan(load_sweep(sweep, "smoke"))
        n_trials, n_pre = plan.n_trials, len(plan.pretrainings)
        totals = {p.spec.pretrain.iterations.n_total for p in plan.pretrainings}
    stated = {m.group(1) for m in re.finditer(r"(\d+) trials", note)}
    assert stated <= {str(n_trials)}, f"{sweep.name}: note says {stated} trials, the smoke plan has {n_trials}"
    for m in re.finditer(r"\b(one|two|three|four|\d+) (?:[\d ]+-iteration )?(?:tiny )?pre-trainings?\b", note):
        n = _WORDS.get(m.group(1)) or int(m.group(1))
        assert n == n_pre, f"{sweep.name}: note says {m.group(0)!r}, the smoke plan has {n_pre} pre-training(s)"
    for m in re.finditer(r"(\d[\d ]*\d|\d)[ -]iterations?\b", note):
        n = int(m.group(1).replace(" ", ""))
        if "pre-training" in note[m.end():m.end() + 30] or sweep.stem == "pretrain":
            assert n in totals, f"{sweep.name}: note says {n} iterations of pre-training, the smoke plan trains {totals}"


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
@pytest.mark.parametrize("profile", ["smoke", "paper"])
def test_sweep_validates_and_dry_runs(sweep, profile, workdir, monkeypatch, tmp_path):
    monkeypatch.delenv("RSSEG_CONVNEXT_WEIGHTS", raising=False)  # the IN-init cells are skipped, the rest plan
    result = CliRunner().invoke(app, ["--workdir", str(workdir.root), "sweep", str(sweep), "--profile", profile, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"sweep {sweep.stem}" in result.output and "pre-trainings needed:" in result.output
    plan = make_plan(load_sweep(sweep, profile))
    assert plan.n_trials >= 1
    if profile == "smoke":
        assert all(t.run["data"]["dataset"] == "synthetic" and t.run["ddpm"]["unet"]["preset"] == "tiny" for t in plan.trials)
    assert not list(workdir.root.glob("mlflow.db"))  # a dry run starts nothing


def test_noise_ablation_plan_shares_one_pretraining():
    plan = make_plan(load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "smoke"))
    assert plan.n_trials == 18 and len(plan.pretrainings) == 1
    assert {tuple(t.values["ddpm.features.timesteps"]) for t in plan.trials} == {(0,), (50,), (100,), (100, 50), (200, 100, 50), (150, 100, 50)}
    assert len({t.key for t in plan.trials}) == 18


@pytest.mark.parametrize("networks", [False, True])
def test_a_running_sweeps_plan_counts_no_parameters_and_imports_no_diffusers(networks):
    # The parameter counts are for `--dry-run`'s table; a running sweep's driver skips them and the
    # seconds of diffusers imports they cost (issue 29: the 1-trial sweep's overhead).
    import subprocess
    import sys

    code = (f"import sys; from rsseg.runspec import load_sweep; from rsseg.sweep.plan import make_plan\n"
            f"plan = make_plan(load_sweep({str(REPO / 'sweeps' / 'noise_ablation.yaml')!r}, 'smoke'), networks={networks})\n"
            "print(plan.trials[0].network, plan.trials[0].params is not None, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "platform", check=True)
    assert out.stdout.split() == (["tiny", "True", "True"] if networks else ["False", "False"])


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


BASE = "name: t\nbase: {method: ddpm, data: {tile_size: 32}, ddpm: {unet: {preset: tiny}}}\n"


@pytest.mark.parametrize("text, pattern", [
    (BASE + "space: {seed: {grid: [0]}}\nsearch: {algoritm: grid}\n", r"s.yaml: search.algoritm: unknown key; did you mean 'algorithm'\?"),
    (BASE + "space: {finetune.iteratons: {grid: [1, 2]}}\n", r"s.yaml: space.finetune.iteratons: not a key of the run spec \(base\); did you mean 'finetune.iterations'\?"),
    (BASE + "space: {seed: {grid: []}}\n", r"s.yaml: space.seed: grid is empty: list at least one value"),
    (BASE + "space: {finetune.lr: {loguniform: [1.0e-4, 1.0e-2]}}\nsearch: {algorithm: optuna, num_samples: 0}\n", r"s.yaml: search: num_samples must be >= 1 with optuna, got 0"),
    (BASE + "space: {finetune.lr: {loguniform: [1.0e-4, 1.0e-2]}}\n", r"s.yaml: space.finetune.lr: loguniform needs search.algorithm: optuna"),
    (BASE + "space: {finetune.iterations: {grid: [10, -1]}}\n", r"s.yaml: space.finetune.iterations: the trial finetune.iterations=-1 is invalid: .*greater than or equal to 1"),
    (BASE + "space: {seed: {grid: [0], choice: [1]}}\n", r"s.yaml: space.seed: expected exactly one of grid, cases, choice, uniform, loguniform, int"),
    # what the network can take: found at plan time, before any pre-training
    (BASE + "space: {data.tile_size: {grid: [32, 40]}}\n",
     r"s.yaml: space.data.tile_size: the trial data.tile_size=40 is invalid: .*40 is not a multiple of 16: the tiny UNet halves its "
     r"input 4 times .*\(use 32 or 48\)"),
    (BASE + "space: {pretrain.seed: {choice: [0, 1]}}\nsearch: {algorithm: optuna, num_samples: 2}\n",
     r"s.yaml: space.pretrain.seed: choice \(searched by Optuna\) changes the pre-training, which must be planned before the trials"),
    (BASE + "space: {ddpm.features.resolutions: {grid: [[16, 8], [32]]}}\n",
     r"s.yaml: space.ddpm.features.resolutions: the trial .* is invalid: .*1/32 is not a decoder resolution of the tiny UNet \(available: 1/1, 1/2"),
])
def test_bad_sweeps_name_file_and_key(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make_plan(load_sweep(write(tmp_path, text)))


def test_uninstalled_methods_are_skipped_with_a_message(tmp_path):
    """A grid that names a method no package registers (a baseline of a later release): its
    cells are skipped, the others planned, and the dry run says so."""
    from rsseg.methods import registry

    assert "not_installed_method" not in registry()
    p = write(tmp_path, BASE + "space: {method: {grid: [ddpm, not_installed_method]}, seed: {grid: [0, 1]}}\n")
    plan = make_plan(load_sweep(p))
    assert [t.run["method"] for t in plan.trials] == ["ddpm", "ddpm"]
    assert [v for v, _ in plan.skipped] == [{"method": "not_installed_method", "seed": 0}, {"method": "not_installed_method", "seed": 1}]
    assert all("method 'not_installed_method' is not installed" in reason for _, reason in plan.skipped)
    assert "skipped: 2 grid cells" in describe(plan)
    only = write(tmp_path, BASE + "space: {method: {grid: [not_installed_method]}}\n")
    with pytest.raises(ConfigError, match=r"every trial was skipped \(method 'not_installed_method' is not installed"):
        make_plan(load_sweep(only))


def test_bad_base_key_is_named_under_base(tmp_path):
    p = write(tmp_path, "name: t\nbase: {finetune: {iteratons: 3}}\nspace: {seed: {grid: [0]}}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: base.finetune.iteratons: unknown key; did you mean 'iterations'\?"):
        load_sweep(p)


def test_resume_of_a_sweep_that_does_not_exist(tmp_path, workdir):
    from rsseg.sweep.driver import run_sweep

    p = write(tmp_path, BASE + "space: {seed: {grid: [0]}}\n")
    with pytest.raises(SweepError, match=r"no sweep named 't' to resume: .*/sweeps/t/state.json does not exist"):
        run_sweep(load_sweep(p), workdir, resume=True)
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "sweep", str(p), "--resume"])
    assert out.exit_code == 2 and "error: no sweep named 't' to resume" in out.output


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path, workdir):
    import socket

    from rsseg.sweep.driver import run_sweep

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    p = write(tmp_path, BASE + "space: {seed: {grid: [0]}}\n")
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingError, match=rf"MLflow tracking server {uri} is unreachable"):
        run_sweep(load_sweep(p), workdir, tracking_uri=uri)
    assert not (workdir.root / "sweeps" / "t" / "state.json").exists()  # no state, no trial


def test_profile_overlay_in_a_sweep_file_removes_an_axis():
    loaded = load_sweep(REPO / "sweeps" / "homogeneous_ratio.yaml", "smoke")
    assert set(loaded.spec.space) == {"pretrain.iterations.homogeneous_ratio"}
    assert loaded.spec.space["pretrain.iterations.homogeneous_ratio"].grid == [0.0, 0.5, 1.0]
    paper = load_sweep(REPO / "sweeps" / "homogeneous_ratio.yaml", "paper")
    assert set(paper.spec.space) == {"pretrain.iterations.homogeneous_ratio", "data"}


def test_label_ratio_with_a_missing_imagenet_weights_file_fails_before_anything_runs(workdir, monkeypatch):
    f = REPO / "sweeps" / "label_ratio.yaml"
    monkeypatch.setenv("RSSEG_CONVNEXT_WEIGHTS", "/nonexistent/convnext.pt")
    result = CliRunner().invoke(app, ["--workdir", str(workdir.root), "sweep", str(f), "--profile", "paper", "--dry-run"])
    assert result.exit_code == 2 and "convnext.weights: /nonexistent/convnext.pt does not exist" in result.output
    assert "space.method: the trial method='convnext_imagenet'" in result.output


def _hold_lock(workdir, name: str, pid: int) -> Path:
    import json
    import socket

    lock = workdir.sweeps / name / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-12-02T00:00:00"}))
    return lock


def test_a_second_driver_of_the_same_sweep_says_who_holds_it_and_exits_2(tmp_path, workdir):
    import os

    p = write(tmp_path, BASE + "space: {seed: {grid: [0]}}\n")
    lock = _hold_lock(workdir, "t", os.getpid())  # a live holder: this very process
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "sweep", str(p)])
    assert out.exit_code == 2, out.output
    assert f"error: sweep 't' is already running in {workdir.root} (pid {os.getpid()} on" in out.output
    assert lock.exists()  # the holder's lock is left alone


def test_a_lock_left_by_a_killed_driver_is_stale_and_taken_over(tmp_path, workdir, caplog):
    import subprocess
    import sys

    from rsseg.sweep.driver import run_sweep

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = _hold_lock(workdir, "t", dead.pid)
    p = write(tmp_path, BASE + "space: {seed: {grid: [0]}}\n")
    # past the lock (taken over), to the next check: there is nothing to resume
    with pytest.raises(SweepError, match=r"no sweep named 't' to resume"):
        run_sweep(load_sweep(p), workdir, resume=True)
    assert f"taking over a stale lock of pid {dead.pid}" in caplog.text
    assert not lock.exists()  # released on the way out


def test_resume_refuses_ray_storage_owned_by_another_user(workdir, monkeypatch):
    import os

    from rsseg.sweep import state

    storage = workdir.ray_storage / "sweeps" / "t-20261202"
    storage.mkdir(parents=True)
    state.check_owner(workdir, "t", ["t-20261202"])  # ours: fine
    monkeypatch.setattr(state.os, "getuid", lambda: os.stat(storage).st_uid + 1)
    with pytest.raises(SweepError, match=r"cannot resume sweep 't': .*t-20261202 belongs to another user .*trust boundary"):
        state.check_owner(workdir, "t", ["t-20261202"])


def test_the_sweeps_ray_storage_is_private_whatever_the_umask(workdir):
    import os
    import stat

    from rsseg.sweep import state

    old = os.umask(0o002)  # a team's shared work dir: group-writable by default
    try:
        workdir.ray_storage.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir.ray_storage, 0o775)
        storage, fs = state.private_storage(workdir)
        storage = Path(storage)
        assert fs is None
    finally:
        os.umask(old)
    assert storage == workdir.ray_storage / "sweeps"
    assert [stat.S_IMODE(p.stat().st_mode) for p in (workdir.ray_storage, storage)] == [0o700, 0o700]


def test_a_tile_size_the_network_cannot_take_fails_config_show_and_dry_run(tmp_path, workdir):
    p = write(tmp_path, BASE.replace("tile_size: 32", "tile_size: 40") + "space: {seed: {grid: [0]}}\n")
    for args in (["config", "show", str(p)], ["sweep", str(p), "--dry-run"]):
        out = CliRunner().invoke(app, ["--workdir", str(workdir.root), *args])
        assert out.exit_code == 2, out.output
        assert "data.tile_size" in out.output and "40 is not a multiple of 16" in out.output and len(out.output.strip().splitlines()) == 1
    assert not (workdir.root / "checkpoints").exists()


def test_an_optuna_axis_that_leaves_the_pre_training_alone_is_fine(tmp_path):
    plan = make_plan(load_sweep(write(tmp_path, BASE + "space: {finetune.lr: {loguniform: [1.0e-4, 1.0e-2]}}\n"
                                                "search: {algorithm: optuna, num_samples: 2}\n")))
    assert list(plan.search_axes) == ["finetune.lr"] and len(plan.pretrainings) == 1


def test_paper_homogeneous_ratio_dry_run_plans_one_trunk_and_its_branches(workdir):
    from rsseg.sweep.plan import trunk_plan

    plan = make_plan(load_sweep(REPO / "sweeps" / "homogeneous_ratio.yaml", "paper"), workdir)
    assert len(plan.trials) == 12 and len(plan.pretrainings) == 11  # share 0 on MiniFrance and GID: one run
    lines = trunk_plan(plan, workdir)
    assert lines[0] == "pre-training iterations to train: 940,000 (training each of the 11 alone: 2,200,000)"
    trunk = [line for line in lines if line.strip().startswith("trunk ")]
    assert len(trunk) == 1 and "archive to step 200,000; branch points 100,000, 160,000, 180,000, 190,000, 200,000; 200,000 to train" in trunk[0]
    assert sum("on its own" in line and "no archive phase" in line for line in lines) == 2
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "sweep", str(REPO / "sweeps" / "homogeneous_ratio.yaml"),
                                   "--profile", "paper", "--dry-run"])
    assert out.exit_code == 0 and lines[0] in out.output


def test_missing_slots_are_the_trials_mlflow_and_tune_have_not_seen_end(tmp_path):
    """What a resumed sweep runs again in its top-up experiment: the grid slots (optuna: the samples
    per cell) with no ended MLflow run and no result from the restored Tune experiment."""
    from mlflow.tracking import MlflowClient
    from ray.air.result import Result

    from rsseg.sweep.plan import grid_cells
    from rsseg.sweep.record import EARLY_STOPPED, missing_slots

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("t")
    parent = client.create_run(exp).info.run_id

    def child(slot, status, **tags):
        r = client.create_run(exp, tags={"sweep_parent": parent, "trial_slot": slot, **tags}).info.run_id
        if status != "RUNNING":
            client.set_terminated(r, status=status)

    grid = make_plan(load_sweep(write(tmp_path, BASE + "space: {seed: {grid: [0, 1, 2, 3, 4]}}\nsearch: {algorithm: grid, num_samples: 2}\n")))
    assert list(grid_cells(grid)) == [f"{i}.{r}" for r in range(2) for i in range(5)]
    child("0.0", "FINISHED")
    child("1.0", "FAILED")
    child("2.0", "KILLED", early_stopped=EARLY_STOPPED)
    child("3.0", "RUNNING")  # lost with the driver
    child("4.0", "KILLED", early_stopped="trial lost")  # lost by an earlier invocation
    ran = Result(metrics={"config": {"cell": {"slot": "0.1"}}, "trial_id": "a_00001"}, checkpoint=None, error=None, path="")
    assert missing_slots(grid, client, exp, parent, [[ran]]) == ["3.0", "4.0", "1.1", "2.1", "3.1", "4.1"]

    opt = make_plan(load_sweep(write(tmp_path, BASE + "space: {seed: {grid: [0, 1]}, finetune.lr: {loguniform: [1.0e-4, 1.0e-2]}}\n"
                                              "search: {algorithm: optuna, num_samples: 3}\n")))
    child("0:b_00000", "FINISHED")
    child("0:b_00001", "RUNNING")
    child("1:c_00000", "FAILED")
    ran = Result(metrics={"config": {"cell": {"index": 0}}, "trial_id": "b_00002"}, checkpoint=None, error=None, path="")
    assert missing_slots(opt, client, exp, parent, [[ran]]) == [(0, 1), (1, 2)]
