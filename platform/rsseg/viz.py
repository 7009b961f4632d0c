"""Small image utilities for artifacts: grids of [-1, 1] tensors, label overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def to_uint8_rgb(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8 (first three bands; a single band is grey)."""
    x = x.detach().float().cpu()
    if x.shape[0] == 1:
        x = x.repeat(3, 1, 1)
    x = x[:3]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_grid(rows: Sequence[torch.Tensor], path: Path, columns: Sequence[str] | None = None, pad: int = 2,
              min_size: int = 96) -> Path:
    """Each row a (N, C, H, W) tensor; optional column captions. Small tiles are enlarged
    (nearest) to ``min_size`` so that a grid of 32 px tiles is still readable."""
    from PIL import Image, ImageDraw

    from rsseg.atomic import atomic_path

    h, w = rows[0].shape[-2:]
    scale = max(1, -(-min_size // max(h, w)))
    h, w = h * scale, w * scale
    ncol = max(r.shape[0] for r in rows)
    caption = 12 if columns else 0
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad + caption), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if columns:
        for j, name in enumerate(columns[:ncol]):
            draw.text((pad + j * (w + pad), 0), str(name)[: max(4, w // 6)], fill=(0, 0, 0))  # ~6 px per glyph
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = Image.fromarray(to_uint8_rgb(img))
            if scale > 1:
                tile = tile.resize((w, h), Image.NEAREST)
            canvas.paste(tile, (pad + j * (w + pad), caption + pad + i * (h + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")
    return path


def colourise(labels: torch.Tensor, palette: np.ndarray, ignore: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 with the class palette; ignored pixels black."""
    lab = labels.cpu().numpy().astype(np.int64)
    out = np.zeros((*lab.shape, 3), dtype=np.uint8)
    valid = (lab != ignore) & (lab < len(palette))
    out[valid] = palette[lab[valid]]
    return out


def save_overlays(images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, palette: np.ndarray, path: Path) -> Path:
    """Rows of (image | truth | prediction) for a few tiles."""
    rows = []
    for img, t, p in zip(images, truth, pred):
        t_rgb = torch.from_numpy(colourise(t, palette)).permute(2, 0, 1).float() / 127.5 - 1
        p_rgb = torch.from_numpy(colourise(p, palette)).permute(2, 0, 1).float() / 127.5 - 1
        rows.append(torch.stack([img[:3].float().cpu(), t_rgb, p_rgb]))
    return save_grid(rows, path, ["image", "truth", "prediction"])


def save_confusion(matrix: np.ndarray, names: list[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (truth rows, prediction columns) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rsseg.atomic import atomic_path

    m = matrix.astype(np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n), dpi=110)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(n):
        for j in range(n):
            if norm[i, j] >= 0.01:
                ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class's pixels")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
