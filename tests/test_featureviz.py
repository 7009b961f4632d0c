"""`platform viz` (Figs. 5 and 6): per-pixel features, k-means, the PNGs, on tiny random weights."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rsseg.cli import app
from rsseg.featureviz import class_separation, cluster_agreement, kmeans, pixel_features, pixel_labels, run_viz, sample_pixels

from conftest import tiny_run


def test_kmeans_recovers_separated_blobs_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(50)
    x = centres[truth] + 0.3 * torch.randn(150, 2, generator=g)
    a1, c1 = kmeans(x, 3, seed=1)
    a2, c2 = kmeans(x, 3, seed=1)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    # the partition equals the truth up to relabelling
    mapping = {int(t): int(a1[truth == t][0]) for t in range(3)}
    assert len(set(mapping.values())) == 3 and all(int(a1[i]) == mapping[int(truth[i])] for i in range(150))


def test_pixel_features_and_labels_shapes_and_norms():
    maps = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 8, 8)]
    f = pixel_features(maps, (32, 32))
    assert f.shape == (2, 24, 8, 8)
    torch.testing.assert_close(f[:, :8].norm(dim=1), torch.ones(2, 8, 8))
    mask = torch.arange(32).repeat(2, 32, 1)
    assert pixel_labels(mask).shape == (2, 8, 8) and pixel_labels(mask)[0, 0, 1].item() == 6


def test_sample_pixels_balances_classes_and_skips_ignored():
    feats = torch.randn(1, 3, 10, 10)
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, :2] = 1  # 20 pixels of class 1, 80 of class 0
    labels[0, 9] = 255
    x, y = sample_pixels(feats, labels, 30, seed=0)
    assert x.shape == (30, 3) and (y == 0).sum() == 15 and (y == 1).sum() == 15 and 255 not in y


def test_viz_writes_both_figures(tmp_path, workdir):
    run = tiny_run(ddpm={"features": {"weights": "random", "timesteps": [0, 50]}})
    r = run_viz(run, workdir, tmp_path / "viz", tiles=2, points=200, timesteps=(0, 100))
    for key in ("tsne", "kmeans"):
        png = r[key].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert set(r["ari"]) == {0, 100} and set(r) >= {"silhouette_decoder", "silhouette_encoder"}


def _label_map() -> torch.Tensor:
    """(2, 8, 8) labels: four quadrant classes, one ignored row."""
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :4, 4:], labels[:, 4:, :4], labels[:, 4:, 4:] = 1, 2, 3
    labels[:, 0] = 255
    return labels


def test_cluster_agreement_is_one_when_features_are_the_classes_and_near_zero_for_noise():
    labels = _label_map()
    centres = torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 5.0, 5.0]])
    feats = centres[labels.clamp(max=3)].permute(0, 3, 1, 2) + 0.01 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assign, ari = cluster_agreement(feats, labels, k=4, seed=0)
    assert ari == pytest.approx(1.0) and assign.shape == (2, 8, 8)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _, ari_noise = cluster_agreement(noise, labels, k=4, seed=0)
    assert abs(ari_noise) < 0.15  # unrelated clusters: ARI ~ 0 by construction of the index


def test_class_separation_orders_separated_above_mixed_classes():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    separated = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(10, 0.1, (50, 2))])
    mixed = rng.normal(0, 1, (100, 2))
    assert class_separation(separated, y) > 0.95
    assert abs(class_separation(mixed, y)) < 0.1
    assert np.isnan(class_separation(separated, np.zeros(100, dtype=int)))


def test_viz_cli_bad_timesteps_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path), "viz", "sweeps/finetune.yaml", "--timesteps", "0,x"])
    assert res.exit_code == 2 and res.output.strip() == "error: --timesteps: '0,x' is not a comma-separated list of integers"
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path), "viz", "sweeps/finetune.yaml", "--timesteps", "0,5000"])
    assert res.exit_code == 2 and "--timesteps: 5000 is outside the schedule's 0..2000" in res.output
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path), "viz", "sweeps/finetune.yaml", "--timesteps=-10,50"])
    assert res.exit_code == 2 and res.output.strip() == ("error: --timesteps: '-10,50': expected non-negative timesteps such as "
                                                         "0,50,100,150 (0 = the clean image)")
