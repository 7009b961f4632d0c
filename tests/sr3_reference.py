"""A small SR3 UNet in plain torch, written for the tests from the structure DDPM-CD documents
(``model/sr3_modules/unet.py``): its module names and maths, so that a state dict in the exact
naming of a ``*_gen.pth`` can be made here and a converted UNet compared against it."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, level: torch.Tensor) -> torch.Tensor:  # (B,) noise levels -> (B, dim)
        half = self.dim // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=level.dtype) / half)
        angles = level[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Block(nn.Module):
    def __init__(self, dim: int, out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(), nn.Dropout(dropout) if dropout else nn.Identity(),
                                   nn.Conv2d(dim, out, 3, padding=1))

    def forward(self, x):
        return self.block(x)


class FeatureWiseAffine(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.noise_func = nn.Sequential(nn.Linear(dim, out))

    def forward(self, x, emb):
        return x + self.noise_func(emb).view(x.shape[0], -1, 1, 1)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, out: int, emb: int, groups: int, dropout: float):
        super().__init__()
        self.noise_func = FeatureWiseAffine(emb, out)
        self.block1 = Block(dim, out, groups)
        self.block2 = Block(out, out, groups, dropout)
        self.res_conv = nn.Conv2d(dim, out, 1) if dim != out else nn.Identity()

    def forward(self, x, emb):
        h = self.noise_func(self.block1(x), emb)
        return self.block2(h) + self.res_conv(x)


class SelfAttention(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1, bias=False)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)  # one head
        attn = torch.einsum("bchw,bcyx->bhwyx", q, k) / math.sqrt(c)
        attn = attn.reshape(b, h, w, h * w).softmax(-1).reshape(b, h, w, h, w)
        return self.out(torch.einsum("bhwyx,bcyx->bchw", attn, v)) + x


class ResnetBlocWithAttn(nn.Module):
    def __init__(self, dim, out, emb, groups, dropout, with_attn):
        super().__init__()
        self.res_block = ResnetBlock(dim, out, emb, groups, dropout)
        self.with_attn = with_attn
        if with_attn:
            self.attn = SelfAttention(out, groups)

    def forward(self, x, emb):
        x = self.res_block(x, emb)
        return self.attn(x) if self.with_attn else x


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(self.up(x))


class SR3UNet(nn.Module):
    def __init__(self, in_channel=3, out_channel=3, inner_channel=32, norm_groups=32, channel_mults=(1, 2, 2, 2, 2),
                 attn_res=(4,), res_blocks=2, dropout=0.0, image_size=64, init_conv=True):
        super().__init__()
        self.noise_level_mlp = nn.Sequential(PositionalEncoding(inner_channel), nn.Linear(inner_channel, 4 * inner_channel), Swish(),
                                             nn.Linear(4 * inner_channel, inner_channel))
        self.init_conv_layout = init_conv
        conv = nn.Conv2d(in_channel, inner_channel, 3, padding=1)
        downs = [] if init_conv else [conv]
        if init_conv:
            self.init_conv = conv
        pre, feats, res = inner_channel, [inner_channel], image_size
        for i, mult in enumerate(channel_mults):
            c = inner_channel * mult
            for _ in range(res_blocks):
                downs.append(ResnetBlocWithAttn(pre, c, inner_channel, norm_groups, dropout, res in attn_res))
                feats.append(c)
                pre = c
            if i < len(channel_mults) - 1:
                downs.append(Downsample(pre))
                feats.append(pre)
                res //= 2
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList([ResnetBlocWithAttn(pre, pre, inner_channel, norm_groups, dropout, True),
                                  ResnetBlocWithAttn(pre, pre, inner_channel, norm_groups, dropout, False)])
        ups = []
        for i in reversed(range(len(channel_mults))):
            c = inner_channel * channel_mults[i]
            for _ in range(res_blocks + 1):
                ups.append(ResnetBlocWithAttn(pre + feats.pop(), c, inner_channel, norm_groups, dropout, res in attn_res))
                pre = c
            if i > 0:
                ups.append(Upsample(pre))
                res *= 2
        self.ups = nn.ModuleList(ups)
        self.final_conv = Block(pre, out_channel, norm_groups)

    def forward(self, x, level):
        emb = self.noise_level_mlp(level)
        feats = []
        if self.init_conv_layout:
            x = self.init_conv(x)
            feats.append(x)
        for layer in self.downs:
            x = layer(x, emb) if isinstance(layer, ResnetBlocWithAttn) else layer(x)
            feats.append(x)
        for layer in self.mid:
            x = layer(x, emb)
        for layer in self.ups:
            x = layer(torch.cat([x, feats.pop()], dim=1), emb) if isinstance(layer, ResnetBlocWithAttn) else layer(x)
        return self.final_conv(x)


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (norm affines included), so that a wrong key map shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.3))
    return net
