"""Paper scale without a GPU: the paper's networks and schedule, the segmentor width that gives its
16.3 M, the device policy's errors, Ray Train resources that fit a node, and the paper profile's
dry runs (devices, GPU shares, parameter counts)."""

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, tiny_run
from rsseg.cli import app
from rsseg.device import check_sweep_resources, resolve
from rsseg.errors import ConfigError
from rsseg.heads.mlp import MlpSegmentor, segmentor_parameters
from rsseg.methods.ddpm.encoder import DdpmEncoder
from rsseg.methods.ddpm.noise import ForwardProcess
from rsseg.methods.ddpm.spec import DdpmFeaturesSpec, NoiseScheduleSpec
from rsseg.methods.ddpm.unet import build_preset, parameter_count, unet_config
from rsseg.runspec import load_sweep
from rsseg.sweep.plan import describe, make_plan


@pytest.mark.parametrize("preset, count", [("tiny", 4_728_323), ("ho256", 113_673_219), ("sr3", 97_814_979)])
def test_preset_parameter_counts_on_the_meta_device(preset, count):
    assert parameter_count(preset) == count


def test_sr3_is_ddpm_cds_network():
    cfg = unet_config("sr3")
    assert cfg["block_out_channels"] == (64, 128, 256, 512, 512) and cfg["layers_per_block"] == 2 and cfg["dropout"] == 0.2
    assert cfg["time_embedding_dim"] == 64 and cfg["conditioning"] == {"kind": "noise_level", "mlp_hidden": 256, "skip_time_act": True}
    with torch.device("meta"):
        net = build_preset("sr3")
    assert tuple(net.time_embedding.linear_1.weight.shape) == (256, 64) and tuple(net.time_embedding.linear_2.weight.shape) == (64, 256)
    assert all(r.skip_time_act for b in net.down_blocks for r in b.resnets)
    assert net.down_blocks[4].attentions[0].heads == 1 and not hasattr(net.down_blocks[3], "attentions")  # attention at 16^2 only


def test_ddpm_cd_schedule_and_what_its_timesteps_mean():
    cd = NoiseScheduleSpec(preset="ddpm_cd")
    assert (cd.kind, cd.train_steps, cd.beta_start, cd.beta_end) == ("linear", 2000, 1e-6, 1e-2)
    p = ForwardProcess(cd, "noise_level")
    assert p.signal(0) == 1.0 and p.signal(150) == pytest.approx(0.9724, abs=1e-4) and p.max_timestep == 2000
    ours = ForwardProcess(NoiseScheduleSpec(), "timestep")
    assert ours.signal(150) == pytest.approx(0.8865, abs=1e-4)  # the same t is ~4x the noise variance here
    x0, noise = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    xt, g = p.noised(x0, noise, torch.tensor([150, 150]))
    assert torch.allclose(g, torch.tensor([p.signal(150)] * 2)) and torch.allclose(xt, (1 - g[0] ** 2).sqrt() * noise)
    xt, g, eps = p.training_draw(x0, torch.Generator().manual_seed(0))
    assert g.dtype == torch.float32 and ((g > 0) & (g <= 1)).all()


def test_the_segmentor_width_and_reading_that_give_the_papers_16_3m():
    with torch.device("meta"):
        unet = build_preset("sr3")
    one_map = DdpmEncoder(unet, NoiseScheduleSpec(preset="ddpm_cd"), DdpmFeaturesSpec(timesteps=[50, 100, 150], maps=[-1]), "x",
                          conditioning="noise_level")
    assert segmentor_parameters(one_map.feature_info, 12, "map", 1024) == 16_315_532  # 16.3 M: the paper's Table 1/3/4
    assert segmentor_parameters(one_map.feature_info, 12, "map") == 16_747_404
    all_maps = DdpmEncoder(unet, NoiseScheduleSpec(preset="ddpm_cd"), DdpmFeaturesSpec(timesteps=[50, 100, 150]), "x",
                           conditioning="noise_level")
    assert round(segmentor_parameters(all_maps.feature_info, 12, "map") / 1e6, 1) == 74.0
    with torch.device("meta"):
        head = MlpSegmentor(one_map.feature_info, 12, fuse_hidden=1024)
    assert sum(p.numel() for p in head.parameters()) == 16_315_532


def test_device_policy_refuses_cuda_without_one_and_never_falls_back():
    assert resolve("cpu").type == "cpu"
    assert resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"runtime.device: cuda, but torch .* sees no CUDA device"):
            resolve("cuda")
    with pytest.raises(ConfigError, match=r"runtime.device: cpu, but each trial reserves 0.25 GPU"):
        check_sweep_resources("cpu", 0.25, None)
    with pytest.raises(ConfigError, match=r"runtime.device: cuda, but each trial reserves no GPU \(search.resources.gpu: 0\)"):
        check_sweep_resources("cuda", 0.0, None)
    with pytest.raises(ConfigError, match=r"search.resources.gpu: each trial reserves 1 GPU but the Ray cluster has none"):
        check_sweep_resources("auto", 1.0, 0.0)
    check_sweep_resources("auto", 0.25, 4.0)


def test_paper_dry_run_shows_device_gpu_share_preset_params_and_pretraining(workdir):
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "sweep", str(REPO / "sweeps" / "noise_ablation.yaml"),
                                   "--profile", "paper", "--dry-run"])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if line.strip().startswith("18 "))
    assert "cuda (0.25 GPU)" in row and "sr3" in row and "97.8 M / 16.3 M (16.3 M)" in row
    plan = make_plan(load_sweep(REPO / "sweeps" / "noise_ablation.yaml", "paper"))
    assert {t.pretrain_fingerprint for t in plan.trials} == {plan.pretrainings[0].fingerprint}
    assert plan.trials[0].run["ddpm"]["schedule"]["train_steps"] == 2000 and plan.trials[0].run["runtime"]["device"] == "cuda"
    assert plan.trials[0].run["runtime"]["loader_workers"] == 4  # a GPU is not left waiting on synchronous window reads
    assert not list(workdir.root.glob("**/*.db"))


def test_a_sweeps_own_gpu_request_wins_over_the_profile():
    assert load_sweep(REPO / "sweeps" / "sota_gid.yaml", "paper").spec.search.resources.gpu == 1
    assert load_sweep(REPO / "sweeps" / "sota_minifrance.yaml", "paper").spec.search.resources.gpu == 0.5
    assert load_sweep(REPO / "sweeps" / "sota_gid.yaml", "smoke").spec.search.resources.gpu == 0


def test_label_ratio_without_imagenet_weights_plans_the_rest_and_skips_in_init_and_public_mae(workdir, monkeypatch):
    monkeypatch.delenv("RSSEG_CONVNEXT_WEIGHTS", raising=False)
    plan = make_plan(load_sweep(REPO / "sweeps" / "label_ratio.yaml", "paper"))
    assert {t.run["method"] for t in plan.trials} == {"convnext_random", "mae", "scalemae", "ma3e", "ddpm"} and len(plan.trials) == 108
    assert sum(t.run["ddpm"]["features"]["weights"] == "random" for t in plan.trials if t.run["method"] == "ddpm") == 18  # the reference UNet
    # IN-init without local weights, and MAE's public weights before they are imported: skipped with the reason
    reasons = [r for _, r in plan.skipped]
    assert len(reasons) == 54 and sum("convnext_imagenet needs local ImageNet ConvNeXt weights" in r for r in reasons) == 18
    assert sum("public weights 'mae_vitb16' are not imported" in r for r in reasons) == 18
    assert sum("public weights 'scalemae_vitl' are not imported" in r for r in reasons) == 18
    assert "skipped: 54 grid cells" in describe(plan)


def test_an_imagenet_weights_file_of_another_network_fails_at_plan_time_naming_it(tmp_path, monkeypatch):
    from rsseg_baselines.convnext.encoder import ConvNextEncoder
    from rsseg_baselines.convnext.spec import ConvNextSpec

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    monkeypatch.setenv("RSSEG_CONVNEXT_WEIGHTS", str(empty))
    with pytest.raises(ConfigError, match=r"label_ratio.yaml: convnext.weights: .*empty.safetensors is not a readable state dict"):
        make_plan(load_sweep(REPO / "sweeps" / "label_ratio.yaml", "paper"))
    from safetensors.torch import save_file

    pico = {k: v.contiguous() for k, v in ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=False).backbone.state_dict().items()}
    wrong = tmp_path / "pico.safetensors"
    save_file(pico, str(wrong))
    monkeypatch.setenv("RSSEG_CONVNEXT_WEIGHTS", str(wrong))
    with pytest.raises(ConfigError, match=r"label_ratio.yaml: convnext.weights: .*pico.safetensors does not fit this ConvNeXt: missing 279 key\(s\): encoder.stages"):
        make_plan(load_sweep(REPO / "sweeps" / "label_ratio.yaml", "paper"))


def test_trials_and_pretraining_workers_follow_one_gpu_policy():
    """`device.gpu_share` decides both requests: the default share, and the same three refusals
    worded for the key that makes the request."""
    from rsseg import raycluster
    from rsseg.config.specs import PretrainRuntimeSpec

    gpus = raycluster.Capacity(cpus=8.0, gpus=2.0, node_cpus=8.0, node_gpus=2.0)
    cpus = raycluster.Capacity(cpus=8.0, gpus=0.0, node_cpus=8.0, node_gpus=0.0)
    assert raycluster.worker_resources(PretrainRuntimeSpec(), "auto", capacity=gpus).gpus == 1.0  # auto where GPUs are
    assert raycluster.worker_resources(PretrainRuntimeSpec(), "auto", capacity=cpus).gpus == 0.0
    with pytest.raises(ConfigError, match=r"^runtime.device: cpu, but each pre-training worker reserves 1 GPU "
                                          r"\(pretrain.runtime.gpus_per_worker\)"):
        raycluster.worker_resources(PretrainRuntimeSpec(gpus_per_worker=1), "cpu", capacity=gpus)
    with pytest.raises(ConfigError, match=r"^runtime.device: cuda, but each pre-training worker reserves no GPU"):
        raycluster.worker_resources(PretrainRuntimeSpec(gpus_per_worker=0), "cuda", capacity=gpus)
    with pytest.raises(ConfigError, match=r"^pretrain.runtime.gpus_per_worker: each pre-training worker reserves 1 GPU but the "
                                          r"Ray cluster has none"):
        raycluster.worker_resources(PretrainRuntimeSpec(), "cuda", capacity=cpus)


def test_train_worker_requests_always_fit_on_one_node():
    from rsseg import raycluster
    from rsseg.config.specs import PretrainRuntimeSpec

    nodes = raycluster.Capacity(cpus=2.0, gpus=0.0, node_cpus=1.0, node_gpus=0.0)  # two 1-CPU nodes
    one = raycluster.worker_resources(PretrainRuntimeSpec(workers=1), "auto", capacity=nodes)
    assert (one.cpus, one.gpus) == (1.0, 0.0)  # not both CPUs: no node has two
    two = raycluster.worker_resources(PretrainRuntimeSpec(workers=2), "auto", capacity=nodes)
    assert two.cpus == 1.0 and raycluster.concurrent_pretrainings(PretrainRuntimeSpec(workers=1), "auto", 3, nodes) == 2
    with pytest.raises(ConfigError, match=r"pretrain.runtime.cpus_per_worker: 2 CPUs per worker, but the largest node of the Ray cluster has 1"):
        raycluster.worker_resources(PretrainRuntimeSpec(workers=1, cpus_per_worker=2), "auto", capacity=nodes)
    with pytest.raises(ConfigError, match=r"each pre-training worker reserves 1 GPU but the Ray cluster has none"):
        raycluster.worker_resources(PretrainRuntimeSpec(), "cuda", capacity=nodes)


def test_gpu_capacity_is_checked_for_all_workers_of_all_concurrent_pretrainings():
    """workers x GPUs per worker (x concurrent pre-trainings) against the cluster's GPUs, before
    anything waits for GPUs that will never come."""
    from rsseg import raycluster
    from rsseg.config.specs import PretrainRuntimeSpec

    machine = raycluster.Capacity(cpus=16.0, gpus=1.0, node_cpus=16.0, node_gpus=1.0)  # one 1-GPU machine
    one = raycluster.worker_resources(PretrainRuntimeSpec(workers=1), "cuda", capacity=machine)
    assert (one.gpus, one.cpus) == (1.0, 16.0)
    with pytest.raises(ConfigError, match=r"^pretrain.runtime.workers: 2 workers x 1 GPU need 2 GPUs, the Ray cluster has 1; "
                                          r"use --workers 1 \(or --set pretrain.runtime.workers=1\)$"):
        raycluster.worker_resources(PretrainRuntimeSpec(workers=2), "cuda", capacity=machine)
    with pytest.raises(ConfigError, match=r"1 workers x 1 GPU x 2 concurrent pre-trainings need 2 GPUs, the Ray cluster has 1"):
        raycluster.worker_resources(PretrainRuntimeSpec(workers=1), "cuda", concurrent=2, capacity=machine)
    # the sweep runs them one by one
    assert raycluster.concurrent_pretrainings(PretrainRuntimeSpec(workers=1), "cuda", 3, machine) == 1
    half = raycluster.worker_resources(PretrainRuntimeSpec(workers=2, gpus_per_worker=0.5), "cuda", capacity=machine)  # two share it
    assert half.gpus == 0.5


def test_every_run_tags_what_its_timesteps_mean():
    run = tiny_run(ddpm={"features": {"timesteps": [0, 50]}})
    assert run.plugin.run_tags(run)["sqrt_abar"] == "0=1.0000,50=0.9849"
