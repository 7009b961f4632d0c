"""UPerNet on the encoder contract, with transformers' ``UperNetHead`` (and FCN auxiliary head).

Maps are concatenated per stride (all maps and timesteps of one resolution) and passed from the
finest to the coarsest stride: lateral 1x1 convs, top-down FPN, pyramid pooling on the coarsest
map. The logits come out at the finest stride and are upsampled to the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsseg.encoders import FeatureInfo
from rsseg.heads import SegHead, by_stride, concat_levels, level_channels, segmentation_loss

AUX_WEIGHT = 0.4


def _config(num_classes: int, channels: int, pool_scales, aux_in: int | None):
    from transformers import UperNetConfig

    return UperNetConfig(
        backbone_config={"model_type": "convnext"},  # unused: we feed the head ourselves
        hidden_size=channels, pool_scales=list(pool_scales), num_labels=num_classes,
        use_auxiliary_head=aux_in is not None, auxiliary_in_channels=aux_in, auxiliary_channels=256,
        auxiliary_num_convs=1, auxiliary_concat_input=False,
    )


class UperNetSegHead(SegHead):
    def __init__(self, feature_info: list[FeatureInfo], num_classes: int, channels: int = 512,
                 pool_scales=(1, 2, 3, 6), auxiliary: bool = False):
        super().__init__()
        from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead, UperNetPreTrainedModel

        self.by_stride = by_stride(feature_info)
        in_channels = level_channels(feature_info, self.by_stride)
        aux_index = min(2, len(in_channels) - 1)
        config = _config(num_classes, channels, pool_scales, in_channels[aux_index] if auxiliary else None)
        self.head = UperNetHead(config, in_channels)
        self.auxiliary = UperNetFCNHead(config, in_channels, in_index=aux_index) if auxiliary else None
        init = UperNetPreTrainedModel._init_weights
        holder = type("_Init", (), {"config": config})()
        for m in self.modules():
            init(holder, m)

    def _levels(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return concat_levels(features, self.by_stride)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        logits = self.head(self._levels(features))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def auxiliary_logits(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor | None:
        if self.auxiliary is None:
            return None
        return F.interpolate(self.auxiliary(self._levels(features)), size=size, mode="bilinear", align_corners=False)

    def loss(self, features: list[torch.Tensor], logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus the FCN auxiliary head's, weighted 0.4 (mmsegmentation's recipe)."""
        loss = segmentation_loss(logits, mask)
        if self.auxiliary is not None:
            loss = loss + AUX_WEIGHT * segmentation_loss(self.auxiliary_logits(features, mask.shape[-2:]), mask)
        return loss


def build(feature_info: list[FeatureInfo], num_classes: int, finetune) -> UperNetSegHead:
    u = finetune.upernet
    return UperNetSegHead(feature_info, num_classes, channels=u.channels, pool_scales=u.pool_scales, auxiliary=u.auxiliary)
