"""MA3E's tensor maths: the rotated window (where, which tokens, the composite image), the masking
split between window and background, and the entropic optimal-transport loss (Sinkhorn)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rsseg.errors import ConfigError


def sinkhorn(cost: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """Entropic OT plan between uniform marginals, in the log domain (stable at small eps).

    cost (B, n, m) -> plan (B, n, m) with rows summing to 1/n and columns to 1/m
    (P = diag(u) exp(-C/eps) diag(v), u and v by alternating projections)."""
    b, n, m = cost.shape
    log_k = -cost / eps
    log_a = torch.full((b, n), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((b, m), -math.log(m), dtype=cost.dtype, device=cost.device)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(iterations):
        f = log_a - torch.logsumexp(log_k + g[:, None, :], dim=2)
        g = log_b - torch.logsumexp(log_k + f[:, :, None], dim=1)
    return torch.exp(f[:, :, None] + log_k + g[:, None, :])


def ot_loss(pred: torch.Tensor, target: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """Optimal-transport reconstruction loss of a set of patches.

    pred, target (B, n, D) -> scalar: mean over the batch of <P, C>, C_ij = |p_i - t_j|^2 of the
    L2-normalised patches (in [0, 4]). The plan is computed without gradient: at the optimum of
    the entropic problem the gradient through P vanishes up to the entropy term (envelope
    theorem), and back-propagating 100 Sinkhorn iterations would cost more than the ViT step."""
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    cost = torch.cdist(p, t) ** 2
    with torch.no_grad():
        plan = sinkhorn(cost, eps, iterations)
    return (plan * cost).sum((1, 2)).mean()


def window_margin(window: int) -> int:
    """Patches to keep between the window and the tile's edge so that the rotated window reads only
    from inside the tile: the disc around its centre through its corners has radius w/sqrt(2)."""
    return math.ceil(window * (math.sqrt(2) - 1) / 2 - 1e-9)


def window_problem(window: int, grid: int) -> str | None:
    """Why a window of ``window`` patches cannot be placed, rotated, in a grid x grid tile (None: it can)."""
    if grid - window - 2 * window_margin(window) >= 0:
        return None
    fits = max((w for w in range(1, grid + 1) if grid - w - 2 * window_margin(w) >= 0), default=0)
    return f"{window} patches does not fit, rotated, in a {grid}x{grid}-patch tile (at most {fits} patches)"


def sample_windows(batch: int, grid: int, window: int, angle_range: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) top/left in patches of each window, uniform over the placements that fit, and (B,)
    angles in degrees, uniform in [-angle_range, angle_range]."""
    m = window_margin(window)
    corners = torch.randint(m, grid - window - m + 1, (batch, 2), generator=generator)
    angles = (torch.rand(batch, generator=generator) * 2 - 1) * angle_range
    return corners, angles


def window_tokens(corners: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """(B, 2) top/left -> (B, grid*grid) bool, True at the window's patches (row-major, the ViT's order)."""
    rows = torch.arange(grid, device=corners.device)
    in_r = (rows[None] >= corners[:, :1]) & (rows[None] < corners[:, :1] + window)  # (B, g)
    in_c = (rows[None] >= corners[:, 1:]) & (rows[None] < corners[:, 1:] + window)
    return (in_r[:, :, None] & in_c[:, None, :]).reshape(len(corners), grid * grid)


def rotate_windows(images: torch.Tensor, corners: torch.Tensor, angles: torch.Tensor, window: int, patch: int) -> torch.Tensor:
    """The composite: each tile with its window replaced by the tile rotated about the window's
    centre by its angle (degrees, counter-clockwise on screen).

    images (B, C, H, W), corners (B, 2) in patches, angles (B,) -> (B, C, H, W). Output pixel q
    of the window reads the tile at c + R(q - c), c the window centre (pixel coordinates of pixel
    centres, bilinear)."""
    b, _, h, w = images.shape
    dev, dt = images.device, torch.float32
    ys = torch.arange(h, device=dev, dtype=dt) + 0.5
    xs = torch.arange(w, device=dev, dtype=dt) + 0.5
    qy, qx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
    cy = ((corners[:, 0].to(dev, dt) + window / 2) * patch)[:, None, None]  # (B, 1, 1)
    cx = ((corners[:, 1].to(dev, dt) + window / 2) * patch)[:, None, None]
    a = torch.deg2rad(angles.to(dev, dt))[:, None, None]
    dy, dx = qy[None] - cy, qx[None] - cx  # (B, H, W)
    # (x right, y down): turning the content counter-clockwise on screen by a reads, for each output
    # pixel, the source at c + [[cos a, -sin a], [sin a, cos a]] (q - c); a = 90 is torch.rot90 k=1
    sx = cx + torch.cos(a) * dx - torch.sin(a) * dy
    sy = cy + torch.sin(a) * dx + torch.cos(a) * dy
    grid = torch.stack([2 * sx / w - 1, 2 * sy / h - 1], dim=-1)  # (B, H, W, 2), align_corners=False
    rotated = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = window_tokens(corners.to(dev), h // patch, window).reshape(b, 1, h // patch, w // patch)
    inside = inside.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return torch.where(inside, rotated.to(images.dtype), images)


def masking_problem(length: int, n_window: int, mask_ratio: float, window_mask_ratio: float) -> str | None:
    """Why the visible patches cannot be split between window and background (None: they can):
    MAE keeps int(L (1 - mask_ratio)) patches, int(n_w (1 - window_mask_ratio)) of them in the window."""
    keep, keep_w = int(length * (1 - mask_ratio)), int(n_window * (1 - window_mask_ratio))
    if 0 <= keep - keep_w <= length - n_window:
        return None
    return (f"keeping {keep_w} of {n_window} window patches leaves {keep - keep_w} of the {keep} visible patches "
            f"(mask_ratio {mask_ratio}) for a background of {length - n_window}")


def masking_noise(in_window: torch.Tensor, mask_ratio: float, window_mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(B, L) window membership -> (B, L) noise for ViTMAE's random_masking (lowest kept): exactly
    int(n_w (1 - window_mask_ratio)) window patches and the rest of MAE's int(L (1 - mask_ratio))
    kept patches from the background get noise in [0, 1); every other patch in [1, 2)."""
    b, length = in_window.shape
    n_w = int(in_window[0].sum())
    if (problem := masking_problem(length, n_w, mask_ratio, window_mask_ratio)):
        raise ConfigError(f"ma3e.window_mask_ratio: {problem}")
    keep, keep_w = int(length * (1 - mask_ratio)), int(n_w * (1 - window_mask_ratio))
    u = torch.rand((b, length), generator=generator).to(in_window.device)
    # rank within each group: the keep_w lowest-u window patches and the (keep - keep_w) lowest-u background ones
    big = 2.0
    rank_w = torch.where(in_window, u, big).argsort(1).argsort(1)
    rank_b = torch.where(in_window, big, u).argsort(1).argsort(1)
    kept = torch.where(in_window, rank_w < keep_w, rank_b < keep - keep_w)
    return torch.where(kept, u, u + 1.0)
