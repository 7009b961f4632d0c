"""The ``mae:`` and ``scalemae:`` blocks of a run spec."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rsseg.config.specs import OptimSpec, Strict

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16,
                 decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16, decoder_intermediate_size=2048),
    "pico": dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128, patch_size=8,
                 decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=128),
}
# He et al.: AdamW betas 0.9 / 0.95, weight decay 0.05, cosine decay after a linear warm-up.
MAE_OPTIM = OptimSpec(lr=1.5e-4, warmup_start_lr=0.0, warmup_iterations=2000, after_warmup="cosine", weight_decay=0.05,
                      betas=(0.9, 0.95), grad_clip=None)


class MaeSpec(Strict):
    size: Literal["base", "pico"] = "base"
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    optim: OptimSpec = MAE_OPTIM
    blocks: tuple[int, ...] = Field((3, 5, 7, 11), description="0-based blocks read for segmentation (the neck's four scales)")
    weights: str | None = Field(None, description="public weights imported under this name (`platform weights import DIR --format "
                                                  "vitmae --name NAME`) instead of pre-training here; None: pre-trained here")


class ScaleMaeSpec(MaeSpec):
    gsd: float | None = Field(None, gt=0, description="ground sample distance in metres; default: from the raster's transform")
    reference_gsd: float = Field(1.0, gt=0, description="GSD at which the positional encoding equals MAE's")
