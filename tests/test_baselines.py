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
from rsseg_baselines import convnext, vit
from rsseg_baselines.convnext import ConvNextEncoder, ConvNextSpec
from rsseg_baselines.vit import MaeObjective, MaeSpec, ScaleMaeObjective, ScaleMaeSpec, SimplePyramid, VitEncoder

from conftest import tiny_run


def test_methods_are_plugins_and_listed():
    methods = registry()
    assert {"ddpm", "convnext_random", "convnext_imagenet", "mae", "scalemae"} <= set(methods)
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in ("convnext_random", "convnext_imagenet", "mae", "scalemae", "ddpm"):
        assert name in res.output
    assert "rsseg_baselines" in res.output  # where each comes from


# ---------------------------------------------------------------------------------------------- parameter counts


def test_convnext_b_upernet_counts_the_papers_122m():
    with torch.device("meta"):  # counts without allocating or initialising 122 M parameters
        enc = ConvNextEncoder(ConvNextSpec(size="base"), 3, "x", imagenet=False)
        head = UperNetSegHead(enc.feature_info, 12, channels=512, auxiliary=True)
    total = count_parameters(enc) + count_parameters(head)
    assert total == 121_996_696, total
    assert round(total / 1e6, 1) == 122.0


def test_vit_b16_encoder_counts_85_8m():
    cfg = vit.mae_config(MaeSpec(size="base"), 224, 3)
    with torch.device("meta"):
        n = count_parameters(VitEncoder(cfg, (3, 5, 7, 11), "x"))
    assert round(n / 1e6, 1) == 85.8


def test_tiny_variants_pinned():
    assert count_parameters(ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=False)) == 269_232
    enc = VitEncoder(vit.mae_config(MaeSpec(size="pico"), 64, 3), (3, 5, 7, 11), "x")
    assert count_parameters(enc) == 418_368
    assert count_parameters(SimplePyramid(enc.feature_info)) == 49_472
    assert count_parameters(MaeObjective(MaeSpec(size="pico"), 64, 3).network) == 506_304


# ---------------------------------------------------------------------------------------------- feature contract


def test_encoders_obey_the_feature_contract():
    x = torch.randn(2, 3, 64, 64)
    cn = ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=False)
    check_contract(cn, x, cn(x))
    assert [fi.stride for fi in cn.feature_info] == [4, 8, 16, 32]
    v = VitEncoder(vit.mae_config(MaeSpec(size="pico"), 64, 3), (3, 5, 7, 11), "x")
    feats = v(x)
    check_contract(v, x, feats)
    neck = SimplePyramid(v.feature_info)
    pyramid = neck(feats)
    check_contract(neck, x, pyramid)
    assert [fi.stride for fi in neck.feature_info] == [2, 4, 8, 16]  # patch 8: p/4, p/2, p, 2p


def test_vit_encoder_blocks_equal_transformers_forward():
    """Our early-exit forward (no masking, original order) equals ViTMAEModel's hidden states."""
    cfg = vit.mae_config(MaeSpec(size="pico"), 32, 3)
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
    cfg = vit.mae_config(ScaleMaeSpec(size="pico"), 32, 3)
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
    low, high = vit.two_bands(x)
    assert low.shape == (2, 3, 8, 8)
    up = torch.nn.functional.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up + high, x)


@pytest.fixture(scope="module")
def synthetic_tiles(tmp_path_factory):
    from rsseg.data import tiles
    from rsseg.data.dataset import TileDataset, TileReader
    from rsseg.workdir import Workdir

    wd = Workdir.resolve(tmp_path_factory.mktemp("mae")).ensure()
    run = tiny_run()
    index = tiles.build(run.data, wd)
    s = index.scenes
    ds = TileDataset(TileReader(s.scenes, s.table, s.bands, s.value_range), index.split("train"))
    return torch.stack([ds[i]["image"] for i in range(min(32, len(ds)))])


@pytest.mark.parametrize("kind", ["mae", "scalemae"])
def test_pretraining_loss_goes_down_on_synthetic_tiles(synthetic_tiles, kind):
    torch.manual_seed(0)
    obj = (MaeObjective(MaeSpec(size="pico"), 32, 3) if kind == "mae"
           else ScaleMaeObjective(ScaleMaeSpec(size="pico"), 32, 3, gsd=1.0))
    opt = torch.optim.AdamW(obj.network.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(200):
        idx = torch.randint(0, synthetic_tiles.shape[0], (8,), generator=gen)
        loss, _ = obj.loss(obj.network, synthetic_tiles[idx], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    # (MAE's norm-pix target has unit variance per patch: predicting the patch mean scores ~1.0.)
    assert last < 0.85 * first, (first, last)


# ---------------------------------------------------------------------------------------------- frozen


def _encoders():
    yield "convnext", ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=False), None
    for kind in ("mae", "scalemae"):
        enc = VitEncoder(vit.mae_config(MaeSpec(size="pico"), 32, 3), (3, 5, 7, 11), "x")
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

    cfg = ConvNextConfig(num_channels=3, num_labels=10, **convnext.SIZES["pico"])
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
    keys = convnext.load_imagenet(enc.backbone, path)
    assert keys["unexpected"] == ["classifier.bias", "classifier.weight", "layernorm.bias", "layernorm.weight"]
    assert keys["missing"] and all(k.startswith("hidden_states_norms.") for k in keys["missing"])
    torch.testing.assert_close(enc.backbone.embeddings.patch_embeddings.weight, state["convnext.embeddings.patch_embeddings.weight"])


def test_wrong_weights_file_is_one_line_naming_missing_keys(tmp_path):
    path, _ = _imagenet_like(tmp_path, drop="convnext.embeddings.patch_embeddings.weight")
    enc = ConvNextEncoder(ConvNextSpec(size="pico"), 3, "x", imagenet=True)
    with pytest.raises(ConfigError, match=r"convnext.weights: .* does not fit this ConvNeXt: missing 1 key\(s\): embeddings.patch_embeddings.weight$"):
        convnext.load_imagenet(enc.backbone, path)
    good, _ = _imagenet_like(tmp_path / "..")
    four_bands = ConvNextEncoder(ConvNextSpec(size="pico"), 4, "x", imagenet=True)
    with pytest.raises(ConfigError, match=r"embeddings.patch_embeddings.weight has shape \(16, 3, 4, 4\), this ConvNeXt expects \(16, 4, 4, 4\)"):
        convnext.load_imagenet(four_bands.backbone, good)
    base = ConvNextEncoder(ConvNextSpec(size="base"), 3, "x", imagenet=True)
    with pytest.raises(ConfigError, match=r"does not fit this ConvNeXt: missing \d+ key\(s\): encoder.stages"):
        convnext.load_imagenet(base.backbone, good)
    with pytest.raises(ConfigError, match=r"convnext.weights: .*nope.pt does not exist"):
        convnext.load_imagenet(enc.backbone, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk.pt is not a readable state dict"):
        convnext.load_imagenet(enc.backbone, tmp_path / "junk.pt")


def test_imagenet_method_without_weights_fails_before_anything_runs(tmp_path):
    """A single run is refused with the reason a sweep would skip its cell for, before any MLflow
    run or training starts."""
    f = tmp_path / "r.yaml"
    f.write_text("method: convnext_imagenet\n")
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path / "w"), "finetune", str(f)])
    assert res.exit_code == 2 and "convnext_imagenet needs local ImageNet ConvNeXt weights (convnext.weights" in res.output
    assert not (tmp_path / "w" / "mlflow.db").exists()
