"""MA3E (rsseg_baselines.ma3e): the rotated window, the angle embedding, the masking split and the
Sinkhorn OT loss against their formulas; the objective learns; its ViT is read like MAE's."""

import math

import numpy as np
import pytest
import torch

from rsseg.encoders import check_contract
from rsseg.errors import ConfigError
from rsseg.methods import registry
from rsseg_baselines.ma3e import windows
from rsseg_baselines.vit.encoder import VitEncoder
from rsseg_baselines.vit.network import mae_config
from rsseg_baselines.ma3e.network import Ma3eNet
from rsseg_baselines.ma3e.objective import Ma3eObjective
from rsseg_baselines.ma3e.spec import Ma3eSpec

from conftest import tiny_run, train_objective


# ---------------------------------------------------------------------------------------------- Sinkhorn / OT


def test_sinkhorn_plan_has_uniform_marginals():
    cost = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 4
    plan = windows.sinkhorn(cost, eps=0.1, iterations=200)
    assert plan.shape == (3, 5, 7) and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(2), torch.full((3, 5), 1 / 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((3, 7), 1 / 7), atol=1e-5, rtol=0)


def test_sinkhorn_finds_the_permutation_and_ot_loss_is_zero_for_shuffled_patches():
    """Targets that are the predictions shuffled: the plan is the permutation / n, the loss ~0,
    while the plain (position-wise) MSE is large."""
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 9, 48, generator=g)
    perm = torch.randperm(9, generator=g)
    target = pred[:, perm] * 3.0  # scaled: the cost compares L2-normalised patches
    p, t = torch.nn.functional.normalize(pred, dim=-1), torch.nn.functional.normalize(target, dim=-1)
    plan = windows.sinkhorn(torch.cdist(p, t) ** 2, eps=0.05, iterations=200)
    expected = torch.zeros(9, 9)
    expected[perm, torch.arange(9)] = 1 / 9  # target j is prediction perm[j]
    torch.testing.assert_close(plan[0], expected, atol=1e-4, rtol=0)
    assert windows.ot_loss(pred, target, 0.05, 200) < 1e-3
    assert ((p - t) ** 2).sum(-1).mean() > 1.0


def test_ot_loss_ignores_the_order_of_the_window_patches_and_has_gradient():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 16, 12, generator=g, requires_grad=True)
    target = torch.randn(2, 16, 12, generator=g)
    a = windows.ot_loss(pred, target, 0.1, 100)
    b = windows.ot_loss(pred, target[:, torch.randperm(16, generator=g)], 0.1, 100)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    a.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- window geometry


def test_margin_keeps_the_rotated_window_inside_the_tile():
    for w in range(1, 12):
        m = windows.window_margin(w)
        # the disc through the window's corners (radius w / sqrt 2) fits in the window plus the margin
        assert w / math.sqrt(2) <= w / 2 + m + 1e-9 and (m == 0 or w / math.sqrt(2) > w / 2 + m - 1)
    assert windows.window_margin(6) == 2  # the release's 6 patches of 16 on 14x14: placements 2..6


def test_window_placements_fit_and_tokens_mark_the_window():
    corners, angles = windows.sample_windows(256, 8, 4, 45.0, torch.Generator().manual_seed(0))
    assert corners.min() == 1 and corners.max() == 3  # margin 1: top/left in 1..8-4-1, all reached
    assert angles.abs().max() <= 45 and angles.min() < -40 and angles.max() > 40
    tokens = windows.window_tokens(torch.tensor([[1, 3]]), 8, 4).reshape(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:5, 3:7] = True
    assert torch.equal(tokens, expected)


def test_rotation_by_zero_is_the_identity_and_by_90_degrees_is_rot90_of_the_window():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    corners = torch.tensor([[1, 1], [1, 2]])
    same = windows.rotate_windows(x, corners, torch.zeros(2), window=2, patch=8)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    turned = windows.rotate_windows(x, corners, torch.full((2,), 90.0), window=2, patch=8)
    for i, (top, left) in enumerate(corners.tolist()):
        r, c = slice(top * 8, top * 8 + 16), slice(left * 8, left * 8 + 16)
        # counter-clockwise on screen: torch.rot90 with k=1 over (H, W)
        torch.testing.assert_close(turned[i, :, r, c], torch.rot90(x[i, :, r, c], 1, dims=(1, 2)), atol=1e-4, rtol=0)
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[r, c] = False
        assert torch.equal(turned[i][:, outside], x[i][:, outside])  # only the window changes


def test_masking_keeps_the_window_and_background_shares_exactly():
    in_window = windows.window_tokens(torch.tensor([[2, 2], [3, 5], [4, 4]]), 14, 6)  # 36 of 196 patches
    noise = windows.masking_noise(in_window, 0.75, 0.75, torch.Generator().manual_seed(0))
    kept = noise < 1  # what ViTMAE's random_masking keeps: the int(196 * 0.25) = 49 lowest
    assert (kept.sum(1) == 49).all()
    assert ((kept & in_window).sum(1) == 9).all() and ((kept & ~in_window).sum(1) == 40).all()
    # and ViTMAE keeps exactly these
    net = Ma3eNet(mae_config(Ma3eSpec(size="pico"), 112, 3))
    _, mask, _ = net.mae.vit.embeddings.random_masking(torch.randn(3, 196, 64), noise)
    assert torch.equal(mask == 0, kept)


def test_angle_embedding_is_added_to_the_window_tokens_only():
    """The tokens before masking minus MAE's (patch projection + positions) = the angle embedding
    on exactly the window's patches; and the network's predictions depend on it."""
    torch.manual_seed(0)
    net = Ma3eNet(mae_config(Ma3eSpec(size="pico"), 32, 3))
    x = torch.randn(2, 3, 32, 32)
    in_window = windows.window_tokens(torch.tensor([[1, 1], [1, 2]]), 4, 2)
    emb = net.mae.vit.embeddings
    diff = (net.tokens(x, in_window) - (emb.patch_embeddings(x) + emb.position_embeddings[:, 1:])).detach()
    torch.testing.assert_close(diff[in_window], net.angle_embed.detach()[0].expand(8, -1), atol=1e-6, rtol=0)
    assert diff[~in_window].abs().max() < 1e-6
    noise = windows.masking_noise(in_window, 0.75, 0.5, torch.Generator().manual_seed(0))
    with_angle, mask = net(x, noise, in_window)
    without, _ = net(x, noise, torch.zeros_like(in_window))
    assert mask.shape == (2, 16) and with_angle.shape == (2, 16, 8 * 8 * 3) and not torch.allclose(with_angle, without)


# ---------------------------------------------------------------------------------------------- spec / errors


def test_a_window_that_does_not_fit_is_one_line_naming_the_key(tmp_path):
    from typer.testing import CliRunner

    from rsseg.cli import app

    with pytest.raises(ConfigError, match=r"^ma3e.window: 3 patches does not fit, rotated, in a 4x4-patch tile \(at most 2 patches\)$"):
        Ma3eObjective(Ma3eSpec(size="pico", window=3), 32, 3)
    # at the edge, before anything runs: the run file, the key, the tile and patch it was checked against
    f = tmp_path / "r.yaml"
    f.write_text("method: ma3e\nma3e: {size: pico, window: 3}\ndata: {tile_size: 32}\n")
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path / "w"), "pretrain", str(f)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (f"error: {f}: ma3e.window: 3 patches does not fit, rotated, in a 4x4-patch "
                                                   "tile (at most 2 patches); data.tile_size 32, patch 8")
    assert not [p for p in (tmp_path / "w").rglob("*") if p.suffix in (".pt", ".safetensors")]  # nothing trained, nothing saved


def test_a_masking_split_that_cannot_be_made_is_refused_at_the_edge(tmp_path):
    """mask_ratio 0.9 keeps int(16 * 0.1) = 1 patch, window_mask_ratio 0.25 wants 3 of its 4: one
    line naming the key, from the run file, before any pre-training (and in the loop's own check)."""
    from rsseg.runspec import load_run

    f = tmp_path / "r.yaml"
    f.write_text("method: ma3e\nma3e: {size: pico, window: 2, mask_ratio: 0.9, window_mask_ratio: 0.25}\ndata: {tile_size: 32}\n")
    with pytest.raises(ConfigError, match=r"^.*r.yaml: ma3e.window_mask_ratio: keeping 3 of 4 window patches leaves -2 of the 1 "
                                          r"visible patches \(mask_ratio 0.9\) for a background of 12$"):
        load_run(f)
    with pytest.raises(ConfigError, match=r"^ma3e.window_mask_ratio: keeping 3 of 4"):
        windows.masking_noise(windows.window_tokens(torch.tensor([[1, 1]]), 4, 2), 0.9, 0.25, torch.Generator().manual_seed(0))


def test_ma3e_has_no_public_weights_and_pretrains_here():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="weights"):
        Ma3eSpec(weights="x")
    m = registry()["ma3e"]
    assert m.label == "MA3E" and m.importers == ()
    assert m.needs_pretraining(tiny_run(method="ma3e", ma3e={"size": "pico", "window": 2}))
    # its options enter the pre-training fingerprint
    assert {"window", "angle_range", "window_mask_ratio", "sinkhorn_eps"} <= set(m.pretrain_keys)


# ---------------------------------------------------------------------------------------------- learning, reuse


def test_pretraining_loss_goes_down_on_synthetic_tiles(synthetic_tiles):
    torch.manual_seed(0)
    obj = Ma3eObjective(Ma3eSpec(size="pico", window=2), 32, 3)
    steps = train_objective(obj, synthetic_tiles, 150)
    losses, ot = [loss for loss, _ in steps], [logs["loss_ot"] for _, logs in steps]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    assert np.mean(ot[-10:]) < 0.7 * np.mean(ot[:10])  # the window's OT term learns too, not only the background


def test_loss_is_deterministic_under_a_seed(synthetic_tiles):
    obj = Ma3eObjective(Ma3eSpec(size="pico", window=2), 32, 3)
    a, _ = obj.loss(obj.network, synthetic_tiles[:4], torch.Generator().manual_seed(5))
    b, _ = obj.loss(obj.network, synthetic_tiles[:4], torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


class _Pretrained:
    def __init__(self, state):
        self.state, self.fingerprint, self.method = state, "fp", "ma3e"

    def load(self):
        return self.state


def test_the_pretrained_vit_is_read_like_maes_and_the_angle_embedding_is_left_over():
    obj = Ma3eObjective(Ma3eSpec(size="pico", window=2), 32, 3)
    state = {"model": obj.network.state_dict(), "objective": obj.describe()}
    run = tiny_run(method="ma3e", ma3e={"size": "pico", "window": 2, "blocks": [1, 3, 5, 7]})
    enc = registry()["ma3e"].build_encoder(run, _Pretrained(state)).eval()
    assert [fi.stride for fi in enc.feature_info] == [8] * 4
    x = torch.randn(2, 3, 32, 32)
    feats = enc(x)
    check_contract(enc, x, feats)
    # the encoder equals the pre-trained ViT's own forward, without masking, at those blocks
    ref = VitEncoder(obj.config, (1, 3, 5, 7), "ref")
    ref.vit.load_state_dict({k[len("mae.vit."):]: v for k, v in state["model"].items() if k.startswith("mae.vit.")})
    for f, r in zip(feats, ref.eval()(x)):
        torch.testing.assert_close(f, r)
    # anything else of the encoder left over is an error naming it
    bad = dict(state, model={**state["model"], "mae.vit.extra.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match=r"pre-trained ViT checkpoint does not fit: unexpected 1 key\(s\): extra.weight$"):
        registry()["ma3e"].build_encoder(run, _Pretrained(bad))
