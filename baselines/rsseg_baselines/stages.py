"""What the four-stage backbones (ConvNeXt, SegFormer's MiT) share on the encoder contract: maps
at strides 4, 8, 16, 32, a cache identity from their weights, eval mode while frozen, and the
ImageNet normalisation their released weights expect."""

from __future__ import annotations

import torch

from rsseg.encoders import FeatureInfo, freeze

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDES = (4, 8, 16, 32)


class StageEncoder(torch.nn.Module):
    def __init__(self, widths: list[int], weights_id: str, imagenet: bool):
        super().__init__()
        self.imagenet = imagenet
        self._weights_id = weights_id
        self.feature_info = [FeatureInfo(c, s, f"stage{i + 1}", f"stage{i + 1}") for i, (c, s) in enumerate(zip(widths, STRIDES))]

    @property
    def cache_id(self) -> str:
        return self._weights_id

    def freeze(self):
        return freeze(self)

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode (no drop-path) while the head trains.
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(mode and not frozen)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return imagenet_normalise(x) if self.imagenet else x


def imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    """Tiles come in [-1, 1]; released ImageNet-era weights expect mean/std-normalised [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x + 1) / 2 - mean) / std
