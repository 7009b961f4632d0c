"""Pre-training core without Ray: presets, the objective, schedules, checkpoint files."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_run
from rsseg.config.specs import OptimSpec
from rsseg.methods.ddpm.spec import NoiseScheduleSpec
from rsseg.errors import CheckpointError, ConfigError
from rsseg.checkpoints import store
from rsseg.pretrain import schedule
from rsseg.methods.ddpm.noise import ForwardProcess, add_noise, build_scheduler
from rsseg.methods.ddpm.objective import build_objective


def test_linear_warmup_then_constant_or_cosine():
    o = OptimSpec(lr=1e-5, warmup_start_lr=1e-6, warmup_iterations=10_000)
    assert schedule.lr_at(0, o, 200_000) == pytest.approx(1e-6)
    assert schedule.lr_at(5_000, o, 200_000) == pytest.approx(5.5e-6)
    assert schedule.lr_at(10_000, o, 200_000) == pytest.approx(1e-5)
    assert schedule.lr_at(150_000, o, 200_000) == pytest.approx(1e-5)
    c = OptimSpec(lr=1e-3, warmup_iterations=10, after_warmup="cosine", min_lr=0.0)
    assert schedule.lr_at(10, c, 110) == pytest.approx(1e-3)
    assert schedule.lr_at(60, c, 110) == pytest.approx(5e-4)
    assert schedule.lr_at(110, c, 110) == pytest.approx(0.0, abs=1e-12)


def test_two_step_phases_switch_at_the_planned_step():
    plan = schedule.phases(180, 20)
    assert schedule.phase_at(plan, 179)[0].name == "archive"
    assert schedule.phase_at(plan, 180) == (plan[1], 0)
    assert schedule.phase_at(schedule.phases(0, 5), 0)[0].name == "homogeneous"
    with pytest.raises(IndexError):
        schedule.phase_at(plan, 200)


def test_distributed_sampler_is_disjoint_and_step_determined():
    ph = schedule.phases(0, 100)[0]
    n, batch = 50, 8
    for step in range(0, 12):
        r0 = schedule.batch_keys(0, ph, step, n, batch, 0, 2)
        r1 = schedule.batch_keys(0, ph, step, n, batch, 1, 2)
        assert len(r0) == len(r1) == 4
        assert set(r0).isdisjoint(r1)  # draws are unique per sample
        single = schedule.batch_keys(0, ph, step, n, batch, 0, 1)
        assert single == r0 + r1  # the same global batch, split across ranks
    # every tile once per epoch
    seen = [k[0] for s in range(0, 6) for k in schedule.batch_keys(0, ph, s, 48, 8, 0, 1)]
    assert sorted(seen) == list(range(48))
    pos = schedule.position(ph, 7, 50, 8)
    assert (pos.epoch, pos.offset) == (1, 6)


def test_noise_is_computed_in_float32_and_t0_is_clean():
    sched = build_scheduler(NoiseScheduleSpec())
    x0 = torch.rand(2, 3, 8, 8).bfloat16() * 2 - 1
    noise = torch.randn(2, 3, 8, 8)
    xt = add_noise(sched, x0, noise, torch.tensor([10, 10]))
    assert xt.dtype == torch.float32
    abar = sched.alphas_cumprod[10]
    assert torch.allclose(xt, abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise, atol=1e-6)
    proc = ForwardProcess(NoiseScheduleSpec())
    assert proc.signal(0) == 1.0 and 0.9 < proc.signal(100) < 1.0
    assert ForwardProcess(NoiseScheduleSpec(kind="cosine")).signal(100) != proc.signal(100)


def test_objective_loss_is_epsilon_mse_and_decreases_on_one_batch():
    run = tiny_run()
    torch.manual_seed(0)
    obj = build_objective(run, in_channels=3)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.AdamW(obj.network.parameters(), lr=2e-3)
    losses = []
    for i in range(30):
        loss, _ = obj.loss(obj.network, x, torch.Generator().manual_seed(i % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_checkpoint_roundtrip_and_refusals(tmp_path):
    sd = store.StoreDir(tmp_path / "ddpm-abc")
    state = {"model": {"w": torch.arange(4.0)}, "step": 4}
    p1 = store.save(sd.ckpt / "step_00000004.pt", state, "abc", 4)
    p2 = store.save(sd.ckpt / "step_00000008.pt", {**state, "step": 8}, "abc", 8)
    assert store.latest_valid(sd, "abc") == (8, p2)
    # a truncated newest checkpoint is never loaded: the previous one is used
    data = p2.read_bytes()
    p2.write_bytes(data[: len(data) // 2])
    assert store.latest_valid(sd, "abc") == (4, p1)
    with pytest.raises(CheckpointError, match=r"step_00000008.pt: truncated or overwritten \(\d+ bytes, manifest says \d+\)"):
        store.load(p2, "abc")
    # a checkpoint written for another spec is refused, naming both fingerprints
    with pytest.raises(CheckpointError, match=r"written for pre-training fingerprint abc, but this spec's fingerprint is def; refusing"):
        store.load(p1, "def")
    # without its manifest (interrupted write) it does not exist
    (sd.ckpt / "step_00000004.json").unlink()
    assert store.latest_valid(sd, "abc") is None
    assert json.loads((sd.ckpt / "step_00000008.json").read_text())["git_commit"]


def _fp(run) -> str:
    return run.pretrain_fingerprint


def test_fingerprint_ignores_runtime_and_feature_choices_but_not_learning():
    a = tiny_run()
    assert a.pretrain_fingerprint == _fp(tiny_run(pretrain={"runtime": {"workers": 1, "checkpoint_every": 7}}))
    assert a.pretrain_fingerprint == _fp(tiny_run(ddpm={"features": {"timesteps": [100]}}, data={"label_ratio": 0.4}, seed=3))
    # the same schedule spelled as a ratio is the same pre-training
    assert a.pretrain_fingerprint == _fp(
        tiny_run(pretrain={"iterations": {"archive": None, "homogeneous": None, "total": 24, "homogeneous_ratio": 0.5}}))
    assert a.pretrain_fingerprint != _fp(tiny_run(pretrain={"seed": 1}))
    assert a.pretrain_fingerprint != _fp(tiny_run(ddpm={"unet": {"overrides": {"dropout": 0.1}}}))
    assert a.pretrain_fingerprint != _fp(tiny_run(pretrain={"iterations": {"archive": 6, "homogeneous": 18}}))


def test_bad_pretrain_specs_are_refused_with_the_key(tmp_path):
    from rsseg.runspec import load_run

    cases = [
        ("ddpm: {unet: {preset: huge}}", r"ddpm.unet.preset: unknown UNet preset 'huge'; expected one of tiny, ho256, sr3"),
        ("ddpm: {optim: {warmup_iterations: 500}}\npretrain: {iterations: {archive: 100, homogeneous: 0}}",
         r"ddpm.optim.warmup_iterations: warm-up of 500 iterations is longer than the whole pre-training \(100 iterations"),
        ("pretrain: {iterations: {total: 100, homogeneous_ratio: 1.2}}", r"pretrain.iterations: homogeneous_ratio must be within \[0, 1\], got 1.2"),
        ("pretrain: {iterations: {total: 100, homogeneous_ratio: -0.1}}", r"homogeneous_ratio must be within \[0, 1\], got -0.1"),
        ("ddpm: {unet: {overrides: {layers_per_blok: 3}}}", r"ddpm.unet.overrides: unknown UNet2DModel argument 'layers_per_blok'; did you mean 'layers_per_block'"),
    ]
    for i, (text, pattern) in enumerate(cases):
        f = tmp_path / f"r{i}.yaml"
        f.write_text(text + "\n")
        with pytest.raises(ConfigError, match=pattern):
            load_run(f)


# -- trunks: shared archive phases (rsseg.checkpoints.identity) ----------------------------------------

def test_runs_of_one_archive_phase_share_a_trunk_whatever_their_target_and_length():
    from rsseg.checkpoints.identity import lineage

    run = tiny_run()  # 12 archive + 12 homogeneous
    longer = tiny_run(pretrain={"iterations": {"archive": 20, "homogeneous": 4}})
    other_target = tiny_run(data={"synthetic": {"scenes": 4}})
    archive_only = tiny_run(pretrain={"iterations": {"archive": 12, "homogeneous": 0}})
    archive_only_other = tiny_run(data={"synthetic": {"scenes": 4}}, pretrain={"iterations": {"archive": 12, "homogeneous": 0}})
    trunk = lineage(run).trunk
    assert trunk and lineage(longer).trunk == lineage(other_target).trunk == trunk
    assert (lineage(run).switch, lineage(longer).switch) == (12, 20)
    # what the archive phase depends on makes another trunk
    assert lineage(tiny_run(pretrain={"seed": 1})).trunk != trunk
    assert lineage(tiny_run(ddpm={"optim": {"lr": 2e-3}})).trunk != trunk
    assert lineage(tiny_run(data={"synthetic": {"archive_scenes": 2}})).trunk != trunk
    # the fingerprint: trunk + switch (+ the homogeneous phase); an archive-only run is the trunk at its length
    assert len({run.pretrain_fingerprint, longer.pretrain_fingerprint, other_target.pretrain_fingerprint}) == 3
    assert archive_only.pretrain_fingerprint == archive_only_other.pretrain_fingerprint != run.pretrain_fingerprint


def test_a_schedule_tied_to_the_total_is_not_shared_and_says_why():
    from rsseg.checkpoints.identity import lineage

    cosine = tiny_run(ddpm={"optim": {"after_warmup": "cosine"}})
    lin = lineage(cosine)
    assert lin.trunk is None and "after_warmup: cosine ties the learning rate to the total iterations" in lin.why
    homogeneous_only = lineage(tiny_run(pretrain={"iterations": {"archive": 0, "homogeneous": 12}}))
    assert homogeneous_only.trunk is None and homogeneous_only.why == "no archive phase"


def test_a_torn_trunk_point_is_passed_over_for_the_previous_complete_one(tmp_path):
    tdir = tmp_path / "trunks" / "ddpm-t1"
    state = {"model": {"w": torch.arange(4.0)}}
    for step in (4, 12, 20):
        store.save(store.trunk_point(tdir, step), {**state, "step": step}, "t1", step)
    assert store.trunk_points(tdir, "t1") == [4, 12, 20]
    assert store.latest_trunk_point(tdir, "t1", 12) == (12, store.trunk_point(tdir, 12))
    p12 = store.trunk_point(tdir, 12)
    p12.write_bytes(p12.read_bytes()[:40])  # a trunk killed while writing its point
    assert store.latest_trunk_point(tdir, "t1", 12) == (4, store.trunk_point(tdir, 4))
    assert store.latest_trunk_point(tdir, "t1", 3) is None
    assert store.trunk_points(tdir, "other") == []  # another trunk's points are not this one's
