"""The ``segformer:`` block of a run spec and the MiT sizes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rsseg.config.specs import Strict

SIZES = {
    "b4": {"depths": [3, 8, 27, 3], "hidden_sizes": [64, 128, 320, 512], "num_attention_heads": [1, 2, 5, 8]},
    "pico": {"depths": [1, 1, 2, 1], "hidden_sizes": [16, 32, 64, 128], "num_attention_heads": [1, 1, 2, 4]},
}


class SegformerSpec(Strict):
    size: Literal["b4", "pico"] = "b4"
    weights: str | None = Field(None, description="ImageNet MiT weights: a local transformers directory (config.json + model.safetensors)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth of the MiT blocks (SegFormer's 0.1)")


def encoder_config(spec: SegformerSpec, in_channels: int):
    from transformers import SegformerConfig

    return SegformerConfig(num_channels=in_channels, drop_path_rate=spec.drop_path, **SIZES[spec.size])
