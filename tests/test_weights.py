"""Released DDPM weights in: DDPM-CD's SR3 state dict mapped onto the sr3 preset (checked
against an SR3 forward written from its documented structure), diffusers directories both ways,
the store's imported weights used as frozen features, and one-line errors for bad weights."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_run
from rsseg.cli import app
from rsseg.errors import CheckpointError, ConfigError
from rsseg.methods.ddpm.unet import build_unet
from rsseg.methods.ddpm.weights import SR3_SCHEDULE_BUFFERS, convert_sr3, export_diffusers, import_diffusers, sr3_key_map, _sr3_layout
from rsseg.weights import import_weights
from sr3_reference import SR3UNet, randomise


def sr3_state(init_conv=True, seed=0):
    return randomise(SR3UNet(init_conv=init_conv), seed).eval()


@pytest.mark.parametrize("init_conv", [True, False], ids=["init_conv", "downs.0"])
def test_sr3_weights_map_onto_the_sr3_preset_exactly(init_conv):
    """Every source key used once (qkv's thirds aside), every target key filled, and the
    converted diffusers UNet computes what the SR3 network computes (noise-level conditioning,
    no activation before the time projection, one-head attention)."""
    ref = sr3_state(init_conv)
    cfg, state = convert_sr3(ref.state_dict(), sample_size=64)
    net = build_unet(cfg).eval()
    net.load_state_dict(state)  # strict: exactly the UNet's keys
    mapping = sr3_key_map(_sr3_layout(ref.state_dict()))
    used = [m.source for m in mapping if m.source is not None and m.transform not in ("q", "k", "v")]
    qkv = {m.source for m in mapping if m.transform in ("q", "k", "v")}
    assert sorted(used + sorted(qkv)) == sorted(ref.state_dict())
    x, g = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0.97, 0.31])
    with torch.no_grad():
        torch.testing.assert_close(net(x, g).sample, ref(x, g), rtol=1e-4, atol=1e-5)


def gen_pth(tmp_path, name="I190000_E97_gen.pth", mutate=None, net=None, betas=None):
    """A DDPM-CD-format generator checkpoint: denoise_fn.<UNet keys> + the schedule's buffers
    (DDPM-CD saves its GaussianDiffusion's state dict: both)."""
    state = {f"denoise_fn.{k}": v for k, v in (net or sr3_state()).state_dict().items()}
    betas = torch.linspace(1e-6, 1e-2, 2000, dtype=torch.float64) if betas is None else betas
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    state.update({"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(), "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float()})
    if mutate:
        mutate(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_ddpm_cd_checkpoint_imports_once_with_its_schedule_and_lists(tmp_path, workdir):
    path = gen_pth(tmp_path)
    first, new = import_weights(path, "ddpm-cd", "ddpm_cd_ge", workdir)
    again, new_again = import_weights(path, "ddpm-cd", "ddpm_cd_ge", workdir)
    assert new and not new_again and first.fingerprint == again.fingerprint and first.fingerprint.startswith("import-")
    state = first.load()
    assert state["objective"]["schedule"] == {"preset": "ddpm_cd", "kind": "linear", "train_steps": 2000, "beta_start": 1e-6,
                                              "beta_end": 1e-2}
    assert state["trained_schedule"] == {"kind": "linear", "train_steps": 2000, "beta_start": 1e-6, "beta_end": 1e-2}
    assert state["objective"]["unet"]["conditioning"]["kind"] == "noise_level" and state["source"]["format"] == "ddpm-cd"
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "weights", "list"])
    assert out.exit_code == 0 and "ddpm_cd_ge" in out.output and "ddpm-cd" in out.output and str(path) in out.output
    other = gen_pth(tmp_path, "other_gen.pth", mutate=lambda s: s["denoise_fn.init_conv.bias"].add_(1.0))
    with pytest.raises(CheckpointError, match=r"--name 'ddpm_cd_ge': other weights are already imported under this name"):
        import_weights(other, "ddpm-cd", "ddpm_cd_ge", workdir)


def test_converted_then_exported_round_trip_gives_identical_outputs(tmp_path, workdir):
    found, _ = import_weights(gen_pth(tmp_path), "ddpm-cd", "ge", workdir)
    state = found.load()
    export_diffusers(state, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel" and config["rsseg"]["conditioning"]["kind"] == "noise_level"
    assert (tmp_path / "exported" / "diffusion_pytorch_model.safetensors").exists()
    back = import_diffusers(tmp_path / "exported")
    a, b = build_unet(state["objective"]["unet"]).eval(), build_unet(back["objective"]["unet"]).eval()
    a.load_state_dict(state["model"])
    b.load_state_dict(back["model"])
    x, g = torch.randn(1, 3, 64, 64), torch.tensor([0.9])
    with torch.no_grad():
        assert torch.equal(a(x, g).sample, b(x, g).sample)
    assert back["objective"]["schedule"] == state["objective"]["schedule"]


@pytest.mark.parametrize("mutate, pattern", [
    (lambda s: s.pop("denoise_fn.downs.1.res_block.block2.block.3.weight"), r"missing source key\(s\) downs.1.res_block.block2.block.3.weight"),
    (lambda s: s.__setitem__("denoise_fn.extra.head.weight", torch.zeros(3)), r"unexpected key\(s\) extra.head.weight"),
    (lambda s: s.__setitem__("denoise_fn.mid.0.attn.out.weight", torch.zeros(64, 64, 3, 3)),
     r"mis-shaped key\(s\): mid.0.attn.out.weight \(64, 64, 3, 3\) -> mid_block.attentions.0.to_out.0.weight expects \(64, 64\)"),
])
def test_bad_sr3_keys_are_one_line_errors_naming_them(tmp_path, workdir, mutate, pattern):
    with pytest.raises(CheckpointError, match=r"_gen.pth: SR3 weights .*" + pattern):
        import_weights(gen_pth(tmp_path, mutate=mutate), "ddpm-cd", "bad", workdir)


def test_not_a_checkpoint_and_unknown_format_are_refused(tmp_path, workdir):
    junk = tmp_path / "junk_gen.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk_gen.pth: not a readable torch checkpoint"):
        import_weights(junk, "ddpm-cd", "j", workdir)
    with pytest.raises(ConfigError, match=r"--format 'onnx': unknown weights format; expected one of ddpm-cd, diffusers"):
        import_weights(junk, "onnx", "j", workdir)
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "weights", "import", str(tmp_path / "none.pth"), "--format",
                                   "ddpm-cd", "--name", "n"])
    assert out.exit_code == 2 and out.output.strip().endswith("none.pth: weights not found")


def test_imported_weights_give_frozen_features_by_name_with_their_schedule(tmp_path, workdir):
    from rsseg import finetune

    import_weights(gen_pth(tmp_path), "ddpm-cd", "ge", workdir)
    overrides = {"block_out_channels": [32, 64, 64, 64, 64], "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D"],
                 "up_block_types": ["AttnUpBlock2D"] + ["UpBlock2D"] * 4}
    run = tiny_run(data={"tile_size": 64}, ddpm={"unet": {"preset": "sr3", "overrides": overrides}, "schedule": {"preset": "ddpm_cd"},
                                                 "features": {"weights": "ge", "timesteps": [0, 150], "maps": [-1]}},
                   finetune={"iterations": 2, "eval_every": 2, "log_predictions": 0})
    assert not run.needs_pretraining
    p = finetune.prepare(run, workdir)
    assert p.encoder.cache_id is not None and p.encoder.weights_id.startswith("import-")
    assert p.encoder.signal_scales[150] == pytest.approx(0.9724, abs=1e-4)  # DDPM-CD's schedule and indexing
    imported = torch.load(workdir.checkpoints / "imported" / "ge" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(p.encoder.unet.state_dict()[k], v) for k, v in imported.items())
    wrong = run.model_copy(update={"ddpm": run.ddpm.model_copy(update={"schedule": type(run.ddpm.schedule)()})})
    with pytest.raises(ConfigError, match=r"ddpm.schedule: the imported weights 'ge' were trained with a linear schedule 1e-06 -> 0.01 over 2000"):
        finetune.prepare(wrong, workdir)


# ---------------------------------------------------------------------------------------------- DDPM-CD's release as it is


def test_ddpm_cds_released_network_maps_onto_the_128_wide_preset():
    """DDPM-CD's config since 2022-04-25 (inner channel 128, multipliers 1, 2, 4, 8, 8, attention
    at 16², 256 px): its state dict (shapes only, on the meta device) converts onto sr3_ddpm_cd."""
    from rsseg.methods.ddpm.unet import unet_config

    with torch.device("meta"):
        release = SR3UNet(inner_channel=128, channel_mults=(1, 2, 4, 8, 8), attn_res=(16,), image_size=256, dropout=0.2)
    cfg, state = convert_sr3(release.state_dict())
    preset = unet_config("sr3_ddpm_cd")
    assert {k: cfg[k] for k in preset} == preset
    with torch.device("meta"):
        assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in build_unet(preset).parameters()) == 391_066_499


def wide(norm_groups=32, seed=3):
    """A 128-wide SR3 (the release's inner channel and embedding sizes, fewer levels' width to stay small)."""
    return randomise(SR3UNet(inner_channel=128, channel_mults=(1, 1, 1, 2, 2), attn_res=(4,), image_size=64, norm_groups=norm_groups),
                     seed).eval()


def test_a_128_wide_release_with_cosine_betas_imports_and_computes_what_sr3_computes(tmp_path, workdir):
    from rsseg.methods.ddpm.weights import cosine_betas

    ref = wide()
    path = gen_pth(tmp_path, net=ref, betas=cosine_betas(2000).float())
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "weights", "import", str(path), "--format", "ddpm-cd", "--name", "rel"])
    assert out.exit_code == 0, out.output
    assert "network: SR3, inner channel 128, channels 128, 128, 128, 256, 256" in out.output
    assert "GroupNorm: 32 groups assumed" in out.output and "--norm-groups N" in out.output
    assert "schedule in the checkpoint: cosine over 2000 steps" in out.output
    assert "schedule for its features: linear 1e-06 -> 0.01 over 2000 steps (DDPM-CD's change-detection schedule" in out.output
    state = torch.load(workdir.checkpoints / "imported" / "rel" / "final.pt", weights_only=True)
    assert state["objective"]["schedule"]["kind"] == "linear" and state["trained_schedule"]["kind"] == "cosine"
    assert state["objective"]["unet"]["time_embedding_dim"] == 128 and state["objective"]["unet"]["conditioning"]["mlp_hidden"] == 512
    net = build_unet(state["objective"]["unet"]).eval()
    net.load_state_dict(state["model"])
    x, g = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0.97, 0.31])
    with torch.no_grad():
        torch.testing.assert_close(net(x, g).sample, ref(x, g), rtol=1e-4, atol=1e-5)
    # its saved schedule, when asked for: the same file read another way is other weights
    found, new = import_weights(path, "ddpm-cd", "rel_cosine", workdir, {"schedule": "checkpoint"})
    assert new and found.fingerprint != import_weights(path, "ddpm-cd", "rel", workdir)[0].fingerprint
    assert found.load()["objective"]["schedule"]["kind"] == "cosine"


def test_norm_groups_are_given_on_import_not_guessed(tmp_path, workdir):
    """A state dict cannot say its GroupNorm groups: a 16-group network imported with the
    default 32 computes something else (the notes said what was assumed); --norm-groups 16 matches."""
    ref = wide(norm_groups=16)
    path = gen_pth(tmp_path, net=ref)
    x, g = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)), torch.tensor([0.9])
    outputs = {}
    for name, options in (("assumed", {}), ("given", {"norm_groups": 16})):
        state = import_weights(path, "ddpm-cd", name, workdir, options)[0].load()
        net = build_unet(state["objective"]["unet"]).eval()
        net.load_state_dict(state["model"])
        with torch.no_grad():
            outputs[name] = net(x, g).sample
        assert any(("16 groups (given)" if options else "32 groups assumed") in n for n in state["notes"])
    with torch.no_grad():
        expected = ref(x, g)
    torch.testing.assert_close(outputs["given"], expected, rtol=1e-4, atol=1e-5)
    assert (outputs["assumed"] - expected).abs().max() > 1e-2


@pytest.mark.parametrize("fmt, options, message", [
    ("diffusers", {"norm_groups": 16}, r"--norm-groups: the diffusers format does not read it"),
    ("ddpm-cd", {"schedule": "quadratic"}, r"--schedule 'quadratic': expected checkpoint or one of ddpm, ddpm_cd"),
    ("ddpm-cd", {"norm_groups": 7}, r"--norm-groups 7: does not divide the checkpoint's 32 channels"),
])
def test_import_options_are_checked_in_one_line(fmt, options, message, tmp_path, workdir):
    with pytest.raises((ConfigError, CheckpointError), match=message):
        import_weights(gen_pth(tmp_path), fmt, "x", workdir, options)


def test_pretraining_continues_from_the_128_wide_release_on_the_runs_schedule(tmp_path, workdir):
    """pretrain.init: the network is the imported one (128 wide, whatever ddpm.unet says), its
    weights the starting point, the run's own (linear) schedule, a fingerprint that covers the
    import; a few steps run and the plan counts the imported network's parameters."""
    from rsseg.methods.ddpm.weights import cosine_betas
    from rsseg.checkpoints import store
    from rsseg.pretrain.trainer import Trainer, TrainPlan

    ref = wide()
    import_weights(gen_pth(tmp_path, net=ref, betas=cosine_betas(2000).float()), "ddpm-cd", "rel", workdir)
    run = tiny_run(data={"tile_size": 64}, ddpm={"unet": {"preset": "sr3"}, "schedule": {"preset": "ddpm_cd"}},
                   pretrain={"init": "rel", "iterations": {"archive": 0, "homogeneous": 4}, "batch_size": 2, "ema": {"enabled": True},
                             "runtime": {"workers": 1, "checkpoint_every": 4, "log_every": 4, "samples": 0}})
    assert run.pretrain_fingerprint != tiny_run(data={"tile_size": 64}, ddpm={"unet": {"preset": "sr3"}},
                                                pretrain={"iterations": {"archive": 0, "homogeneous": 4}}).pretrain_fingerprint
    encoder, _ = run.plugin.parameter_counts(run, 3, 7, run.head_name)
    assert encoder == sum(p.numel() for p in build_unet(store.imported_objective(workdir, "rel")["unet"]).parameters())
    sdir = store.StoreDir.for_run(run, workdir)
    plan = TrainPlan(fingerprint=run.pretrain_fingerprint, store_root=str(sdir.root), workdir=str(workdir.root),
                     run=run, in_channels=3, counts=run.pretrain.iterations.counts(), tracking_uri="", mlflow_run_id="")
    trainer = Trainer(plan, 0, 1, torch.device("cpu"))
    imported = store.find_imported(workdir, "rel").load()
    assert trainer.resume() is None  # nothing to resume: the starting point is the release
    assert all(torch.equal(trainer.net.state_dict()[k], v) for k, v in imported["model"].items())
    trainer.fit()
    final = store.find(run, workdir).load()
    assert final["objective"]["unet"]["block_out_channels"] == [128, 128, 128, 256, 256] and final["step"] == 4
    assert final["objective"]["schedule"]["kind"] == "linear"  # the run's, not the release's cosine
    assert set(final["model"]) == set(imported["model"])
    drift = max((final["model"][k] - v).abs().max().item() for k, v in imported["model"].items())
    assert 0 < drift < 0.05  # 4 AdamW steps (lr <= 1e-3) away from the release


def test_load_checked_allows_only_the_listed_keys():
    """The one weights-loading helper: the listed missing and left-over keys pass; any other missing
    or left-over key raises the caller's error, naming it."""
    import torch

    from rsseg.errors import CheckpointError
    from rsseg.tensorfile import load_checked

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    state = dict(net.state_dict())
    partial = {k: v for k, v in state.items() if k != "1.bias"} | {"decoder.w": torch.zeros(1)}
    load_checked(net, partial, "ok", error=CheckpointError, allowed_missing=frozenset({"1.bias"}),
                 allowed_unexpected=frozenset({"decoder.w"}))
    with pytest.raises(CheckpointError, match=r"^x: missing 1 key\(s\): 1.bias$"):
        load_checked(net, {k: v for k, v in state.items() if k != "1.bias"}, "x", error=CheckpointError)
    with pytest.raises(CheckpointError, match=r"^x: unexpected 1 key\(s\): decoder.w2$"):
        load_checked(net, state | {"decoder.w": torch.zeros(1), "decoder.w2": torch.zeros(1)}, "x", error=CheckpointError,
                     allowed_unexpected=frozenset({"decoder.w"}))  # exact names, not prefixes
    with pytest.raises(CheckpointError, match=r"^x: unexpected 1 key\(s\): set.aside$"):
        load_checked(net, state, "x", error=CheckpointError, extra_unexpected=["set.aside"])


def test_key_problems_is_the_one_rule_of_allowed_keys():
    """Names are allowed exactly, prefixes when they end in "."; what is left is counted and listed
    (four at most), missing before unexpected: the wording of every weights loader's error."""
    from rsseg.tensorfile import key_problems

    assert key_problems(["norms.0.w", "norms.1.w"], ["classifier.w"], allowed_missing=["norms."], allowed_unexpected=["classifier.w"]) == []
    assert key_problems(["norms0.w"], [], allowed_missing=["norms"]) == ["missing 1 key(s): norms0.w"]  # "norms" is a name, not a prefix
    assert key_problems(list("fedcba"), ["x.y"], allowed_unexpected=["x."]) == ["missing 6 key(s): a, b, c, d ..."]
    assert key_problems(["a"], ["z", "y"]) == ["missing 1 key(s): a", "unexpected 2 key(s): y, z"]
