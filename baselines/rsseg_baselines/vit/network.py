"""The ViT's fixed sin-cos position tables, patches and Laplacian bands; the ViTMAE config of a
spec, MAE's initialisation and ScaleMAE's network (a low-band head beside the decoder)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError
from rsseg_baselines.vit.spec import SIZES, MaeSpec


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-2k/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, scale: float = 1.0, cls_token: bool = True) -> np.ndarray:
    """MAE's 2-D sin-cos table ((1 + g^2, dim) with a zero cls row); ScaleMAE multiplies the patch
    grid by ``scale`` = GSD / reference GSD before the sin-cos (scale 1 = MAE)."""
    g = np.arange(grid_size, dtype=np.float64) * scale
    first, second = np.meshgrid(g, g)  # the order of transformers' get_2d_sincos_pos_embed
    emb = np.concatenate([sincos_1d(dim // 2, first), sincos_1d(dim // 2, second)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0) if cls_token else emb


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), transformers' patch order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def two_bands(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplacian two-band split: low = 2x average pool (B, C, H/2, W/2); high = x - up(low)."""
    low = F.avg_pool2d(x, 2)
    high = x - F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
    return low, high


def norm_patches(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5


def mae_config(spec: MaeSpec, image_size: int, in_channels: int):
    from transformers import ViTMAEConfig

    cfg = dict(SIZES[spec.size])
    if image_size % cfg["patch_size"]:
        raise ConfigError(f"data.tile_size: {image_size} is not divisible by the ViT patch size {cfg['patch_size']}")
    return ViTMAEConfig(image_size=image_size, num_channels=in_channels, mask_ratio=spec.mask_ratio, norm_pix_loss=spec.norm_pix_loss,
                        **cfg)


def fill_positions(pe: torch.Tensor, scale: float) -> None:
    grid = int(math.isqrt(pe.shape[1] - 1))
    with torch.no_grad():
        pe.copy_(torch.from_numpy(sincos_2d(pe.shape[-1], grid, scale)).to(pe.dtype)[None])


def init_mae(net, scale: float = 1.0) -> None:
    """MAE's initialisation of what transformers 5 leaves at zero: its ``ViTMAEEmbeddings.
    initialize_weights`` returns early once the patch projection is marked initialised (it is,
    children first), so both fixed sin-cos tables stay zero — a ViT without positions. We fill
    the encoder and decoder tables (GSD-scaled for ScaleMAE) and draw the cls and mask tokens
    from N(0, 0.02) as He et al. do."""
    fill_positions(net.vit.embeddings.position_embeddings, scale)
    fill_positions(net.decoder.decoder_pos_embed, scale)
    with torch.no_grad():
        torch.nn.init.normal_(net.vit.embeddings.cls_token, std=0.02)
        torch.nn.init.normal_(net.decoder.mask_token, std=0.02)


class ScaleMaeNet(nn.Module):
    """ViTMAEForPreTraining + a low-band prediction head on the decoder's last hidden state."""

    def __init__(self, config, scale: float):
        super().__init__()
        from transformers import ViTMAEForPreTraining

        self.mae = ViTMAEForPreTraining(config)
        init_mae(self.mae, scale)
        p, c = config.patch_size, config.num_channels
        self.low_pred = nn.Linear(config.decoder_hidden_size, (p // 2) ** 2 * c)

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.mae.vit(pixel_values, noise=noise)
        d = self.mae.decoder
        # transformers' ViTMAEDecoder.forward up to its norm (we need the hidden state for the low band)
        h = d.decoder_embed(out.last_hidden_state)
        ids = out.ids_restore
        mask_tokens = d.mask_token.repeat(h.shape[0], ids.shape[1] + 1 - h.shape[1], 1)
        tokens = torch.cat([h[:, 1:, :], mask_tokens], dim=1)
        tokens = torch.gather(tokens, 1, ids.unsqueeze(-1).repeat(1, 1, h.shape[2]))
        h = torch.cat([h[:, :1, :], tokens], dim=1) + d.decoder_pos_embed
        for layer in d.decoder_layers:
            h = layer(h)
        h = d.decoder_norm(h)[:, 1:]
        return d.decoder_pred(h), self.low_pred(h), out.mask
