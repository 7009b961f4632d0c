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


def gen_pth(tmp_path, name="I190000_E97_gen.pth", mutate=None):
    """A DDPM-CD-format generator checkpoint: denoise_fn.<UNet keys> + the schedule's buffers."""
    state = {f"denoise_fn.{k}": v for k, v in sr3_state().state_dict().items()}
    betas = torch.linspace(1e-6, 1e-2, 2000, dtype=torch.float64)
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
    assert state["objective"]["schedule"] == {"preset": None, "kind": "linear", "train_steps": 2000, "beta_start": 1e-6,
                                              "beta_end": 1e-2}
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
