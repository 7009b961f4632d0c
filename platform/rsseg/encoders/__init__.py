"""The encoder contract every backbone obeys (after timm's ``feature_info``).

An encoder is an ``nn.Module`` with

- ``feature_info: list[FeatureInfo]`` — per output map: channels, stride (input size / map
  size), ``group`` (the map's identity independent of the noise level: heads that fuse the
  timesteps of one map group by it), a unique ``name`` and the ``part`` it belongs to: the
  maps one forward can compute on their own (DDPM: one part per timestep; the feature cache
  stores and computes per (tile, part));
- ``forward(x, keys=None, variants=None, parts=None) -> list[Tensor]`` — maps in
  ``feature_info`` order (only those of ``parts`` when given), each
  ``(B, channels, H / stride, W / stride)``. ``keys`` (tile ids) and ``variants``
  (augmentation element) matter only to encoders with per-tile randomness (DDPM's fixed noise);
  others ignore them;
- ``cache_id: str | None`` — a fingerprint of everything the features depend on, or None when
  they cannot be cached (fresh noise, trainable weights).

Heads use nothing else. DDPM, ConvNeXt, MAE-ViT and ScaleMAE-ViT all satisfy it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class FeatureInfo:
    channels: int
    stride: int
    group: str
    name: str
    part: str = "all"


def parts_of(feature_info: list[FeatureInfo]) -> list[str]:
    """The encoder's parts in order of first appearance."""
    return list(dict.fromkeys(fi.part for fi in feature_info))


class Encoder(Protocol):
    feature_info: list[FeatureInfo]
    cache_id: str | None

    def __call__(self, x: torch.Tensor, keys: Sequence[str] | None = None, variants: Sequence[int] | None = None,
                 parts: Sequence[str] | None = None) -> list[torch.Tensor]: ...


def check_contract(encoder, x: torch.Tensor, features: list[torch.Tensor]) -> None:
    """Assert that ``features`` match what ``encoder.feature_info`` declares for input ``x``."""
    info = encoder.feature_info
    if len(features) != len(info):
        raise AssertionError(f"{len(features)} maps, feature_info declares {len(info)}")
    h, w = x.shape[-2:]
    for f, fi in zip(features, info):
        want = (x.shape[0], fi.channels, h // fi.stride, w // fi.stride)
        if tuple(f.shape) != want:
            raise AssertionError(f"{fi.name}: shape {tuple(f.shape)}, declared {want}")


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
