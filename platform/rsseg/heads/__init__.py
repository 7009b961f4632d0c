"""Segmentation heads over the encoder contract: the paper's MLP segmentor and UPerNet."""

from __future__ import annotations

import torch

from rsseg.encoders import FeatureInfo


class NeckHead(torch.nn.Module):
    """A trainable neck (e.g. the ViT's 4-scale pyramid) followed by a head; a head to the trainer."""

    def __init__(self, neck: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.neck, self.head = neck, head

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.head(self.neck(features), size)

    def auxiliary_logits(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor | None:
        aux = getattr(self.head, "auxiliary_logits", None)
        return aux(self.neck(features), size) if aux is not None else None


def build_head(name: str, feature_info: list[FeatureInfo], num_classes: int, finetune):
    """A head for these features; ``finetune`` is the run's FinetuneSpec (head options)."""
    if name == "mlp":
        from rsseg.heads.mlp import MlpSegmentor

        return MlpSegmentor(feature_info, num_classes, grouping=finetune.mlp.grouping, fuse_stride=finetune.mlp.fuse_stride)
    if name == "upernet":
        from rsseg.heads.upernet import UperNetSegHead

        u = finetune.upernet
        return UperNetSegHead(feature_info, num_classes, channels=u.channels, pool_scales=u.pool_scales, auxiliary=u.auxiliary)
    raise ValueError(f"unknown head {name!r}")
