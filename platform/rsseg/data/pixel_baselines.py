"""Per-pixel reference classifiers, trained on the label-ratio subset, scored on the test split.

- `colour_baseline`: the best a classifier of a pixel's colour alone can do, approximated by a
  3-D colour histogram (``bins`` levels per band) with the majority class per bin (Laplace
  smoothed, class priors from the training pixels): a nonparametric, near Bayes-optimal
  per-pixel colour rule.
- `texture_baseline`: the same pixels with local statistics around them (means and standard
  deviations in 5/9/17 px windows and oriented gradient energy), fed to a small MLP: what a
  cheap spatial model reaches. The gap between the two says how much of a dataset is texture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rsseg.data.classes import IGNORE_INDEX
from rsseg.metrics import ConfusionMatrix, SegMetrics


@dataclass(frozen=True)
class BaselineResult:
    name: str
    metrics: SegMetrics
    train_pixels: int


def _batches(dataset, batch: int = 16):
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch))]
        yield torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items])


def _colour_bins(image: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W) bin index of its first min(C, 3) bands."""
    q = ((image[:, :3] + 1.0) * 0.5 * bins).long().clamp_(0, bins - 1)
    index = torch.zeros_like(q[:, 0])
    for c in range(q.shape[1]):
        index = index * bins + q[:, c]
    return index


def colour_baseline(train_ds, test_ds, num_classes: int, bins: int = 16) -> BaselineResult:
    bands = min(3, train_ds[0]["image"].shape[0]) if len(train_ds) else 3
    counts = torch.zeros(bins**bands, num_classes, dtype=torch.float64)
    n = 0
    for image, mask in _batches(train_ds):
        keep = mask != IGNORE_INDEX
        b = _colour_bins(image, bins)[keep]
        y = mask[keep]
        counts.index_put_((b, y), torch.ones_like(b, dtype=torch.float64), accumulate=True)
        n += int(keep.sum())
    prior = counts.sum(0) + 1.0
    # P(class | bin) ∝ (count + prior-weighted smoothing): empty bins fall back to the prior.
    score = counts + prior / prior.sum()
    rule = score.argmax(1)
    cm = ConfusionMatrix(num_classes)
    for image, mask in _batches(test_ds):
        cm.update(rule[_colour_bins(image, bins)], mask)
    return BaselineResult("colour", cm.compute(), n)


def texture_features(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, F, H, W): colour + local means/stds + oriented gradient energy."""
    feats = [image]
    gray = image.mean(1, keepdim=True)
    for k in (5, 9, 17):
        mean = F.avg_pool2d(image, k, stride=1, padding=k // 2, count_include_pad=False)
        sq = F.avg_pool2d(image * image, k, stride=1, padding=k // 2, count_include_pad=False)
        feats += [mean, (sq - mean * mean).clamp_min(0).sqrt()]
    gx = F.pad(gray[..., :, 1:] - gray[..., :, :-1], (0, 1, 0, 0))
    gy = F.pad(gray[..., 1:, :] - gray[..., :-1, :], (0, 0, 0, 1))
    for k in (5, 9):
        for g in (gx * gx, gy * gy, gx * gy):
            feats.append(F.avg_pool2d(g, k, stride=1, padding=k // 2, count_include_pad=False))
    return torch.cat(feats, 1)


def texture_baseline(train_ds, test_ds, num_classes: int, steps: int = 400, max_pixels: int = 200_000, seed: int = 0) -> BaselineResult:
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for image, mask in _batches(train_ds):
        f = texture_features(image).permute(0, 2, 3, 1)
        keep = mask != IGNORE_INDEX
        xs.append(f[keep])
        ys.append(mask[keep])
    x, y = torch.cat(xs), torch.cat(ys)
    if len(x) > max_pixels:
        pick = torch.randperm(len(x), generator=gen)[:max_pixels]
        x, y = x[pick], y[pick]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, num_classes))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xn = (x - mu) / sd
    for _ in range(steps):
        pick = torch.randint(0, len(xn), (4096,), generator=gen)
        loss = F.cross_entropy(net(xn[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cm = ConfusionMatrix(num_classes)
    with torch.no_grad():
        for image, mask in _batches(test_ds):
            f = (texture_features(image).permute(0, 2, 3, 1) - mu) / sd
            cm.update(net(f).argmax(-1), mask)
    return BaselineResult("texture", cm.compute(), len(x))
