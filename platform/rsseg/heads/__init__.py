"""Segmentation heads over the encoder contract, registered by name like methods.

A head is an ``nn.Module`` built by ``builder(feature_info, num_classes, finetune_spec)`` with

- ``forward(features, size) -> logits`` of shape (B, classes, H, W);
- ``loss(features, logits, mask) -> scalar``: its training loss (cross-entropy with the ignore
  index; a head with an auxiliary output adds its own term, e.g. UPerNet's FCN head).

Built in: ``mlp`` (the paper's MLP segmentor), ``upernet`` and ``segformer`` (SegFormer's all-MLP
decoder). A user's own head comes from their package through the ``rsseg.heads`` entry-point group
(listed by name without importing it) and is then chosen from YAML as ``finetune.head: NAME``::

    [project.entry-points."rsseg.heads"]
    my_head = "my_package.heads:build"

`register_head` adds one in-process (tests, notebooks).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from importlib import metadata
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rsseg.encoders import FeatureInfo
from rsseg.labels import IGNORE_INDEX

ENTRY_POINT_GROUP = "rsseg.heads"

# name -> "module:function" (loaded on first use) or the builder itself
HEADS: dict[str, str | Callable[..., torch.nn.Module]] = {
    "mlp": "rsseg.heads.mlp:build",
    "upernet": "rsseg.heads.upernet:build",
    "segformer": "rsseg.heads.segformer:build",
}


def register_head(name: str, builder: str | Callable[..., torch.nn.Module]) -> None:
    HEADS[name] = builder


@functools.lru_cache(maxsize=1)
def _installed() -> dict[str, str]:
    """The heads installed packages declare: name -> "module:function" (nothing imported). Read
    once per process, as the method registry is: every run spec's validation asks for the names."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def head_names() -> list[str]:
    """Every head a run may name: built in, installed, registered in this process."""
    return sorted(set(HEADS) | set(_installed()))


def build_head(name: str, feature_info: list[FeatureInfo], num_classes: int, finetune: Any) -> torch.nn.Module:
    """A head for these features; ``finetune`` is the run's FinetuneSpec (head options)."""
    from rsseg.imports import load_object

    builder = HEADS.get(name) or _installed().get(name)
    if builder is None:
        raise ValueError(f"unknown head {name!r}; registered: {', '.join(head_names())}")
    if isinstance(builder, str):
        builder = load_object(builder)
    return builder(feature_info, num_classes, finetune)


def by_stride(feature_info: list[FeatureInfo]) -> "OrderedDict[int, list[int]]":
    """stride -> indices of the maps at that stride, finest stride first (the levels a pyramid
    head takes: all maps and timesteps of one resolution side by side)."""
    out: OrderedDict[int, list[int]] = OrderedDict()
    for i, fi in sorted(enumerate(feature_info), key=lambda p: p[1].stride):
        out.setdefault(fi.stride, []).append(i)
    return out


def level_channels(feature_info: list[FeatureInfo], levels: "OrderedDict[int, list[int]]") -> list[int]:
    return [sum(feature_info[i].channels for i in members) for members in levels.values()]


def concat_levels(features: list[torch.Tensor], levels: "OrderedDict[int, list[int]]") -> list[torch.Tensor]:
    """(B, c_i, H/s, W/s) maps -> one (B, sum c_i, H/s, W/s) level per stride, in float32."""
    return [torch.cat([features[i] for i in members], dim=1).float() for members in levels.values()]


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled pixels; zero (with a graph) for an all-ignored batch. The sum
    divided by the number of labelled pixels (at least 1) rather than a branch on that number:
    a branch on a device value makes the host wait for the device at every step."""
    total = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (mask != IGNORE_INDEX).sum().clamp_min(1)


class SegHead(torch.nn.Module):
    """Base of the heads: the plain segmentation loss."""

    def loss(self, features: list[torch.Tensor], logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(logits, mask)


class NeckHead(SegHead):
    """A trainable neck (e.g. the ViT's 4-scale pyramid) followed by a head; a head to the trainer."""

    def __init__(self, neck: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.neck, self.head = neck, head
        self._pyramid: tuple[int, list[torch.Tensor]] | None = None

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        pyramid = self.neck(features)
        self._pyramid = (id(features), pyramid)
        return self.head(pyramid, size)

    def loss(self, features: list[torch.Tensor], logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The pyramid of the forward that made ``logits`` (running the neck again would update
        # its BatchNorm statistics twice per step).
        pyramid = self._pyramid[1] if self._pyramid is not None and self._pyramid[0] == id(features) else self.neck(features)
        return self.head.loss(pyramid, logits, mask)
