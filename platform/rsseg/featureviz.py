"""``platform viz``: what the DDPM features look like (the paper's Figs. 5 and 6).

- t-SNE of per-pixel features of labelled test tiles, encoder side vs decoder side, coloured by
  class (Fig. 5), with the silhouette score of the classes in the original feature space (higher:
  classes separate better; the number the picture illustrates).
- k-means maps of per-pixel decoder features at several noise levels (Fig. 6): each timestep's
  features of a few tiles clustered into as many clusters as classes, shown beside the image and
  its labels, with the adjusted Rand index between clusters and labels.

Per-pixel features: every map (each timestep) resized (bilinear) to 1/4 of the input and
concatenated along channels, each map L2-normalised per pixel first so that wide maps do not
drown narrow ones: (B, sum C_i, H/4, W/4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rsseg.labels import IGNORE_INDEX

STRIDE = 4


def pixel_features(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """maps: each (B, C_i, h_i, w_i) -> (B, sum C_i, H/4, W/4), each map L2-normalised per pixel."""
    target = (size[0] // STRIDE, size[1] // STRIDE)
    out = [F.normalize(F.interpolate(m.float(), size=target, mode="bilinear", align_corners=False), dim=1) for m in maps]
    return torch.cat(out, dim=1)


def pixel_labels(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H/4, W/4): the label at the centre of each 4 x 4 cell."""
    return mask[:, STRIDE // 2::STRIDE, STRIDE // 2::STRIDE]


def sample_pixels(feats: torch.Tensor, labels: torch.Tensor, n: int, seed: int, ignore: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, h, w), (B, h, w) -> X (m, C), y (m,) with m <= n labelled pixels, classes balanced
    as far as they exist (a rare class is not lost among the common ones)."""
    x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).numpy()
    y = labels.reshape(-1).numpy()
    keep = y != ignore
    x, y = x[keep], y[keep]
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per = max(1, n // max(1, len(classes)))
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in classes]) if len(classes) else np.array([], int)
    return x[idx], y[idx]


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. x: (N, C) -> (assignments (N,), centres (k, C))."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centres = [x[torch.randint(0, n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        centres.append(x[torch.multinomial(p, 1, generator=g)].squeeze(0))
    c = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(dim=1)
        if _ > 0 and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(dim=0)
    return assign, c


def class_separation(x: np.ndarray, y: np.ndarray) -> float:
    """Silhouette of the classes in feature space (-1..1; higher: classes separate better);
    NaN with fewer than two classes."""
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(x, y)) if len(np.unique(y)) > 1 else float("nan")


def cluster_agreement(feats: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0,
                      ignore: int = IGNORE_INDEX) -> tuple[torch.Tensor, float]:
    """k-means of per-pixel features (B, C, h, w) into ``k`` clusters, and the adjusted Rand
    index between clusters and labels (B, h, w) over labelled pixels: (cluster map, ARI)."""
    from sklearn.metrics import adjusted_rand_score

    b, c, h, w = feats.shape
    assign, _ = kmeans(feats.permute(0, 2, 3, 1).reshape(-1, c), k, seed=seed)
    valid = labels.reshape(-1) != ignore
    ari = float(adjusted_rand_score(labels.reshape(-1)[valid].numpy(), assign[valid].numpy()))
    return assign.reshape(b, h, w), ari


def _encoder(run, workdir, pretrained, **features):
    """The run's DDPM encoder with some feature options changed (side, timesteps)."""
    from rsseg.config.loader import set_path

    d = run.model_dump(mode="json", by_alias=True)
    for key, value in features.items():
        set_path(d, f"ddpm.features.{key}", value)
    variant = type(run).model_validate(d)
    from rsseg.device import resolve

    return variant.plugin.build_encoder(variant, pretrained).freeze().to(resolve(run.runtime.device))


def _tiles(run, workdir, n: int):
    from rsseg.data import tiles
    from rsseg.data.dataset import TileDataset, TileReader, collate

    index = tiles.build(run.data, workdir)
    ds = TileDataset(TileReader.of(index.scenes), index.split("test"))
    # tiles with the most distinct classes first: the pictures should show several classes
    items = [ds[i] for i in range(min(len(ds), 64))]
    items.sort(key=lambda it: -len(torch.unique(it["mask"][it["mask"] != IGNORE_INDEX])))
    return collate(items[:n]), index.table


def check_viz(run, timesteps: Sequence[int], key: str = "timesteps") -> None:
    """Before anything is read or trained: Figs. 5-6 show a DDPM's features, at timesteps its
    schedule and UNet take (``key`` names them in the error: ``--timesteps`` for the CLI)."""
    from rsseg.errors import ConfigError

    if run.method != "ddpm":
        raise ConfigError(f"method: platform viz shows DDPM features; {run.method!r} is not ddpm")
    from rsseg.methods.ddpm.rules import timesteps_outside

    if outside := timesteps_outside(run, list(timesteps)):
        raise ConfigError(f"{key}: {outside}")


def run_viz(run, workdir, out: Path, *, tiles: int = 8, points: int = 2000, timesteps: Sequence[int] = (0, 50, 100, 150, 200),
            seed: int = 0, pretrained=None) -> dict[str, object]:
    """Write ``tsne_encoder_vs_decoder.png`` and ``kmeans_noise_levels.png`` into ``out``."""
    from sklearn.manifold import TSNE

    from rsseg.pretrain.ensure import ensure_pretrained

    check_viz(run, timesteps)
    if pretrained is None:
        pretrained = ensure_pretrained(run, workdir, allow_training=False)
    batch, table = _tiles(run, workdir, tiles)
    images, mask = batch["image"], batch["mask"]
    size = tuple(images.shape[-2:])
    labels = pixel_labels(mask)
    result: dict[str, object] = {"tiles": int(images.shape[0])}

    # Fig. 5: encoder vs decoder features, the run's timesteps and resolutions
    embedded = {}
    for side in ("encoder", "decoder"):
        enc = _encoder(run, workdir, pretrained, side=side)
        with torch.no_grad():
            feats = pixel_features([m.cpu() for m in enc(images.to(next(enc.parameters()).device), [f"viz{i}" for i in range(len(images))],
                                                            [0] * len(images))], size)
        x, y = sample_pixels(feats, labels, points, seed)
        sil = class_separation(x, y)
        xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, max(5, len(x) // 10))).fit_transform(x)
        embedded[side] = (xy, y, sil)
        result[f"silhouette_{side}"] = sil
    out.mkdir(parents=True, exist_ok=True)
    result["tsne"] = _tsne_png(embedded, table, run, out / "tsne_encoder_vs_decoder.png")

    # Fig. 6: k-means of decoder features at each noise level
    k = table.num_classes
    maps, ari = {}, {}
    for t in timesteps:
        enc = _encoder(run, workdir, pretrained, side="decoder", timesteps=[t])
        with torch.no_grad():
            feats = pixel_features([m.cpu() for m in enc(images.to(next(enc.parameters()).device), [f"viz{i}" for i in range(len(images))],
                                                            [0] * len(images))], size)
        maps[t], ari[t] = cluster_agreement(feats, labels, k, seed)
    result["ari"] = ari
    result["kmeans"] = _kmeans_png(images, labels, maps, ari, table, out / "kmeans_noise_levels.png")
    return result


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tsne_png(embedded, table, run, path: Path) -> Path:
    from rsseg.atomic import atomic_path

    plt = _plt()
    pal = table.palette() / 255.0
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), dpi=110)
    for ax, side in zip(axes, ("encoder", "decoder")):
        xy, y, sil = embedded[side]
        for c in np.unique(y):
            sel = y == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=pal[c], label=table.abbrs[c])
        ax.set_title(f"DDPM {side} features (silhouette {sil:.2f})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    axes[1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class")
    f = run.ddpm.features
    fig.suptitle(f"Per-pixel features of labelled test tiles, t = {list(f.timesteps)}, resolutions 1/{', 1/'.join(map(str, f.resolutions))}",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _kmeans_png(images, labels, maps, ari, table, path: Path) -> Path:
    from rsseg.atomic import atomic_path
    from rsseg.viz import colourise

    plt = _plt()
    rows = min(4, images.shape[0])
    cols = 2 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + 0.6), dpi=110, squeeze=False)
    cmap = plt.get_cmap("tab20")
    for r in range(rows):
        img = ((images[r, :3].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
        axes[r, 0].imshow(img)
        axes[r, 1].imshow(colourise(labels[r], table.palette()), interpolation="nearest")
        for j, (t, m) in enumerate(maps.items()):
            axes[r, 2 + j].imshow(m[r].numpy(), cmap=cmap, vmin=0, vmax=19, interpolation="nearest")
            if r == 0:
                axes[r, 2 + j].set_title(f"t = {t}\nARI {ari[t]:.2f}", fontsize=8)
        if r == 0:
            axes[r, 0].set_title("tile", fontsize=8)
            axes[r, 1].set_title("labels", fontsize=8)
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"k-means (k = {table.num_classes}) of decoder features per noise level; ARI vs labels", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
