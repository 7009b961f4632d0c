"""Table 3's compared methods: ConvNeXt-B (+UPerNet), MAE and ScaleMAE ViTs, as plugins."""

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rsseg.cli import app
from rsseg.encoders import check_contract, count_parameters
from rsseg.errors import ConfigError
from rsseg.heads import NeckHead, build_head
from rsseg.heads.upernet import UperNetSegHead
from rsseg.methods import registry
from rsseg_baselines.convnext import weights as convnext_weights
from rsseg_baselines.vit import network as vit_network, rules as vit_rules, weights as vit_weights
from rsseg_baselines.convnext.encoder import ConvNextEncoder
from rsseg_baselines.convnext.spec import SIZES as CONVNEXT_SIZES, ConvNextSpec
from rsseg_baselines.vit.encoder import SimplePyramid, VitEncoder
from rsseg_baselines.vit.objective import MaeObjective, ScaleMaeObjective
from rsseg_baselines.vit.spec import MaeSpec, ScaleMaeSpec

from conftest import install_plugin, tiny_run, train_objective


def test_methods_are_plugins_and_listed():
    methods = registry()
    assert {"ddpm", "convnext_random", "convnext_imagenet", "mae", "scalemae", "ma3e", "segformer"} <= set(methods)
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in ("convnext_random", "convnext_imagenet", "mae", "scalemae", "ma3e", "segformer", "ddpm"):
        assert name in res.output
    assert "rsseg_baselines" in res.output  # where each comes from


BROKEN_PLUGIN = """
from rsseg.methods import Method

METHOD = Method(name="broken", summary="", label="Broken", encoder=lambda run, pretrained: None,
                checks=lambda run, other: [])
"""


def test_a_methods_hooks_are_functions_checked_when_the_method_is_made(tmp_path, monkeypatch):
    """Hooks are callables (no import strings): one the platform cannot call as it will is refused
    when the method is made, naming the method, the hook and what it must take; an installed
    plugin with such a hook is left out of the registry with that warning."""
    from rsseg.methods import Method

    ok = Method(name="x", summary="", label="X", encoder=lambda run, pretrained: None, tags=lambda run, extra=None: {},
                importers=(("fmt", lambda path, norm_groups=None: {}),))
    assert ok.build_encoder(None, None) is None and ok.run_tags(None) == {}
    with pytest.raises(TypeError, match=r"^method 'x': encoder must be a function of \(run, pretrained\), got 'my.module:build'$"):
        Method(name="x", summary="", label="X", encoder="my.module:build")
    with pytest.raises(TypeError, match=r"^method 'x': tags must be a function of \(run\), got <function"):
        Method(name="x", summary="", label="X", encoder=lambda run, pretrained: None, tags=lambda: {})
    with pytest.raises(TypeError, match=r"^method 'x': importer 'fmt' must be a function of \(path\)"):
        Method(name="x", summary="", label="X", encoder=lambda run, pretrained: None, importers=(("fmt", lambda: {}),))
    with pytest.raises(TypeError, match=r"^method 'x': encoder must be a function of \(run, pretrained\), got None$"):
        Method(name="x", summary="", label="X", encoder=None)

    install_plugin(tmp_path, monkeypatch, "broken_method", BROKEN_PLUGIN, "rsseg.methods", "broken = broken_method:METHOD")
    registry.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"method plugin 'broken' \(broken_method:METHOD\) failed to load: "
                                             r"method 'broken': checks must be a function of \(run\)"):
            methods = registry()
        assert "broken" not in methods and "ddpm" in methods
    finally:
        registry.cache_clear()


# ---------------------------------------------------------------------------------------------- parameter counts


def test_convnext_b_upernet_counts_the_papers_122m():
    with torch.device("meta"):  # counts without allocating or initialising 122 M parameters
        enc = ConvNextEncoder(ConvNextSpec(size="base"), 3, "x", imagenet=False)
        head = UperNetSegHead(enc.feature_info, 12, channels=512, auxiliary=True)
    total = count_parameters(enc) + count_parameters(head)
    assert total == 121_996_696, total
    assert round(total / 1e6, 1) == 122.0


def test_vit_b16_encoder_counts_85_8m():
    cfg = vit_network.mae_config(MaeSpec(size="base"), 224, 3)
    with torch.device("meta"):
        n = count_parameters(VitEncoder(cfg, (3, 5, 7, 11), "x"))
    assert round(n / 1e6, 1) == 85.8


def test_tiny_variants_pinned():
    assert count_parameters(ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=False)) == 269_232
    enc = VitEncoder(vit_network.mae_config(MaeSpec(size="pico"), 64, 3), (3, 5, 7, 11), "x")
    assert count_parameters(enc) == 418_368
    assert count_parameters(SimplePyramid(enc.feature_info)) == 49_472
    assert count_parameters(MaeObjective(MaeSpec(size="pico"), 64, 3).network) == 506_304


# ---------------------------------------------------------------------------------------------- feature contract


def test_encoders_obey_the_feature_contract():
    x = torch.randn(2, 3, 64, 64)
    cn = ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=False)
    check_contract(cn, x, cn(x))
    assert [fi.stride for fi in cn.feature_info] == [4, 8, 16, 32]
    v = VitEncoder(vit_network.mae_config(MaeSpec(size="pico"), 64, 3), (3, 5, 7, 11), "x")
    feats = v(x)
    check_contract(v, x, feats)
    neck = SimplePyramid(v.feature_info)
    pyramid = neck(feats)
    check_contract(neck, x, pyramid)
    assert [fi.stride for fi in neck.feature_info] == [2, 4, 8, 16]  # patch 8: p/4, p/2, p, 2p


def test_vit_encoder_blocks_equal_transformers_forward():
    """Our early-exit forward (no masking, original order) equals ViTMAEModel's hidden states."""
    cfg = vit_network.mae_config(MaeSpec(size="pico"), 32, 3)
    enc = VitEncoder(cfg, (3, 5, 7, 11), "x").eval()
    x = torch.randn(2, 3, 32, 32)
    n = (32 // 8) ** 2
    noise = torch.arange(n, dtype=torch.float32).expand(2, n)  # ascending noise: keep every patch, in order
    with torch.no_grad():
        ours = enc(x)
        hs = [x]
        h = enc.vit.embeddings(x, noise=noise)[0]
        for layer in enc.vit.layers:
            h = layer(h, None)
            hs.append(h)
    for b, f in zip((3, 5, 7, 11), ours):
        ref = hs[b + 1][:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
        torch.testing.assert_close(f, ref)


# ---------------------------------------------------------------------------------------------- MAE / ScaleMAE maths


def test_masking_keeps_exactly_a_quarter_of_patches():
    obj = MaeObjective(MaeSpec(size="pico"), 64, 3)
    x = torch.randn(3, 3, 64, 64)
    out = obj.network.vit(x, noise=obj.noise(x, torch.Generator().manual_seed(0)))
    n = 64
    assert out.last_hidden_state.shape[1] == 1 + n // 4  # cls + the 25 % kept
    assert out.mask.shape == (3, n) and out.mask.sum(1).tolist() == [n * 0.75] * 3


def _formula(dim, g, scale):
    """The 2-D sin-cos table written out element by element (first half: column index j, second: row i)."""
    out = np.zeros((1 + g * g, dim))
    q = dim // 4
    omega = [1.0 / 10000 ** (k / q) for k in range(q)]
    for i in range(g):
        for j in range(g):
            row = 1 + i * g + j
            for k in range(q):
                out[row, k] = math.sin(j * scale * omega[k])
                out[row, q + k] = math.cos(j * scale * omega[k])
                out[row, 2 * q + k] = math.sin(i * scale * omega[k])
                out[row, 3 * q + k] = math.cos(i * scale * omega[k])
    return out


def test_scalemae_position_encoding_is_the_gsd_scaled_formula():
    cfg = vit_network.mae_config(ScaleMaeSpec(size="pico"), 32, 3)
    mae = MaeObjective(MaeSpec(size="pico"), 32, 3).network.vit.embeddings.position_embeddings[0].numpy()
    np.testing.assert_allclose(mae, _formula(64, 4, 1.0), atol=1e-6)  # MAE's table = scale 1 (not zeros: see init_mae)
    tables = {}
    for gsd in (0.5, 2.0):
        obj = ScaleMaeObjective(ScaleMaeSpec(size="pico"), 32, 3, gsd=gsd)
        pe = obj.network.mae.vit.embeddings.position_embeddings
        assert not pe.requires_grad
        tables[gsd] = pe[0].numpy()
        np.testing.assert_allclose(tables[gsd], _formula(cfg.hidden_size, 4, gsd), atol=1e-6)
        assert not np.allclose(tables[gsd], mae)
    assert not np.allclose(tables[0.5], tables[2.0])


def test_two_bands_reconstruct_the_image():
    x = torch.randn(2, 3, 16, 16)
    low, high = vit_network.two_bands(x)
    assert low.shape == (2, 3, 8, 8)
    up = torch.nn.functional.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up + high, x)


@pytest.mark.parametrize("kind", ["mae", "scalemae"])
def test_pretraining_loss_goes_down_on_synthetic_tiles(synthetic_tiles, kind):
    torch.manual_seed(0)
    obj = (MaeObjective(MaeSpec(size="pico"), 32, 3) if kind == "mae"
           else ScaleMaeObjective(ScaleMaeSpec(size="pico"), 32, 3, gsd=1.0))
    losses = [loss for loss, _ in train_objective(obj, synthetic_tiles, 200)]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    # (MAE's norm-pix target has unit variance per patch: predicting the patch mean scores ~1.0.)
    assert last < 0.85 * first, (first, last)


# ---------------------------------------------------------------------------------------------- frozen


def _encoders():
    yield "convnext", ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=False), None
    for kind in ("mae", "scalemae"):
        enc = VitEncoder(vit_network.mae_config(MaeSpec(size="pico"), 32, 3), (3, 5, 7, 11), "x")
        yield kind, enc, SimplePyramid(enc.feature_info)


@pytest.mark.parametrize("head_name", ["mlp", "upernet"])
def test_frozen_encoder_stays_bit_identical(head_name):
    from rsseg.config.specs import FinetuneSpec

    ft = FinetuneSpec(upernet={"channels": 32, "auxiliary": True})
    for kind, enc, neck in _encoders():
        enc.freeze()
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        info = neck.feature_info if neck is not None else enc.feature_info
        head = build_head(head_name, info, 5, ft)
        if neck is not None:
            head = NeckHead(neck, head)
        params = [p for p in list(head.parameters()) + list(enc.parameters()) if p.requires_grad]
        assert all(not p.requires_grad for p in enc.parameters())
        opt = torch.optim.AdamW(params, lr=1e-2)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4, 32, 32))
        enc.train()  # the trainer's head.train() must not wake a frozen encoder
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(head(enc(x), (32, 32)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(p.grad is None for p in enc.parameters()), kind
        after = enc.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), kind


# ---------------------------------------------------------------------------------------------- ImageNet weights


def _imagenet_like(tmp_path, drop=None):
    """A ConvNextForImageClassification-style checkpoint (prefix convnext., classifier, final norm)."""
    from safetensors.torch import save_file
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=3, num_labels=10, **CONVNEXT_SIZES["pico"])
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in ConvNextForImageClassification(cfg).state_dict().items()}
    if drop:
        state.pop(drop)
    path = tmp_path / "convnext-in1k.safetensors"
    save_file(state, str(path))
    return path, state


def test_imagenet_weights_load_with_asserted_keys(tmp_path):
    path, state = _imagenet_like(tmp_path)
    enc = ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=True)
    keys = convnext_weights.load_imagenet(enc.backbone, path)
    assert keys["unexpected"] == ["classifier.bias", "classifier.weight", "layernorm.bias", "layernorm.weight"]
    assert keys["missing"] and all(k.startswith("hidden_states_norms.") for k in keys["missing"])
    torch.testing.assert_close(enc.backbone.embeddings.patch_embeddings.weight, state["convnext.embeddings.patch_embeddings.weight"])


def test_wrong_weights_file_is_one_line_naming_missing_keys(tmp_path):
    path, _ = _imagenet_like(tmp_path, drop="convnext.embeddings.patch_embeddings.weight")
    enc = ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=True)
    with pytest.raises(ConfigError, match=r"convnext.weights: .* does not fit this ConvNeXt: missing 1 key\(s\): embeddings.patch_embeddings.weight$"):
        convnext_weights.load_imagenet(enc.backbone, path)
    good, _ = _imagenet_like(tmp_path / "..")
    four_bands = ConvNextEncoder(ConvNextSpec(size="pico"), 4, "x", imagenet=True)
    with pytest.raises(ConfigError, match=r"embeddings.patch_embeddings.weight has shape \(16, 3, 4, 4\), this ConvNeXt expects \(16, 4, 4, 4\)"):
        convnext_weights.load_imagenet(four_bands.backbone, good)
    base = ConvNextEncoder(ConvNextSpec(size="base"), 3, "x", imagenet=True)
    with pytest.raises(ConfigError, match=r"does not fit this ConvNeXt: missing \d+ key\(s\): encoder.stages"):
        convnext_weights.load_imagenet(base.backbone, good)
    with pytest.raises(ConfigError, match=r"convnext.weights: .*nope.pt does not exist"):
        convnext_weights.load_imagenet(enc.backbone, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk.pt is not a readable state dict"):
        convnext_weights.load_imagenet(enc.backbone, tmp_path / "junk.pt")


def test_imagenet_method_without_weights_fails_before_anything_runs(tmp_path):
    """A single run is refused with the reason a sweep would skip its cell for, before any MLflow
    run or training starts."""
    f = tmp_path / "r.yaml"
    f.write_text("method: convnext_imagenet\n")
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path / "w"), "finetune", str(f)])
    assert res.exit_code == 2 and "convnext_imagenet needs local ImageNet ConvNeXt weights (convnext.weights" in res.output
    assert not (tmp_path / "w" / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------- public MAE weights


def _released_mae(tmp_path, image_size=32, name="mae-release"):
    """A ViTMAEForPreTraining directory as MAE's public weights come (encoder + decoder)."""
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(5)
    net = ViTMAEForPreTraining(vit_network.mae_config(MaeSpec(size="pico"), image_size, 3))
    vit_network.init_mae(net)
    out = tmp_path / name
    net.save_pretrained(out)
    return out, net


def test_public_mae_weights_import_and_give_transformers_hidden_states(tmp_path, monkeypatch):
    """`platform weights import DIR --format vitmae`: the run with mae.weights needs no
    pre-training and its blocks equal ViTMAEModel's hidden states of the released weights; at
    another tile size the fixed sin-cos position table is rebuilt for the new grid."""
    from transformers import ViTMAEModel

    from rsseg_baselines.stages import imagenet_normalise

    path, net = _released_mae(tmp_path)
    wd = tmp_path / "w"
    monkeypatch.setenv("RSSEG_WORKDIR", str(wd))
    res = CliRunner().invoke(app, ["--workdir", str(wd), "weights", "import", str(path), "--format", "vitmae", "--name", "mae_pub"])
    assert res.exit_code == 0, res.output
    run = tiny_run(method="mae", mae={"size": "pico", "weights": "mae_pub"})
    method = registry()["mae"]
    assert not run.needs_pretraining and method.unavailable_reason(run) is None
    enc = method.build_encoder(run, None).eval()
    ref = ViTMAEModel.from_pretrained(str(path), mask_ratio=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    n = (32 // 8) ** 2
    with torch.no_grad():
        ours = enc(x)
        # released MAE weights see ImageNet-normalised [0, 1] images, as they were trained
        out = ref(pixel_values=imagenet_normalise(x), noise=torch.arange(n, dtype=torch.float32).expand(2, n), output_hidden_states=True)
    for b, f in zip((3, 5, 7, 11), ours):
        torch.testing.assert_close(f, out.hidden_states[b + 1][:, 1:].transpose(1, 2).reshape(2, -1, 4, 4))
    big = method.build_encoder(tiny_run(method="mae", mae={"size": "pico", "weights": "mae_pub"}, data={"tile_size": 64}), None)
    table = torch.from_numpy(vit_network.sincos_2d(64, 8)).float()[None]
    torch.testing.assert_close(big.vit.embeddings.position_embeddings, table)
    assert [f.shape for f in big(torch.randn(1, 3, 64, 64))] == [(1, 64, 8, 8)] * 4
    assert vit_rules.mae_tags(run)["weights"] == "public:mae_pub"
    from rsseg.tables.layouts import method_label

    assert method_label("mae_public") == "MAE (public weights)"


def test_public_mae_weights_errors_name_the_directory_and_the_keys(tmp_path, monkeypatch):
    import json

    from rsseg.errors import CheckpointError

    path, _ = _released_mae(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 6  # the weights hold 12 blocks
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mae-release: does not fit the ViTMAE of its config.json: unexpected .*layers\.(6|7|8|9|1[01])\."):
        vit_weights.import_vitmae(path)
    with pytest.raises(CheckpointError, match=r"nope: not a transformers ViTMAE directory"):
        vit_weights.import_vitmae(tmp_path / "nope")
    monkeypatch.setenv("RSSEG_WORKDIR", str(tmp_path / "w"))
    run = tiny_run(method="mae", mae={"size": "pico", "weights": "never_imported"})
    assert "public weights 'never_imported' are not imported" in registry()["mae"].unavailable_reason(run)


def _scalemae_release(tmp_path, drop=None, extra=None):
    """A ScaleMAE-release-style checkpoint: {"model": timm ViT keys (+ decoder, FPN), "args": ...},
    made from a transformers ViTMAEModel (384 wide, 2 blocks) by the inverse key map."""
    import argparse

    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(7)
    cfg = ViTMAEConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=512, patch_size=16,
                       image_size=224, layer_norm_eps=1e-6, mask_ratio=0.0)
    ref = ViTMAEModel(cfg).eval()
    sd = ref.state_dict()
    timm = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
            "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
            "mask_token": torch.zeros(1, 1, 256), "decoder_embed.weight": torch.zeros(256, 384), "fpn.fpn1.0.weight": torch.zeros(4)}
    for i in range(2):
        for part in ("weight", "bias"):
            a = f"layers.{i}."
            timm[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([sd[a + f"attention.{n}_proj.{part}"] for n in "qkv"])
            timm[f"blocks.{i}.attn.proj.{part}"] = sd[a + f"attention.o_proj.{part}"]
            timm[f"blocks.{i}.norm1.{part}"] = sd[a + f"layernorm_before.{part}"]
            timm[f"blocks.{i}.norm2.{part}"] = sd[a + f"layernorm_after.{part}"]
            timm[f"blocks.{i}.mlp.fc1.{part}"] = sd[a + f"mlp.fc1.{part}"]
            timm[f"blocks.{i}.mlp.fc2.{part}"] = sd[a + f"mlp.fc2.{part}"]
    if drop:
        timm.pop(drop)
    timm.update(extra or {})
    path = tmp_path / "scalemae-vitl.pth"
    torch.save({"model": timm, "args": argparse.Namespace(input_size=224)}, path)
    return path, ref


def test_scalemae_release_checkpoint_maps_timm_keys_and_rebuilds_gsd_positions(tmp_path, monkeypatch):
    """The release .pth imports through `platform weights import --format scalemae`: the encoder's
    blocks equal transformers' ViTMAEModel with the same weights, the position table being the
    GSD-scaled sin-cos of the run's grid and the input ImageNet-normalised (what ScaleMAE saw)."""
    from rsseg_baselines.stages import imagenet_normalise

    path, ref = _scalemae_release(tmp_path)
    wd = tmp_path / "w"
    monkeypatch.setenv("RSSEG_WORKDIR", str(wd))
    res = CliRunner().invoke(app, ["--workdir", str(wd), "weights", "import", str(path), "--format", "scalemae", "--name", "smae"])
    assert res.exit_code == 0, res.output
    run = tiny_run(method="scalemae", scalemae={"weights": "smae", "blocks": [0, 1], "gsd": 0.5, "reference_gsd": 1.0},
                   data={"tile_size": 64})
    assert not run.needs_pretraining
    enc = registry()["scalemae"].build_encoder(run, None).eval()
    grid = 64 // 16
    with torch.no_grad():
        pe = torch.from_numpy(vit_network.sincos_2d(384, grid, 0.5)).float()[None]  # (1, 1 + grid^2, 384)
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        ours = enc(x)
        tokens = ref.embeddings.patch_embeddings(imagenet_normalise(x)) + pe[:, 1:]
        h = torch.cat([(ref.embeddings.cls_token + pe[:, :1]).expand(2, -1, -1), tokens], 1)
        for i, layer in enumerate(ref.layers):
            h = layer(h, None)
            torch.testing.assert_close(ours[i], h[:, 1:].transpose(1, 2).reshape(2, 384, grid, grid))
    assert "public weights 'nope' are not imported (`platform weights import RELEASE.pth --format scalemae" in \
        registry()["scalemae"].unavailable_reason(tiny_run(method="scalemae", scalemae={"weights": "nope"}))


def test_a_scalemae_release_that_does_not_fit_is_one_line_naming_the_key(tmp_path):
    from rsseg.errors import CheckpointError

    path, _ = _scalemae_release(tmp_path, drop="blocks.1.attn.qkv.weight")
    with pytest.raises(CheckpointError, match=r"scalemae-vitl.pth: missing blocks.1.attn.qkv.weight \(a timm ViT encoder key\)$"):
        vit_weights.import_scalemae(path)
    path, _ = _scalemae_release(tmp_path, extra={"head.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"does not fit a ViT of 2 blocks, 384 wide: unexpected head.weight$"):
        vit_weights.import_scalemae(path)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.pth: not readable"):
        vit_weights.import_scalemae(tmp_path / "junk.pth")
