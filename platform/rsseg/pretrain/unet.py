"""UNet presets (diffusers ``UNet2DModel``). Importing this module does not import torch.

- ``tiny``: CPU tests and the smoke profile; five levels so that 1/16 ... 1/2 maps exist, two
  layers per block so that the decoder has three maps per level as in the paper.
- ``ho256``: Ho et al.'s 256 x 256 model (google/ddpm-*-256): 113.7 M parameters.
- ``sr3``: the SR3 / DDPM-CD UNet (channel multipliers 1, 2, 4, 8, 8 on 128, attention at 16^2):
  397.7 M parameters; the paper's 12 decoder maps are its 3 maps x 4 levels at 1/16 ... 1/2.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(32, 32, 64, 64, 128),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=32,
    ),
    "ho256": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        layers_per_block=2,
        attention_head_dim=None,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    "sr3": dict(
        block_out_channels=(128, 256, 512, 1024, 1024),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 4,
        layers_per_block=2,
        attention_head_dim=None,
    ),
}

# UNet2DModel's constructor arguments (diffusers 0.42), for validating free-form overrides
# without importing diffusers.
UNET_ARGS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_type",
    "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type",
    "up_block_types", "block_out_channels", "layers_per_block", "mid_block_scale_factor",
    "downsample_padding", "downsample_type", "upsample_type", "dropout", "act_fn",
    "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
    "resnet_time_scale_shift", "add_attention", "class_embed_type", "num_class_embeds",
    "num_train_timesteps",
)


def unet_config(preset: str, overrides: dict[str, Any] | None = None, in_channels: int = 3, sample_size: int = 256) -> dict[str, Any]:
    cfg = dict(PRESETS[preset])
    cfg.update(in_channels=in_channels, out_channels=in_channels, sample_size=sample_size)
    for k, v in (overrides or {}).items():
        cfg[k] = tuple(v) if isinstance(v, list) else v
    return cfg


def build_unet(preset: str, overrides: dict[str, Any] | None = None, in_channels: int = 3, sample_size: int = 256):
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_config(preset, overrides, in_channels, sample_size))


def levels(config: dict[str, Any]) -> int:
    return len(config["block_out_channels"])


def min_input_multiple(config: dict[str, Any]) -> int:
    """Inputs must be divisible by 2^(levels-1) for the skip connections to line up."""
    return 2 ** (levels(config) - 1)
