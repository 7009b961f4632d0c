"""The ``convnext:`` block of a run spec and the ConvNeXt sizes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rsseg.config.specs import Strict

SIZES = {
    "base": {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3]},
    "pico": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 2, 1]},
}


class ConvNextSpec(Strict):
    size: Literal["base", "pico"] = "base"
    weights: str | None = Field(None, description="ImageNet weights: a local .safetensors/.bin/.pt file or a directory holding one")
    drop_path: float = Field(0.0, ge=0, lt=1)


def backbone_config(spec: ConvNextSpec, in_channels: int):
    from transformers import ConvNextConfig

    return ConvNextConfig(num_channels=in_channels, drop_path_rate=spec.drop_path, out_features=["stage1", "stage2", "stage3", "stage4"],
                          **SIZES[spec.size])
