"""`platform viz` (Figs. 5 and 6): per-pixel features, k-means, the PNGs, on tiny random weights."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rsseg.cli import app
from rsseg.featureviz import kmeans, pixel_features, pixel_labels, run_viz, sample_pixels

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
    assert set(r["ari"]) == {0, 100} and all(-1 <= v <= 1 for v in r["ari"].values())
    assert -1 <= r["silhouette_decoder"] <= 1 and -1 <= r["silhouette_encoder"] <= 1


def test_viz_cli_bad_timesteps_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path), "viz", "sweeps/finetune.yaml", "--timesteps", "0,x"])
    assert res.exit_code == 2 and res.output.strip() == "error: --timesteps: '0,x' is not a comma-separated list of integers"
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path), "viz", "sweeps/finetune.yaml", "--timesteps", "0,5000"])
    assert res.exit_code == 2 and "--timesteps: 5000 is outside the schedule's 0..999" in res.output
