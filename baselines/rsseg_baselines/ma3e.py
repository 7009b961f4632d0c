"""MA3E (Li et al., ECCV 2024, "Masked Angle-Aware Autoencoder for Remote Sensing Images"): an
MAE whose input carries one randomly rotated square crop, so that the ViT has to learn about
orientation, the thing remote-sensing scenes vary most in.

Per tile (our reading of the paper and its release, not its code):

1. Scaling-centre crop: a window of ``window`` x ``window`` patches, patch-aligned, placed at
   random so that the disc the rotation reads from stays inside the tile (no black corners).
   Its content is replaced by the tile rotated about the window's centre by an angle drawn
   uniformly from [-angle_range, angle_range] degrees (bilinear) — the composite image.
2. Angle embedding: one learned vector is added to the window's patch tokens (after the patch
   projection and the positions, before masking), marking which tokens were rotated.
3. Masking: ``mask_ratio`` of the background patches and ``window_mask_ratio`` of the window's
   patches are masked (separately, so the window always keeps its share of visible tokens).
4. Loss: MSE on the masked background patches against the tile; over the window, the rotated
   patches no longer sit where the original ones were, so the window's predictions are matched
   to the ORIGINAL tile's window patches by optimal transport (entropic, Sinkhorn) on the
   squared distance of L2-normalised patches — the OT loss is <P, C> with P the plan.

Downstream, the ViT is read exactly as MAE's (rsseg_baselines.vit.encoder.build_encoder); the angle
embedding is a pre-training device and is left over.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rsseg.errors import ConfigError
from rsseg.pretrain.objective import bare
from rsseg_baselines.vit.network import init_mae, mae_config, patchify
from rsseg_baselines.vit.objective import MaeObjective
from rsseg_baselines.vit.spec import SIZES, MaeSpec


class Ma3eSpec(MaeSpec):
    norm_pix_loss: bool = Field(False, description="the release trains on raw pixels (the OT cost normalises patches itself)")
    window: int = Field(6, ge=1, description="side of the rotated crop in patches (the release: 96 px at patch 16 on 224 px tiles)")
    angle_range: float = Field(45.0, ge=0, le=180, description="rotation angle drawn uniformly from [-angle_range, angle_range] degrees")
    window_mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of the window's patches masked (mask_ratio: the background's)")
    sinkhorn_eps: float = Field(0.1, gt=0, description="entropic regularisation of the OT plan")
    sinkhorn_iterations: int = Field(100, ge=1)
    weights: None = Field(None, description="no importer for MA3E's release yet: MA3E is pre-trained here")


# ---------------------------------------------------------------------------------------------- maths


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


# ---------------------------------------------------------------------------------------------- network


class Ma3eNet(nn.Module):
    """transformers' ViTMAEForPreTraining (its encoder, decoder) + the angle embedding."""

    def __init__(self, config):
        super().__init__()
        from transformers import ViTMAEForPreTraining

        self.mae = ViTMAEForPreTraining(config)
        init_mae(self.mae)
        self.angle_embed = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.02)

    def tokens(self, pixel_values: torch.Tensor, in_window: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, L) window -> (B, L, D): patch projection + positions (+ the angle embedding in the window)."""
        emb = self.mae.vit.embeddings
        pe = emb.position_embeddings
        return emb.patch_embeddings(pixel_values) + pe[:, 1:, :] + self.angle_embed * in_window[..., None].to(pe.dtype)

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor, in_window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) composite, (B, L) noise, (B, L) window -> (B, L, p*p*C) predictions, (B, L) mask (1 masked)."""
        emb = self.mae.vit.embeddings
        pe = emb.position_embeddings
        visible, mask, ids_restore = emb.random_masking(self.tokens(pixel_values, in_window), noise)
        cls = (emb.cls_token + pe[:, :1, :]).expand(visible.shape[0], -1, -1)
        hs = torch.cat([cls, visible], dim=1)
        for layer in self.mae.vit.layers:
            hs = layer(hs, None)
        latent = self.mae.vit.layernorm(hs)
        return self.mae.decoder(latent, ids_restore).logits, mask


# ---------------------------------------------------------------------------------------------- objective


class Ma3eObjective(MaeObjective):
    name = "ma3e"

    def __init__(self, spec: Ma3eSpec, image_size: int, in_channels: int):
        self.spec, self.optim = spec, spec.optim
        self.config = mae_config(spec, image_size, in_channels)
        self.grid = image_size // self.config.patch_size
        if (problem := window_problem(spec.window, self.grid)):
            raise ConfigError(f"ma3e.window: {problem}")
        self.network = Ma3eNet(self.config)

    def _forward(self, net, images: torch.Tensor, generator: torch.Generator):
        """(composite, (B, L) window membership on the host, predictions, mask). The window and the
        masking are drawn on the host and moved once: counting or selecting on the device would
        make the host wait for it."""
        s, p = self.spec, self.config.patch_size
        corners, angles = sample_windows(images.shape[0], self.grid, s.window, s.angle_range, generator)
        in_window = window_tokens(corners, self.grid, s.window)
        composite = rotate_windows(images, corners, angles, s.window, p)
        noise = masking_noise(in_window, s.mask_ratio, s.window_mask_ratio, generator).to(images.device)
        pred, mask = net(composite, noise, in_window.to(images.device))
        return composite, in_window, pred.float(), mask

    def loss(self, net, images, generator):
        s = self.spec
        _, in_window, pred, mask = self._forward(net, images, generator)
        target = patchify(images.float(), self.config.patch_size)  # (B, L, p*p*C), the tile before rotation
        if s.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        background = mask * (~in_window).to(mask.device, mask.dtype)  # masked background patches
        per_patch = ((pred - target) ** 2).mean(-1)
        bg_loss = (per_patch * background).sum() / background.sum().clamp_min(1)
        b, n_w, d = in_window.shape[0], s.window**2, pred.shape[-1]
        # (B, n_w) the window's patch indices in row-major order, found on the host
        where = in_window.nonzero()[:, 1].reshape(b, n_w)[..., None].expand(b, n_w, d).to(pred.device)
        win_pred = pred.gather(1, where)  # (B, n_w, D)
        win_target = target.gather(1, where)
        window_loss = ot_loss(win_pred, win_target, s.sinkhorn_eps, s.sinkhorn_iterations)
        return bg_loss + window_loss, {"loss_background": bg_loss.detach(), "loss_ot": window_loss.detach(),
                                       "masked_fraction": mask.detach().float().mean()}

    @torch.no_grad()
    def artifacts(self, net, images, generator, out_dir: Path, *, samples: int = 0, sample_steps: int = 0) -> list[Path]:
        """Tiles, their composites (rotated window), the masked composite and the prediction."""
        from rsseg.viz import save_grid

        net.eval()
        x = images[:4]
        composite, _, pred, mask = self._forward(net, x, generator)
        mae = bare(net).mae
        p = self.config.patch_size
        m = mask.unsqueeze(-1)
        shown = patchify(composite.float(), p)
        masked = mae.unpatchify(shown * (1 - m))
        recon = mae.unpatchify(pred * m + shown * (1 - m))
        net.train()
        return [save_grid([x, composite, masked, recon.clamp(-1, 1)], out_dir / "reconstruction.png",
                          ["tile", "rotated window", "masked", "reconstruction"])]


def check(run) -> list[tuple[str, str]]:
    """The window and the masking split against this run's tile (a field validator does not see the tile size)."""
    spec = run.ma3e
    patch = SIZES[spec.size]["patch_size"]
    grid = run.data.tile_size // patch
    if (problem := window_problem(spec.window, grid)):
        return [("ma3e.window", f"{problem}; data.tile_size {run.data.tile_size}, patch {patch}")]
    if (problem := masking_problem(grid * grid, spec.window ** 2, spec.mask_ratio, spec.window_mask_ratio)):
        return [("ma3e.window_mask_ratio", problem)]
    return []


def build_objective(run, in_channels: int) -> Ma3eObjective:
    return Ma3eObjective(run.ma3e, run.data.tile_size, in_channels)
