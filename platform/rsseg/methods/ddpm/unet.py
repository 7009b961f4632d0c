"""UNet presets (diffusers ``UNet2DModel``). Importing this module does not import torch or diffusers.

- ``tiny``: CPU tests and the smoke profile; five levels so that 1/16 ... 1/2 maps exist, two
  layers per block so that the decoder has three maps per level as in the paper.
- ``ho256``: Ho et al.'s 256 x 256 model (google/ddpm-*-256): 113.7 M parameters.
- ``sr3``: the paper's network: DDPM-CD's SR3 UNet (``model/sr3_modules/unet.py``) at inner
  channel 64, multipliers (1, 2, 4, 8, 8), two resnets per level (three per level in the
  decoder), attention at 16^2 with one head, dropout 0.2, GroupNorm 32, conditioned on the
  continuous noise level sqrt(abar) through a sin/cos encoding and a 64 -> 256 -> 64 MLP (time
  embedding 64 wide), added to each resnet *without* an activation. 97.8 M parameters at 3
  bands: the size the paper's Ft Params imply (107.5 - 16.3 = 91.2 M). Inner channel 64 is
  DDPM-CD's ``config/ddpm_train.json`` only up to its commit 9329b33 (2022-04-23); the paper's
  12 decoder maps are 3 maps x 4 levels at 1/16 ... 1/2 (or, the reading that reproduces its
  16.3 M segmentor, one map x 3 timesteps x 4 levels).
- ``sr3_ddpm_cd``: the same UNet at inner channel 128 (multipliers (1, 2, 4, 8, 8): 128 ... 1024),
  DDPM-CD's config since 2022-04-25 and the shape of its released model (I190000_E97, trained
  with a cosine schedule since 2022-04-26): ~391 M parameters.
  docs/sr3.md says what differs from DDPM-CD's own module, and the config history.

A config is UNet2DModel's arguments plus, for SR3-style networks, a ``conditioning`` entry
(`build_unet` applies it after constructing the diffusers model).
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
        block_out_channels=(64, 128, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 4,
        layers_per_block=2,
        attention_head_dim=None,  # one head over all channels, scale 1/sqrt(C), as SR3's SelfAttention
        dropout=0.2,
        norm_num_groups=32,
        flip_sin_to_cos=False,  # SR3's PositionalEncoding: [sin, cos], frequencies 1e4^(-k / (C/2))
        freq_shift=0,
        conditioning={"kind": "noise_level", "mlp_hidden_mult": 4, "skip_time_act": True},
    ),
}
PRESETS["sr3_ddpm_cd"] = {**PRESETS["sr3"], "block_out_channels": (128, 256, 512, 1024, 1024)}

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
    """The resolved config of a preset with overrides (SR3's noise-level MLP sized from the
    inner channel after the overrides: a narrowed sr3 keeps SR3's proportions)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset].items()}
    cfg.update(in_channels=in_channels, out_channels=in_channels, sample_size=sample_size)
    for k, v in (overrides or {}).items():
        cfg[k] = tuple(v) if isinstance(v, list) else v
    cond = cfg.get("conditioning")
    if cond is not None and cond["kind"] == "noise_level":
        inner = cfg["block_out_channels"][0]
        cfg["time_embedding_dim"] = inner  # SR3: noise_level_channel = inner_channel
        cfg["conditioning"] = {"kind": "noise_level", "mlp_hidden": cond.get("mlp_hidden") or cond["mlp_hidden_mult"] * inner,
                               "skip_time_act": bool(cond["skip_time_act"])}
    return cfg


def conditioning_of(config: dict[str, Any]) -> str:
    """``timestep`` (diffusers) or ``noise_level`` (SR3): what the network's second input is."""
    return (config.get("conditioning") or {}).get("kind", "timestep")


def build_unet(config: dict[str, Any]):
    """A diffusers UNet2DModel from a resolved config (`unet_config`, or a checkpoint's).

    SR3 conditioning: the time embedding becomes a sin/cos(inner) -> hidden -> inner MLP
    (diffusers builds inner -> inner -> inner) and each resnet adds its projection of it without
    the SiLU diffusers puts in front (``ResnetBlock2D.skip_time_act``)."""
    from diffusers import UNet2DModel

    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    cond = cfg.pop("conditioning", None)
    net = UNet2DModel(**cfg)
    if cond is not None and cond["kind"] == "noise_level":
        from diffusers.models.embeddings import TimestepEmbedding
        from diffusers.models.resnet import ResnetBlock2D

        inner = cfg["block_out_channels"][0]
        net.time_embedding = TimestepEmbedding(inner, cond["mlp_hidden"], act_fn=cfg.get("act_fn", "silu"),
                                               out_dim=cfg["time_embedding_dim"])
        for m in net.modules():
            if isinstance(m, ResnetBlock2D):
                m.skip_time_act = cond["skip_time_act"]
    return net


def build_preset(preset: str, overrides: dict[str, Any] | None = None, in_channels: int = 3, sample_size: int = 256):
    """A preset's UNet (tests, benchmarks, parameter counts on the meta device)."""
    return build_unet(unet_config(preset, overrides, in_channels, sample_size))


def jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def parameter_count(preset: str, overrides: dict[str, Any] | None = None, in_channels: int = 3) -> int:
    """Parameters of a preset, counted on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        net = build_preset(preset, overrides, in_channels)
    return sum(p.numel() for p in net.parameters())


def levels(config: dict[str, Any]) -> int:
    return len(config["block_out_channels"])


def min_input_multiple(config: dict[str, Any]) -> int:
    """Inputs must be divisible by 2^(levels-1) for the skip connections to line up."""
    return 2 ** (levels(config) - 1)
