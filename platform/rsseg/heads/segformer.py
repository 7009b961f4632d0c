"""SegFormer's all-MLP decoder on the encoder contract, with transformers' ``SegformerDecodeHead``.

Maps are concatenated per stride (finest first); each level is projected to ``decoder_hidden_size``
channels by a linear layer, upsampled (bilinear) to the finest level, concatenated (coarsest
first, as SegFormer does), fused by a 1x1 conv + BN + ReLU, and classified at the finest stride;
the logits are upsampled to the input size. SegFormer-B4 uses 768 channels (MiT-B4 + this head:
64.0 M parameters with 12 classes; the paper's Table 4: 64.1 M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsseg.encoders import FeatureInfo
from rsseg.heads import SegHead, by_stride, concat_levels, level_channels


def decoder_config(in_channels: list[int], num_classes: int, hidden: int, dropout: float):
    from transformers import SegformerConfig

    return SegformerConfig(hidden_sizes=list(in_channels), num_encoder_blocks=len(in_channels), decoder_hidden_size=hidden,
                           classifier_dropout_prob=dropout, num_labels=num_classes)


class SegformerSegHead(SegHead):
    def __init__(self, feature_info: list[FeatureInfo], num_classes: int, hidden: int = 768, dropout: float = 0.1):
        super().__init__()
        from transformers.models.segformer.modeling_segformer import SegformerDecodeHead, SegformerPreTrainedModel

        self.by_stride = by_stride(feature_info)
        in_channels = level_channels(feature_info, self.by_stride)
        config = decoder_config(in_channels, num_classes, hidden, dropout)
        self.head = SegformerDecodeHead(config)
        holder = type("_Init", (), {"config": config})()
        for m in self.modules():
            SegformerPreTrainedModel._init_weights(holder, m)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        # levels: (B, sum c_i, H/s, W/s) per stride s, finest first -> logits (B, classes, H/s0, W/s0)
        return F.interpolate(self.head(concat_levels(features, self.by_stride)), size=size, mode="bilinear", align_corners=False)


def build(feature_info: list[FeatureInfo], num_classes: int, finetune) -> SegformerSegHead:
    s = finetune.segformer
    return SegformerSegHead(feature_info, num_classes, hidden=s.decoder_hidden_size, dropout=s.dropout)
