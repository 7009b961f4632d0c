"""The paper's MLP segmentor (section 3.4, Fig. 7).

Per group of maps (see `grouping`), the maps are concatenated along channels (3 c_i channels
for one map at 3 timesteps) and refined per pixel by a residual MLP block mapping 3 c_i -> c_i:

    z1 = ReLU(BN1(Linear1(F) + F))          Linear1: 3c -> 3c   (1 x 1)
    z2 = ReLU(BN2(Linear2(z1) + z1))        Linear2: 3c -> 3c
    out = Linear3(z2)                       Linear3: 3c -> c

Every group's output is resized to 1/4 of the input (bilinear), all are concatenated, and a
final block of the same form maps the sum of the c_i to class logits at H/4 x W/4, upsampled
(bilinear) to H x W. With ``fuse_hidden`` = h the concatenation is first projected to h channels
(1 x 1 with bias) and the final block is h -> classes: its C x C layers on a wide concatenation
(4 224 channels for the paper's UNet with all 12 maps) are most of the head otherwise.

The paper's "3 c_i" is ambiguous; `grouping` makes the reading explicit:
- ``map``: one block per feature map across the timesteps (3 c_i = 3 timesteps x 1 map);
- ``resolution``: one block per resolution across all its maps and timesteps.

Parameters of a block (c_in -> c_out): 2 (c_in^2 + c_in) + 4 c_in + c_in c_out + c_out (see
`block_parameters`; a test checks the module against it).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from rsseg.encoders import FeatureInfo
from rsseg.heads import SegHead


class MlpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear1 = nn.Conv2d(c_in, c_in, 1)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.linear2 = nn.Conv2d(c_in, c_in, 1)
        self.bn2 = nn.BatchNorm2d(c_in)
        self.linear3 = nn.Conv2d(c_in, c_out, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, c_in, h, w) -> (B, c_out, h, w)
        z1 = F.relu(self.bn1(self.linear1(f) + f))
        z2 = F.relu(self.bn2(self.linear2(z1) + z1))
        return self.linear3(z2)


def block_parameters(c_in: int, c_out: int) -> int:
    """Closed form: two c_in x c_in 1x1 convs with bias, two BNs (weight + bias), c_in -> c_out."""
    return 2 * (c_in * c_in + c_in) + 2 * (2 * c_in) + c_in * c_out + c_out


def groups_of(feature_info: list[FeatureInfo], grouping: str) -> "OrderedDict[str, list[int]]":
    out: OrderedDict[str, list[int]] = OrderedDict()
    for i, fi in enumerate(feature_info):
        key = fi.group if grouping == "map" else f"1/{fi.stride}"
        out.setdefault(key, []).append(i)
    return out


def segmentor_parameters(feature_info: list[FeatureInfo], num_classes: int, grouping: str = "map",
                         fuse_hidden: int | None = None) -> int:
    total, fused = 0, 0
    for members in groups_of(feature_info, grouping).values():
        c_in = sum(feature_info[i].channels for i in members)
        c_out = feature_info[members[0]].channels
        total += block_parameters(c_in, c_out)
        fused += c_out
    if fuse_hidden is not None:
        return total + fused * fuse_hidden + fuse_hidden + block_parameters(fuse_hidden, num_classes)
    return total + block_parameters(fused, num_classes)


class MlpSegmentor(SegHead):
    def __init__(self, feature_info: list[FeatureInfo], num_classes: int, grouping: str = "map", fuse_stride: int = 4,
                 fuse_hidden: int | None = None):
        super().__init__()
        self.groups = groups_of(feature_info, grouping)
        self.fuse_stride = fuse_stride
        self.blocks = nn.ModuleDict()
        fused = 0
        for key, members in self.groups.items():
            strides = {feature_info[i].stride for i in members}
            if len(strides) != 1:
                raise ValueError(f"group {key} mixes strides {sorted(strides)}")
            c_in = sum(feature_info[i].channels for i in members)
            c_out = feature_info[members[0]].channels
            self.blocks[key.replace(".", "_")] = MlpBlock(c_in, c_out)
            fused += c_out
        # (B, sum c_i, H/4, W/4) -> (B, h, H/4, W/4) when the fusion block is narrower
        self.fuse_proj = nn.Conv2d(fused, fuse_hidden, 1) if fuse_hidden is not None else None
        self.final = MlpBlock(fuse_hidden or fused, num_classes)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        target = (h // self.fuse_stride, w // self.fuse_stride)
        outs = []
        for key, members in self.groups.items():
            f = torch.cat([features[i] for i in members], dim=1).float()
            y = self.blocks[key.replace(".", "_")](f)
            if y.shape[-2:] != target:
                y = F.interpolate(y, size=target, mode="bilinear", align_corners=False)
            outs.append(y)
        fused = torch.cat(outs, dim=1)
        if self.fuse_proj is not None:
            fused = self.fuse_proj(fused)
        logits = self.final(fused)  # (B, classes, H/4, W/4)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


def build(feature_info: list[FeatureInfo], num_classes: int, finetune) -> MlpSegmentor:
    m = finetune.mlp
    return MlpSegmentor(feature_info, num_classes, grouping=m.grouping, fuse_stride=m.fuse_stride, fuse_hidden=m.fuse_hidden)
