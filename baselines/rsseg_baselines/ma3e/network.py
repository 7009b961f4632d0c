"""The MA3E network: transformers' ViTMAEForPreTraining and the angle embedding on the window's tokens."""

from __future__ import annotations

import torch
from torch import nn

from rsseg_baselines.vit.network import init_mae


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
