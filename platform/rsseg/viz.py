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
    return _save_png(_grid(rows, columns, pad, min_size), path)


def _save_png(canvas, path: Path) -> Path:
    from rsseg.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _grid(rows: Sequence[torch.Tensor], columns: Sequence[str] | None, pad: int, min_size: int):
    from PIL import Image, ImageDraw

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
    return canvas


def with_legend(canvas, entries: Sequence[tuple[str, Sequence[int]]], swatch: int = 10, pad: int = 4):
    """``canvas`` with a class-colour legend below it: one swatch and name per entry, wrapped
    to the canvas width (~6 px per glyph of PIL's default font)."""
    from PIL import Image, ImageDraw

    width = max(canvas.width, 160)
    cells = [swatch + 4 + 6 * len(name) + 10 for name, _ in entries]
    lines, x = 1, pad
    for c in cells:
        if x + c > width and x > pad:
            lines, x = lines + 1, pad
        x += c
    line_h = swatch + 4
    out = Image.new("RGB", (width, canvas.height + pad + lines * line_h + pad), (255, 255, 255))
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    x, y = pad, canvas.height + pad
    for (name, colour), c in zip(entries, cells):
        if x + c > width and x > pad:
            x, y = pad, y + line_h
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(v) for v in colour[:3]), outline=(0, 0, 0))
        draw.text((x + swatch + 4, y - 1), name, fill=(0, 0, 0))
        x += c
    return out


def colourise(labels: torch.Tensor, palette: np.ndarray, ignore: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 with the class palette; ignored pixels black."""
    lab = labels.cpu().numpy().astype(np.int64)
    out = np.zeros((*lab.shape, 3), dtype=np.uint8)
    valid = (lab != ignore) & (lab < len(palette))
    out[valid] = palette[lab[valid]]
    return out


def save_overlays(images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, palette: np.ndarray, path: Path,
                  names: Sequence[str] | None = None, ignore: int = 255) -> Path:
    """Rows of (image | truth | prediction) for a few tiles, with a legend of the classes that
    appear in them (``names``: one per palette row; ignored pixels are black)."""
    rows = []
    for img, t, p in zip(images, truth, pred):
        t_rgb = torch.from_numpy(colourise(t, palette, ignore)).permute(2, 0, 1).float() / 127.5 - 1
        p_rgb = torch.from_numpy(colourise(p, palette, ignore)).permute(2, 0, 1).float() / 127.5 - 1
        rows.append(torch.stack([img[:3].float().cpu(), t_rgb, p_rgb]))
    canvas = _grid(rows, ["image", "truth", "prediction"], 2, 96)
    if names is not None:
        shown = torch.unique(torch.cat([truth.flatten(), pred.flatten()]).cpu()).tolist()
        entries = [(names[i], palette[i]) for i in shown if 0 <= i < min(len(names), len(palette))]
        if (truth == ignore).any():
            entries.append(("ignored", (0, 0, 0)))
        canvas = with_legend(canvas, entries)
    return _save_png(canvas, path)


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
