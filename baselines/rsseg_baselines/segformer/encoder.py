"""The MiT's four stages on the encoder contract (strides 4-32), random or ImageNet-initialised."""

from __future__ import annotations

from pathlib import Path

import torch

from rsseg.data.registry import input_bands
from rsseg.errors import ConfigError
from rsseg.provenance import fingerprint
from rsseg_baselines.segformer.spec import SIZES, SegformerSpec, encoder_config
from rsseg_baselines.segformer.weights import load_imagenet
from rsseg_baselines.stages import StageEncoder


class SegformerEncoder(StageEncoder):
    """Four maps at strides 4, 8, 16, 32 (the MiT stages' outputs, (B, C_i, H/s, W/s))."""

    def __init__(self, spec: SegformerSpec, in_channels: int, weights_id: str, imagenet: bool, mit: torch.nn.Module | None = None):
        super().__init__(SIZES[spec.size]["hidden_sizes"], weights_id, imagenet)
        from transformers import SegformerModel

        self.mit = mit if mit is not None else SegformerModel(encoder_config(spec, in_channels))

    def forward(self, x: torch.Tensor, keys=None, variants=None, parts=None) -> list[torch.Tensor]:
        maps, h = [], self.normalise(x)
        for stage in self.mit.stages:  # (B, C, H, W) -> (B, C_i, H/s_i, W/s_i)
            h = stage(h)
            maps.append(h)
        return maps


def build(run, pretrained=None) -> SegformerEncoder:
    spec = run.segformer
    channels = input_bands(run.data)
    if not spec.weights:
        torch.manual_seed(run.seed)
        return SegformerEncoder(spec, channels, fingerprint({"random": spec.model_dump(mode="json"), "seed": run.seed, "c": channels}),
                                imagenet=False)
    if channels != 3:
        raise ConfigError(f"segformer.weights: ImageNet weights take 3 bands, {run.data.dataset} has {channels} (set data.bands)")
    mit = load_imagenet(spec, channels)
    f = Path(spec.weights).expanduser().resolve()
    stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in f.iterdir() if p.is_file())
    return SegformerEncoder(spec, channels, fingerprint({"imagenet": str(f), "files": stamp, "spec": spec.model_dump(mode="json")}),
                            imagenet=True, mit=mit)


def skeleton(run, in_channels: int) -> SegformerEncoder:
    return SegformerEncoder(run.segformer, in_channels, "skeleton", imagenet=False)
