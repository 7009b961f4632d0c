"""Segmentation heads over the encoder contract: the paper's MLP segmentor and UPerNet."""

from __future__ import annotations

from rsseg.encoders import FeatureInfo


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
