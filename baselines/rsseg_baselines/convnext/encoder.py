"""ConvNeXt's four stages on the encoder contract (strides 4-32), random or ImageNet-initialised."""

from __future__ import annotations

from pathlib import Path

import torch

from rsseg.data.registry import input_bands
from rsseg.errors import ConfigError
from rsseg.provenance import fingerprint
from rsseg_baselines.convnext.spec import SIZES, ConvNextSpec, backbone_config
from rsseg_baselines.convnext.weights import load_imagenet, weights_file
from rsseg_baselines.stages import StageEncoder


class ConvNextEncoder(StageEncoder):
    """Four maps at strides 4, 8, 16, 32 (ConvNeXt stages 1-4)."""

    def __init__(self, spec: ConvNextSpec, in_channels: int, weights_id: str, imagenet: bool):
        super().__init__(SIZES[spec.size]["hidden_sizes"], weights_id, imagenet)
        from transformers import ConvNextBackbone

        self.backbone = ConvNextBackbone(backbone_config(spec, in_channels))

    def forward(self, x: torch.Tensor, keys=None, variants=None, parts=None) -> list[torch.Tensor]:
        return list(self.backbone(pixel_values=self.normalise(x)).feature_maps)


def build_random(run, pretrained=None) -> ConvNextEncoder:
    spec = run.convnext
    torch.manual_seed(run.seed)
    channels = input_bands(run.data)
    return ConvNextEncoder(spec, channels, fingerprint({"random": spec.model_dump(mode="json"), "seed": run.seed, "c": channels}), imagenet=False)


def build_imagenet(run, pretrained=None) -> ConvNextEncoder:
    spec = run.convnext
    if not spec.weights:
        raise ConfigError("convnext.weights: convnext_imagenet needs local ImageNet weights (a file or directory); nothing is downloaded")
    channels = input_bands(run.data)
    if channels != 3:
        raise ConfigError(f"convnext.weights: ImageNet weights take 3 bands, {run.data.dataset} has {channels} (set data.bands)")
    enc = ConvNextEncoder(spec, channels, "", imagenet=True)
    load_imagenet(enc.backbone, spec.weights)
    f = weights_file(Path(spec.weights).expanduser())
    enc._weights_id = fingerprint({"imagenet": str(f.resolve()), "size": f.stat().st_size, "mtime": f.stat().st_mtime_ns,
                                   "spec": spec.model_dump(mode="json")})
    return enc


def skeleton(run, in_channels: int) -> ConvNextEncoder:
    return ConvNextEncoder(run.convnext, in_channels, "skeleton", imagenet=False)
